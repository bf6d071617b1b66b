"""Compiled and eager kernels, the fallback between them, block sizes and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from deq_kernel import equilibrium_covariance, settings
from deq_kernel.equilibrium import backend


@pytest.fixture
def fresh_backend(monkeypatch):
    """Forget earlier compilations and failures, and restore them afterwards."""
    backend.wait_compiled(600)
    for name, empty in (
        ("_variants", backend.OrderedDict()),
        ("_failures", {}),
        ("_succeeded", set()),
        ("_warned", set()),
    ):
        monkeypatch.setattr(backend, name, empty)
    return backend


def _relu_case(rng, grad: bool):
    x = torch.as_tensor(rng.normal(size=(150, 6))).requires_grad_(grad)
    z = torch.as_tensor(rng.normal(size=(70, 6)))
    w = torch.tensor(1.7, dtype=torch.float64, requires_grad=grad)
    return x, z, w


@pytest.mark.parametrize("name", ["relu", "erf"])
def test_compiled_kernels_agree_with_eager(rng, fresh_backend, name):
    x = torch.as_tensor(rng.normal(size=(120, 5)))
    z = torch.as_tensor(rng.normal(size=(60, 5)))
    w = 1.7 if name == "relu" else 0.7
    results = {}
    for mode in (False, True):
        with settings.compile(mode), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would not test compilation
            results[mode] = (
                equilibrium_covariance(x, activation=name, weight_variance=w, bias_variance=0.2),
                equilibrium_covariance(x, z, activation=name, weight_variance=w, output="preactivation"),
            )
    for eager, compiled in zip(results[False], results[True], strict=True):
        assert torch.allclose(eager, compiled, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["relu", "erf"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_compiled_gradients_agree_with_eager(rng, fresh_backend, name, symmetric):
    grads = {}
    for mode in (False, True):
        x, z, _ = _relu_case(rng, grad=True)
        w = torch.tensor(1.7 if name == "relu" else 0.7, dtype=torch.float64, requires_grad=True)
        # Blocks of 40 rows: a symmetric matrix then has squares and mirrored rectangles.
        with settings.compile(mode), settings.max_block_size(40 * 150):
            second = None if symmetric else z
            k = equilibrium_covariance(x, second, activation=name, weight_variance=w, bias_variance=0.1)
            (k**2).sum().backward()
        grads[mode] = (x.grad, w.grad)
        rng = __import__("numpy").random.default_rng(20231017)  # same draws for both modes
    for eager, compiled in zip(grads[False], grads[True], strict=True):
        assert torch.allclose(eager, compiled, rtol=1e-12, atol=1e-14)


def test_failed_compilation_falls_back_to_eager(rng, fresh_backend, monkeypatch):
    class Broken(backend._Variant):
        @property
        def compiled(self):
            def run(*args):
                raise RuntimeError("no C++ compiler")

            return run

    monkeypatch.setattr(backend, "_Variant", Broken)
    x = torch.as_tensor(rng.normal(size=(40, 3)))
    with settings.compile(False):
        expected = [equilibrium_covariance(x, activation=a, weight_variance=0.5) for a in ("relu", "tanh")]
    with (
        settings.compile(True),
        settings.pair_solver("table"),
        pytest.warns(RuntimeWarning, match="torch.compile is unavailable on cpu"),
    ):
        got = [equilibrium_covariance(x, activation="relu", weight_variance=0.5)]
    with settings.compile(True), warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per device, not per call
        got.append(equilibrium_covariance(x, activation="tanh", weight_variance=0.5))
        # Fused paths of their own (a few pairs, as the series hands over, are solved eagerly).
        with settings.pair_solver("arcsine"):
            equilibrium_covariance(x, activation="erf", weight_variance=0.5)
        with settings.pair_solver("general"):
            equilibrium_covariance(x, activation="sin", weight_variance=0.5)
    assert backend.compile_failed("cpu")  # given up after repeated failures
    for a, b in zip(expected, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_background_compilation_serves_eagerly_until_ready(rng, fresh_backend, monkeypatch):
    monkeypatch.setattr(backend, "COMPILE_MIN_ELEMENTS", 1)  # compile even these small arrays,
    monkeypatch.setattr(backend, "COMPILE_AFTER_SECONDS", 0.0)  # from the first call
    x = torch.as_tensor(rng.normal(size=(90, 5)))
    kw = dict(activation="relu", weight_variance=1.3, bias_variance=0.1)
    limits = {name: getattr(torch._dynamo.config, name, None) for name in ("recompile_limit", "cache_size_limit")}
    with settings.compile(False), settings.pair_solver("table"):
        eager = equilibrium_covariance(x, **kw)
    with settings.compile("auto"), settings.pair_solver("table"):
        first = equilibrium_covariance(x, **kw)  # served eagerly while the worker compiles
        assert backend.wait_compiled(600)
        assert any(v.state == "ready" for v in backend._variants.values())
        compiled = equilibrium_covariance(x, **kw)
    assert torch.equal(first, eager)
    assert torch.allclose(compiled, eager, rtol=1e-12, atol=1e-14)
    # The library's own compiled functions leave dynamo's process-wide settings alone.
    assert {name: getattr(torch._dynamo.config, name, None) for name in limits} == limits


def test_auto_compiles_only_large_arrays(fresh_backend):
    assert backend.fused(len, 100, torch.device("cpu")) is len
    with settings.compile(False):
        assert backend.fused(len, 1 << 30, torch.device("cpu")) is len
    with settings.compile("auto"):
        assert backend.fused(len, 1 << 30, torch.device("cpu")) is not len


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "erf", "tanh"])
def test_small_blocks_give_the_same_matrix(rng, name):
    x = torch.as_tensor(rng.normal(size=(2, 33, 4)))
    z = torch.as_tensor(rng.normal(size=(2, 17, 4)))
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)  # a table per batch entry for the relu family
    kw = dict(activation=name, weight_variance=w, bias_variance=0.1)
    whole = equilibrium_covariance(x, z, **kw), equilibrium_covariance(x, **kw)
    with settings.max_block_size(40):  # two rows per block
        blocked = equilibrium_covariance(x, z, **kw), equilibrium_covariance(x, **kw)
    for a, b in zip(whole, blocked, strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["relu", "erf"])
def test_small_blocks_give_the_same_gradients(rng, name):
    grads = []
    for block in (None, 25):
        x = torch.as_tensor(rng.normal(size=(20, 3))).requires_grad_()
        w = torch.tensor(1.2 if name == "relu" else 0.6, dtype=torch.float64, requires_grad=True)
        with settings.max_block_size(block):
            equilibrium_covariance(x, activation=name, weight_variance=w, output_variance=2.0).sum().backward()
        grads.append((x.grad, w.grad))
        rng = __import__("numpy").random.default_rng(20231017)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


def test_settings_validation():
    with pytest.raises(ValueError, match="compile must be 'auto', True or False"):
        settings.compile("yes")
    with pytest.raises(ValueError, match="max_block_size must be a positive integer"):
        settings.max_block_size(0)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, torch, deq_kernel

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    torch.manual_seed(0)
    n, m = 3000, 2500
    x, z = torch.randn(n, 32, dtype=torch.float64), torch.randn(m, 32, dtype=torch.float64)
    with torch.no_grad(), deq_kernel.settings.compile(COMPILE):
        deq_kernel.equilibrium_covariance(x, z, weight_variance=1.0)  # warm-up (and compilation)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak
        before = rss("VmRSS")
        k = deq_kernel.equilibrium_covariance(x, z, weight_variance=1.0, bias_variance=0.1)
        peak = rss("VmHWM")
    print(json.dumps({"extra": peak - before - k.numel() * 8, "output": k.numel() * 8}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc (Linux)")
@pytest.mark.parametrize("mode", [False, True])
def test_peak_extra_memory_is_at_most_twice_the_output(mode):
    script = f"COMPILE = {mode}\n" + _MEMORY_SCRIPT
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=900)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["extra"] <= 2 * figures["output"], figures


def test_auto_compiles_nothing_for_short_jobs(rng, fresh_backend, monkeypatch):
    monkeypatch.setattr(backend, "COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "_eager_seconds", 0.0)
    x = torch.as_tensor(rng.normal(size=(60, 4)))
    with settings.compile("auto"), settings.pair_solver("table"):
        equilibrium_covariance(x, activation="relu", weight_variance=1.0)
    assert backend._variants and all(v.state == "new" for v in backend._variants.values())
    assert 0.0 < backend._eager_seconds < backend.COMPILE_AFTER_SECONDS
