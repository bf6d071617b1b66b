from __future__ import annotations

import os

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20231017)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread_per_core():
    """Under pytest-xdist, give each worker its share of the cores for the duration of a test.

    With every worker running torch's default thread count the cores are oversubscribed, and
    the kernel's many short elementwise passes then run tens of times slower.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rel_err(actual, expected) -> float:
    """Largest absolute difference relative to the largest entry of the reference."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-300))


@pytest.fixture
def slow_selected(request):
    """pyproject.toml promises that ``slow`` tests leave the default run; this fixture enforces it."""
    expression = request.config.getoption("markexpr") or ""
    if "slow" not in expression or "not slow" in expression:
        pytest.skip("slow (a minute or more per case on 2 cores); select with -m slow")
