"""Restoring a loaded structure into a target's modules, optimizers, tensors and containers, in place."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger("asyncckpt")


class Problems:
    def __init__(self) -> None:
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []


def apply_in_place(target: Any, loaded: Any, strict: bool, display: str) -> Any:
    """Copy ``loaded`` into ``target`` (tensors, modules, optimizers, dicts of them); return what was not applied.

    At the top level of a dict target, checkpoint keys the target lacks are returned rather than reported, so a
    trainer can restore what it holds and handle the rest itself (Lightning's ``load_checkpoint(state=...)``).
    """
    problems = Problems()
    if isinstance(target, Mapping) and isinstance(loaded, Mapping):
        remainder = {}
        for key in target:
            if key not in loaded:
                problems.missing.append(str(key))
        for key, value in loaded.items():
            if key not in target or not _apply(target[key], value, str(key), strict, problems):
                remainder[key] = value
        result: Any = remainder
    else:
        result = None if _apply(target, loaded, "", strict, problems) else loaded
    messages = []
    if problems.mismatched:
        messages.append("mismatched: " + ", ".join(problems.mismatched[:20]))
    if strict and problems.missing:
        messages.append("missing from the checkpoint: " + ", ".join(problems.missing[:20]))
    if strict and problems.unexpected:
        messages.append("not in the target: " + ", ".join(problems.unexpected[:20]))
    if messages:  # found while applying, as torch's load_state_dict does: what matched is in the target already
        hint = "" if problems.mismatched else "; pass strict=False to load what matches"
        raise CheckpointError(f"cannot restore {display} in place: " + "; ".join(messages) + hint +
                              " (the entries that matched were restored into the target before this was found)")
    if problems.missing or problems.unexpected:  # strict=False: loaded what matches, and says what did not
        log.warning("restored %s in place without %s", display, "; ".join(filter(None, [
            problems.missing and "missing from the checkpoint: " + ", ".join(problems.missing[:20]),
            problems.unexpected and "not in the target: " + ", ".join(problems.unexpected[:20])])))
    return result


def _apply(target: Any, value: Any, name: str, strict: bool, problems: Problems) -> bool:
    """Restore ``value`` into ``target``; True when the target now holds it fully."""
    if isinstance(target, torch.nn.Module):
        if not isinstance(value, Mapping):
            problems.mismatched.append(f"{name} (module, checkpoint holds {type(value).__name__})")
            return False
        try:
            result = target.load_state_dict(value, strict=False)
        except RuntimeError as exc:
            problems.mismatched.append(f"{name} ({str(exc).splitlines()[-1].strip()})")
            return False
        problems.missing += [f"{name}.{k}" for k in result.missing_keys]
        problems.unexpected += [f"{name}.{k}" for k in result.unexpected_keys]
        return True
    if isinstance(target, torch.optim.Optimizer):
        try:
            target.load_state_dict(value)
        except (ValueError, KeyError, TypeError) as exc:
            problems.mismatched.append(f"{name} (optimizer: {exc})")
            return False
        return True
    if isinstance(target, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != target.shape or value.dtype != target.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            problems.mismatched.append(f"{name} (target {tuple(target.shape)} {target.dtype}, checkpoint {got})")
            return False
        try:
            with torch.no_grad():
                target.copy_(value)
        except RuntimeError as exc:  # a target torch cannot write in place (an expand()ed view, an inference tensor)
            problems.mismatched.append(f"{name} (the target cannot be written in place: "
                                       f"{str(exc).splitlines()[0].strip()})")
            return False
        return True
    if isinstance(target, (list, tuple)) and isinstance(value, (list, tuple)) and len(target) == len(value):
        applied = [_apply(t, v, f"{name}.{i}", strict, problems) for i, (t, v) in enumerate(zip(target, value))]
        return all(applied)
    if isinstance(target, Mapping) and isinstance(value, Mapping) and hasattr(target, "__setitem__"):
        whole = True
        for key in target:
            if key not in value:
                problems.missing.append(f"{name}.{key}")
        for key, v in value.items():
            if key not in target:
                problems.unexpected.append(f"{name}.{key}")
                whole = False
            elif not _apply(target[key], v, f"{name}.{key}", strict, problems):
                target[key] = v  # leaves that cannot change in place (numbers, strings…) are replaced
        return whole
    return False
