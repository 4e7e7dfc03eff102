"""XLA lane: real torch_xla on the CPU PJRT backend, one process.

Every test here is marked ``xla``. When these tests are selected and torch_xla cannot be imported, the session
stops with a failure: a lane that silently skips would check nothing. Runs that deselect them (``-m "not xla"``)
or ignore this directory never import torch_xla.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xla: needs torch_xla (run by scripts/xla-lane.sh with PJRT_DEVICE=CPU)")
    os.environ.setdefault("PJRT_DEVICE", "CPU")


@pytest.fixture(scope="session", autouse=True)
def torch_xla_module():
    try:
        import torch_xla
        import torch_xla.core.xla_model  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        pytest.exit(f"torch_xla is not importable ({type(exc).__name__}: {exc}); "
                    "run the XLA lane with scripts/xla-lane.sh", returncode=1)
    return torch_xla


@pytest.fixture
def dev(torch_xla_module):
    return torch_xla_module.device()


@pytest.fixture
def metric_count():
    """metric_count(name) -> how many samples torch_xla's debug metric ``name`` has recorded so far."""
    import torch_xla.debug.metrics as met

    def count(name: str) -> int:
        data = met.metric_data(name)
        return data[0] if data else 0

    return count
