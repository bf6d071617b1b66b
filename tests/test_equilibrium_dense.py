"""The dense solver (deq_kernel.equilibrium.dense) against the general solver and the fused ones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwd_ad

from deq_kernel import ConvergenceError, equilibrium_covariance, settings
from deq_kernel.equilibrium import dense
from deq_kernel.equilibrium.table import correlation_root

FAMILY = [("relu", 1.7), ("leaky_relu", 1.2), ("abs", 0.9), ("identity", 0.6), ("erf", 0.7)]


def _inputs(rng, n=23, m=9, d=4):
    x = torch.as_tensor(rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=(n, 1)))
    x[3] = x[0]  # identical points
    x[5] = 0.0  # a zero input (zero variance without bias)
    x[6] = -2.0 * x[1]  # collinear, opposite
    z = torch.as_tensor(rng.normal(size=(m, d)))
    return x, z


@pytest.mark.parametrize(("name", "w"), FAMILY)
@pytest.mark.parametrize("output", ["nngp", "preactivation", "ntk"])
@pytest.mark.parametrize("bias", [0.0, 0.3])
def test_dense_matches_the_general_solver_with_gradients(rng, name, w, output, bias):
    x, z = _inputs(rng)
    for second in (None, z):
        results = {}
        for solver in ("dense", "general"):
            xs = x.clone().requires_grad_(True)
            hypers = {
                "weight_variance": torch.tensor(w, dtype=torch.float64, requires_grad=True),
                "input_variance": torch.tensor([0.7, 1.3, 2.0, 0.4], dtype=torch.float64, requires_grad=True),
                "bias_variance": torch.tensor(bias, dtype=torch.float64, requires_grad=True),
            }
            with settings.pair_solver(solver):
                k = equilibrium_covariance(xs, second, activation=name, output=output, **hypers)
            weights = torch.linspace(-1.0, 1.0, k.numel(), dtype=torch.float64).reshape(k.shape)
            leaves = [xs, *hypers.values()]
            grads = torch.autograd.grad((k * weights).sum(), leaves, allow_unused=True)
            results[solver] = (k, grads)
        (k_d, g_d), (k_g, g_g) = results["dense"], results["general"]
        if name == "erf" and bias == 0.0:
            # The zero input has zero variance; erf's kernel is smooth there and the dense
            # solver's derivative is the true one (checked by finite differences below), where the
            # general solver's correlation variable is undefined and it returns 0: compare elsewhere.
            g_d, g_g = (
                (g_d[0][[i for i in range(len(x)) if i != 5]], *g_d[1:3]),
                (
                    g_g[0][[i for i in range(len(x)) if i != 5]],
                    *g_g[1:3],
                ),
            )
        scale = float(k_g.detach().abs().max())
        assert torch.allclose(k_d, k_g, rtol=0, atol=1e-13 * scale), float((k_d - k_g).abs().max())
        for a, b in zip(g_d, g_g, strict=True):
            if b is None:
                assert a is None or float(a.abs().max()) == 0.0
                continue
            # Relative to the gradient's scale (or, for a gradient that vanishes, the kernel's).
            assert torch.allclose(a, b, rtol=0, atol=1e-11 * max(float(b.abs().max()), 1e-3 * scale))
        if second is None:
            assert torch.equal(k_d, k_d.mT)  # bitwise symmetric


@pytest.mark.parametrize(("name", "w"), [("relu", 1.5), ("erf", 0.6)])
def test_dense_serves_batches_and_elementwise_pairs(rng, name, w):
    x = torch.as_tensor(rng.normal(size=(3, 12, 4)))
    z = torch.as_tensor(rng.normal(size=(3, 12, 4)))
    ws = torch.tensor([w, 0.5 * w, 0.0], dtype=torch.float64)  # one weight variance per batch entry
    for kw in (dict(), dict(diag=True)):
        with settings.pair_solver("dense"):
            ours = equilibrium_covariance(x, z, activation=name, weight_variance=ws, bias_variance=0.1, **kw)
        with settings.pair_solver("general"):
            ref = equilibrium_covariance(x, z, activation=name, weight_variance=ws, bias_variance=0.1, **kw)
        assert torch.allclose(ours, ref, rtol=0, atol=1e-14 * float(ref.abs().max()))


def test_dense_and_the_table_agree_where_the_plan_switches(rng):
    # 362 x 362 pairs take the dense solver, 363 x 363 the correlation table.
    assert 362**2 <= dense.DENSE_PAIRS < 363**2
    x = torch.as_tensor(rng.normal(size=(363, 5)))
    table = equilibrium_covariance(x, activation="relu", weight_variance=1.9, bias_variance=0.1)
    auto = equilibrium_covariance(x[:362], activation="relu", weight_variance=1.9, bias_variance=0.1)
    assert torch.allclose(auto, table[:362, :362], rtol=0, atol=1e-14 * float(table.abs().max()))


def test_float32_dense_agrees_with_float64(rng):
    x, z = _inputs(rng)
    for name, w in FAMILY:
        k64 = equilibrium_covariance(x, z, activation=name, weight_variance=w, bias_variance=0.1)
        k32 = equilibrium_covariance(x.float(), z.float(), activation=name, weight_variance=w, bias_variance=0.1)
        assert k32.dtype == torch.float32
        assert torch.allclose(k32.double(), k64, rtol=0, atol=3e-6 * float(k64.abs().max()))


def test_forward_mode_derivatives_are_the_implicit_ones(rng):
    # The dense solver is plain torch code: forward-mode tangents equal reverse-mode gradients.
    x, _ = _inputs(rng, n=10)
    for name, w in FAMILY:
        w0 = torch.tensor(w, dtype=torch.float64)
        with settings.pair_solver("dense"), fwd_ad.dual_level():
            k = equilibrium_covariance(x, activation=name, weight_variance=fwd_ad.make_dual(w0, torch.ones_like(w0)))
            _, tangent = fwd_ad.unpack_dual(k)
        wr = w0.clone().requires_grad_(True)
        k = equilibrium_covariance(x, activation=name, weight_variance=wr)
        rows = [torch.autograd.grad(k.reshape(-1)[i], wr, retain_graph=True)[0] for i in range(k.numel())]
        assert torch.allclose(tangent.reshape(-1), torch.stack(rows), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("a", [0.0, 0.01, -1.0, 1.0, 0.5])
def test_correlation_root_solves_the_pair_equation(a):
    m = (1.0 + a * a) / 2.0
    w = torch.tensor(0.98 / m, dtype=torch.float64)  # near the bound: the slowest case
    lo, hi = -1.0 + float(w) * a, 1.0 - float(w) * m  # G(-1), G(1)
    c = torch.linspace(lo, hi, 2001, dtype=torch.float64)
    rho, kappa, kappa_prime = correlation_root(a, c, w)
    theta = torch.arccos(rho)
    k1 = (1.0 - a) ** 2
    exact_kappa = k1 * (torch.sin(theta) + (math.pi - theta) * rho) / (2.0 * math.pi) + a * rho
    assert torch.allclose(kappa, exact_kappa, rtol=0, atol=1e-15)
    eps = torch.finfo(torch.float64).eps
    assert bool(((rho - w * exact_kappa - c).abs() <= 2 * eps * (1.0 + (w * exact_kappa + c).abs())).all())
    assert torch.allclose(kappa_prime, k1 * (math.pi - theta) / (2.0 * math.pi) + a, rtol=0, atol=1e-15)
    # Past the ends of the range of G by rounding, the root is +-1.
    rho_out, _, _ = correlation_root(a, torch.tensor([lo - 4 * eps, hi + 4 * eps], dtype=torch.float64), w)
    assert rho_out.tolist() == [-1.0, 1.0]


def test_unconverged_dense_pairs_raise(rng, monkeypatch):
    x = torch.as_tensor(rng.normal(size=(20, 4)))
    with settings.pair_solver("dense"), settings.max_iterations(1):  # relu's diagonal has a closed form
        with pytest.raises(ConvergenceError, match="pair fixed point did not converge in 1 iterations"):
            equilibrium_covariance(x, activation="relu", weight_variance=1.9)
    monkeypatch.setattr(dense, "BOUND_EPS", 0.0)  # erf's a-posteriori bound can then never hold
    with settings.pair_solver("dense"), pytest.raises(ConvergenceError, match="erf pair fixed point did not converge"):
        equilibrium_covariance(x * 3.0, activation="erf", weight_variance=0.78)


def test_erf_derivatives_at_a_zero_input_without_bias_are_the_limits(rng):
    x, z = _inputs(rng, n=8)
    h = 1e-6

    def k(shift: float, bias: float = 0.0) -> torch.Tensor:
        y = x.clone()
        y[5, 1] += shift  # x[5] is the zero input
        return equilibrium_covariance(y, z, activation="erf", weight_variance=0.7, bias_variance=bias)

    xs = x.clone().requires_grad_(True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    out = equilibrium_covariance(xs, z, activation="erf", weight_variance=0.7, bias_variance=b)
    gx, gb = torch.autograd.grad(out.sum(), [xs, b])
    assert float(gx[5, 1]) == pytest.approx(float((k(h) - k(-h)).sum() / (2 * h)), rel=1e-6)
    assert float(gb) == pytest.approx(float((k(0.0, h) - k(0.0)).sum() / h), rel=1e-4)  # one-sided: b >= 0
    assert float(gx[5, 1]) != 0.0


@pytest.mark.parametrize(("name", "w"), [("relu", 1.5), ("erf", 0.6)])
def test_second_derivatives_raise_instead_of_being_wrong(rng, name, w):
    x, _ = _inputs(rng, n=10)
    weight = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    k = equilibrium_covariance(x, activation=name, weight_variance=weight, bias_variance=0.1)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(k.sum(), weight, create_graph=True)
    (first,) = torch.autograd.grad(k.sum(), weight)  # without a graph: fine
    assert torch.isfinite(first)


def test_the_ntk_solves_each_pair_once(rng, monkeypatch):
    x, z = _inputs(rng)
    calls = []
    root = dense.correlation_root

    def spy(*args):
        calls.append(args[1].shape)
        return root(*args)

    monkeypatch.setattr(dense, "correlation_root", spy)
    ntk = equilibrium_covariance(x, z, activation="relu", weight_variance=1.2, output="ntk")
    assert len(calls) == 1  # the value and K* come from one solve
    with settings.pair_solver("general"):
        reference = equilibrium_covariance(x, z, activation="relu", weight_variance=1.2, output="ntk")
    assert torch.allclose(ntk, reference, rtol=0, atol=1e-12 * float(reference.abs().max()))
