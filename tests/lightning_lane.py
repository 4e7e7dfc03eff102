"""A pytest plugin that puts ``asyncckpt.lightning.AsyncCheckpointIO`` into every ``lightning.pytorch`` Trainer.

Used by ``scripts/lightning-lane.sh`` to run Lightning's own checkpointing tests against our plugin
(``pytest -p tests.lightning_lane``). After the Trainer's connector has set up its strategy:

* no CheckpointIO given: the strategy's checkpoint_io becomes ``AsyncCheckpointIO()`` (the strategy installs its
  default base under it, as with Lightning's plugin);
* a plain CheckpointIO given (plugin or strategy argument): it becomes the base, ``AsyncCheckpointIO(given)``;
* a wrapping CheckpointIO given (Lightning's ``AsyncCheckpointIO``, or ours): left alone.

Before each test's fixtures are finalized (Lightning's ``thread_police_duuu_daaa`` looks for leftover threads
then), every plugin injected during the test is torn down: a save issued outside ``fit`` (a manual
``trainer.save_checkpoint``) keeps the engine's threads until teardown, and ``docs/lightning.md`` tells users to call
it. Set ``ASYNCCKPT_LANE_NO_TEARDOWN=1`` to see those tests flagged instead.
"""

from __future__ import annotations

import os
import weakref

import pytest

_injected: "weakref.WeakSet" = weakref.WeakSet()
_counts = {"trainers": 0, "wrapped": 0, "left": 0, "torn_down_live": 0}


def _install() -> None:
    from lightning.pytorch.trainer.connectors import accelerator_connector as ac
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    from asyncckpt.lightning import AsyncCheckpointIO

    original = ac._AcceleratorConnector.__init__
    if getattr(original, "_asyncckpt", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        strategy = self.strategy
        given = getattr(strategy, "_checkpoint_io", None)
        _counts["trainers"] += 1
        if isinstance(given, _WrappingCheckpointIO):
            _counts["left"] += 1
            return
        plugin = AsyncCheckpointIO() if given is None else AsyncCheckpointIO(given)
        _counts["wrapped"] += given is not None
        strategy.checkpoint_io = plugin
        _injected.add(plugin)

    __init__._asyncckpt = True  # type: ignore[attr-defined]
    ac._AcceleratorConnector.__init__ = __init__


def pytest_configure(config: pytest.Config) -> None:
    _install()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: object):
    if os.environ.get("ASYNCCKPT_LANE_NO_TEARDOWN") != "1":
        for plugin in list(_injected):
            if plugin._engine is not None:
                _counts["torn_down_live"] += 1
            try:
                plugin.teardown()
            except Exception:  # the test has its verdict already; a failed background save shows in its own asserts
                pass
        _injected.clear()
    yield


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(
        f"asyncckpt lane: {_counts['trainers']} Trainers, AsyncCheckpointIO injected into "
        f"{_counts['trainers'] - _counts['left']} ({_counts['wrapped']} around a given CheckpointIO), "
        f"{_counts['left']} left with their own wrapping plugin; {_counts['torn_down_live']} plugins still had a "
        "live engine at the end of their test (torn down by the lane)")
