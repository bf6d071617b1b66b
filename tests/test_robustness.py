"""Requests that must fail before allocating, and concurrent use from threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deq_kernel import OutputTooLargeError, equilibrium_covariance, settings
from deq_kernel.equilibrium import backend


def test_an_output_that_cannot_fit_raises_before_allocating():
    # 10^6 x 10^6 in float64 is 8 TB: refused at once, long before any pair is computed.
    x = torch.randn(10**6, 2, dtype=torch.float64)
    with pytest.raises(OutputTooLargeError, match=r"\(1000000, 1000000\).*max_block_size") as info:
        equilibrium_covariance(x)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryError)
    assert "float32" in str(info.value)  # float64 requests are told that halving is possible
    # The O(n) diagonal of the same points is fine.
    assert equilibrium_covariance(x, diag=True).shape == (10**6,)


def test_the_guard_compares_the_output_with_the_free_memory(monkeypatch):
    monkeypatch.setattr(backend, "available_memory", lambda device: 10 * 10 * 8)
    monkeypatch.setattr(backend, "SMALL_OUTPUT_BYTES", 0)  # check these small outputs too
    x = torch.randn(10, 3, dtype=torch.float64)
    assert equilibrium_covariance(x).shape == (10, 10)  # exactly fits
    with pytest.raises(OutputTooLargeError, match="float32"):
        equilibrium_covariance(torch.randn(11, 3, dtype=torch.float64))
    with pytest.raises(OutputTooLargeError) as info:  # batch dimensions count
        equilibrium_covariance(torch.randn(2, 10, 3, dtype=torch.float64))
    assert "(2, 10, 10)" in str(info.value)
    with pytest.raises(OutputTooLargeError) as info:  # no float32 advice for float32
        equilibrium_covariance(torch.randn(15, 3), torch.randn(14, 3))
    assert "float32" not in str(info.value).split("available")[1].split("bounds")[0]
    monkeypatch.setattr(backend, "available_memory", lambda device: None)  # unknown: no guard
    assert equilibrium_covariance(torch.randn(11, 3)).shape == (11, 11)


def test_available_memory_is_a_plausible_byte_count():
    free = backend.available_memory(torch.device("cpu"))
    assert free is None or 0 < free < 2**50


@pytest.mark.parametrize("activation", ["relu", "erf", "tanh"])
def test_threads_give_the_serial_results(activation):
    """Concurrent calls (shared caches for tables and quadrature nodes, thread-local
    settings) give bitwise the results of serial calls, including gradients."""
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(40 + 7 * i, 5, generator=gen, dtype=torch.float64) for i in range(8)]
    variances = [0.3 + 0.05 * i for i in range(8)]

    def work(i):
        w = torch.tensor(variances[i], dtype=torch.float64, requires_grad=True)
        with settings.max_block_size(97 + i):  # each thread its own block size
            k = equilibrium_covariance(inputs[i], activation=activation, weight_variance=w, bias_variance=0.1)
        (grad,) = torch.autograd.grad(k.sum(), w)
        return k.detach(), grad

    serial = [work(i) for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            concurrent = list(pool.map(work, range(8)))
            for (k, g), (k0, g0) in zip(concurrent, serial, strict=True):
                assert torch.equal(k, k0)
                assert torch.equal(g, g0)
