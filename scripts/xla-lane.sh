#!/usr/bin/env bash
# XLA test lane: real torch_xla on CPU (PJRT_DEVICE=CPU) in its own virtualenv.
#
# The venv (~7 GB: torch 2.9.0 + torch_xla 2.9.0 from PyPI) lives outside the repo and is reused; pip only runs
# when the pinned requirements below differ from the ones recorded in its stamp file. The repo is put on
# PYTHONPATH (no install), so the lane always tests the working tree.
#
#   scripts/xla-lane.sh                 # set up if needed, then run tests/xla
#   scripts/xla-lane.sh -k to_cpu -x    # extra arguments go to pytest
#   XLA_VENV=/some/dir scripts/xla-lane.sh
#
# Fails (non-zero) when the venv cannot be built, when torch_xla does not import in it, or when no test ran.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${XLA_VENV:-${HOME}/.cache/asyncckpt/xla-venv}
python_bin=${XLA_PYTHON:-python3}
requirements="torch==2.9.0 torch_xla==2.9.0 lightning==2.6.6 pytest pytest-asyncio pytest-timeout anyio>=4.16 sniffio fsspec safetensors xxhash numpy"
stamp="$venv/.asyncckpt-xla-requirements"

if [ ! -x "$venv/bin/python" ]; then
  echo "xla-lane: creating $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$python_bin" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$requirements" ]; then
  echo "xla-lane: installing into $venv: $requirements (first time: ~7 GB download)" >&2
  # shellcheck disable=SC2086  # the requirement list is meant to split into words
  "$venv/bin/python" -m pip install --disable-pip-version-check -q $requirements
  printf '%s' "$requirements" > "$stamp"
fi

export PJRT_DEVICE=${PJRT_DEVICE:-CPU}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cd "$repo"

# A missing or broken torch_xla is a failure of this lane, not a reason to skip its tests.
if ! "$venv/bin/python" -c 'import torch_xla, torch_xla.core.xla_model' 2>/dev/null; then
  echo "xla-lane: torch_xla does not import in $venv" >&2
  "$venv/bin/python" -c 'import torch_xla' || true
  exit 1
fi

set +e
"$venv/bin/python" -m pytest -m xla tests/xla -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "xla-lane: no XLA test ran (pytest exit 5): treating as failure" >&2
  exit 1
fi
exit "$rc"
