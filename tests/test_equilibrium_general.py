"""The fixed-point solvers: convergence, the correlation table, settings."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

import deq_kernel
from deq_kernel import ConvergenceError, equilibrium_covariance, settings
from deq_kernel.activations import get_activation
from deq_kernel.equilibrium import diagonal, pairs
from deq_kernel.equilibrium.diagonal import solve_diagonal
from deq_kernel.equilibrium.general import solve_pairs
from deq_kernel.equilibrium.table import TABLE_SIZE, CorrelationTable


def _generic_relu_pairs(c_tilde: torch.Tensor, w: float) -> torch.Tensor:
    """rho* by the general safeguarded Newton solver (unit variances), not the table."""
    act = get_activation("relu")
    one = torch.ones_like(c_tilde)
    state = (one,)
    # s11 = s22 = 2 keeps every pair distinct (distance 4 - 2 c_tilde > 0).
    rho, _ = solve_pairs(
        act,
        state,
        state,
        c_tilde,
        2 * one,
        2 * one,
        torch.tensor(w, dtype=c_tilde.dtype),
        0.5 * one,
        0.5 * one,
        matrix=False,
    )
    return rho


@pytest.mark.parametrize("name,slope", [("relu", 0.0), ("leaky_relu", 0.3), ("abs", -1.0), ("identity", 1.0)])
@pytest.mark.parametrize("w_fraction", [0.01, 0.5, 0.995])
def test_correlation_table_matches_newton(name, slope, w_fraction):
    act = get_activation(name, **({"negative_slope": slope} if name == "leaky_relu" else {}))
    w = w_fraction * act.weight_variance_bound
    table = CorrelationTable(act, w, torch.float64, torch.device("cpu"))
    g_lo, g_hi = -1.0 + w * act.negative_slope, 1.0 - w * act.variance_gain
    c = torch.cat(
        [torch.linspace(g_lo, g_hi, 20001, dtype=torch.float64), torch.tensor([g_lo, g_hi], dtype=torch.float64)]
    )
    rho, kappa, _, _ = table.solve(c)
    # Residual of rho - w kappa(rho) = c at rounding level (a few ulps of |rho| + |c| <= 3),
    # everywhere including both ends.
    k, _ = act.kappa(rho)
    assert torch.max(torch.abs(rho - w * k - c)) <= 2e-15
    assert torch.max(torch.abs(kappa - k)) <= 2e-15
    if name == "relu":
        # The general solver stops at a residual of 64 eps; in rho that is 64 eps / G'(rho),
        # and G' = 1 - w kappa' falls to 1 - w/2 near rho = 1.
        reference = _generic_relu_pairs(c, w)
        assert torch.max(torch.abs(rho - reference)) <= 1e-14 / (1 - w * act.variance_gain)


def test_table_end_slopes_match_the_interior():
    """The analytic limits of d theta / d phi at both ends continue the interior values."""
    act = get_activation("relu")
    table = CorrelationTable(act, 1.3, torch.float64, torch.device("cpu"))
    h = math.pi / TABLE_SIZE
    c0, c1 = table.coefs[0], table.coefs[1]
    slopes = c1 / h
    # theta(phi) is analytic, so the slope changes by O(h) between neighbours.
    assert abs(float(slopes[0] - slopes[1])) < 1e-2
    assert abs(float(slopes[-1] - slopes[-2])) < 1e-2
    assert float(c0[0]) == pytest.approx(math.pi)


@pytest.mark.parametrize("name", ["tanh", "erf", "gelu"])
def test_tiny_iteration_cap_raises_convergence_error(name):
    x = torch.randn(5, 3, dtype=torch.float64)
    with settings.max_iterations(1), pytest.raises(ConvergenceError) as info:
        equilibrium_covariance(x, activation=name, weight_variance=0.7, bias_variance=0.1)
    err = info.value
    assert err.residual > 0 and err.iterations == 1
    assert "did not converge in 1 iterations" in str(err)
    # The cap is scoped: afterwards the same call succeeds.
    assert torch.isfinite(equilibrium_covariance(x, activation=name, weight_variance=0.7, bias_variance=0.1)).all()


def test_diagonal_fixed_point_satisfies_its_equation():
    act = get_activation("tanh")
    s = torch.tensor([0.0, 0.1, 1.0, 30.0], dtype=torch.float64)
    w = torch.tensor(0.99, dtype=torch.float64)
    q, d = solve_diagonal(act, s, w)
    assert torch.allclose(q, w * d + s, rtol=1e-14, atol=1e-300)
    assert q[0] == 0.0


_DIAGONAL_DUALS = {
    # D(q) = E[phi(u)^2], u ~ N(0, q), in closed form, written independently of the library.
    "erf": lambda q: (2.0 / math.pi) * np.arcsin(2.0 * q / (1.0 + 2.0 * q)),
    "sin": lambda q: -0.5 * np.expm1(-2.0 * q),  # without cancellation at small q
    "cos": lambda q: 0.5 * (1.0 + np.exp(-2.0 * q)),
}


@pytest.mark.parametrize("name", sorted(_DIAGONAL_DUALS))
@pytest.mark.parametrize("fraction", [0.3, 0.95])
def test_unbracketed_diagonal_newton_against_plain_fixed_point_iteration(name, fraction):
    # erf, sin and cos have a dual D concave or convex in q, and their diagonal is solved by
    # Newton's method without a bracket (monotone_diagonal). Reference: the plain fixed-point
    # iteration q <- w D(q) + s, a contraction under the bound, run to its limit.
    act = get_activation(name)
    assert act.offers.monotone_diagonal
    s = np.concatenate([[0.0, 1e-8], np.geomspace(1e-4, 1e4, 30)])
    w = fraction * act.weight_variance_bound
    q_ref = s.copy()
    for _ in range(3000):
        q_ref = w * _DIAGONAL_DUALS[name](q_ref) + s
    q, d = solve_diagonal(act, torch.as_tensor(s), torch.tensor(w, dtype=torch.float64))
    np.testing.assert_allclose(q.numpy(), q_ref, rtol=2e-14, atol=1e-300)
    np.testing.assert_allclose(d.numpy(), _DIAGONAL_DUALS[name](q_ref), rtol=1e-13, atol=1e-300)
    with settings.max_iterations(1), pytest.raises(ConvergenceError, match="diagonal fixed point did not converge"):
        solve_diagonal(act, torch.as_tensor(s), torch.tensor(w, dtype=torch.float64))


@pytest.mark.parametrize("name", ["tanh", "softplus", "sigmoid"])
def test_unbracketed_diagonal_newton_of_quadrature_activations_against_fixed_point_iteration(name):
    # Without a proof that D is concave or convex, the unbracketed Newton method is tried first
    # and checked as it goes. Where it holds it must give the fixed point: against plain
    # fixed-point iteration with an independent trapezoid rule for D.
    from reference import quadrature_diag

    act = get_activation(name)
    fn = {"tanh": np.tanh, "softplus": lambda x: np.logaddexp(0.0, x), "sigmoid": lambda x: 0.5 * (1 + np.tanh(x / 2))}
    s = np.concatenate([[0.0], np.geomspace(1e-4, 20.0, 11)])
    w = 0.8 * act.weight_variance_bound
    done = diagonal.monotone_diagonal(act, torch.as_tensor(s), torch.tensor(w, dtype=torch.float64))
    assert done is not None
    q_ref = s.copy()
    for _ in range(300):
        q_ref = w * quadrature_diag(fn[name], q_ref) + s
    np.testing.assert_allclose(done[0].numpy(), q_ref, rtol=1e-12, atol=1e-300)


def test_unbracketed_diagonal_newton_hands_over_to_the_bracket_where_its_check_fails(monkeypatch):
    # A dual that reports three times its slope at q = 0 makes 1 - w D' negative there near
    # the bound: the unbracketed attempt must give up (None) rather than step with it, and the
    # bracketed method, which never takes a step with a negative slope, finds the fixed point.
    act = get_activation("tanh")
    true_dual = type(act).diag_dual
    s = torch.linspace(0.0, 2.0, 30, dtype=torch.float64)
    w = torch.tensor(0.9 * act.weight_variance_bound, dtype=torch.float64)
    reference, _ = solve_diagonal(act, s, w)

    def misreported(self, q):
        d, dd = true_dual(self, q)
        return d, torch.where(q == 0, 3.0 * dd, dd)

    monkeypatch.setattr(type(act), "diag_dual", misreported)
    assert diagonal.monotone_diagonal(act, s, w) is None
    q, d = solve_diagonal(act, s, w)
    torch.testing.assert_close(q, w * d + s, rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(q, reference, rtol=1e-13, atol=1e-300)


def test_settings_validate_and_nest():
    with pytest.raises(ValueError, match="max_iterations must be a positive integer"):
        settings.max_iterations(0)
    with pytest.raises(ValueError, match="tolerance_factor must be a number >= 1"):
        settings.tolerance_factor(0.5)
    assert settings.max_iterations.value() == 100
    with settings.max_iterations(7):
        with settings.max_iterations(3):
            assert settings.max_iterations.value() == 3
        assert settings.max_iterations.value() == 7
    assert settings.max_iterations.value() == 100


def test_settings_are_thread_local():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name, value):
        with settings.max_iterations(value):
            barrier.wait()
            seen[name] = settings.max_iterations.value()

    threads = [threading.Thread(target=worker, args=(i, v)) for i, v in enumerate((5, 9))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0: 5, 1: 9}


def test_concurrent_calls_match_serial(rng):
    xs = [torch.as_tensor(rng.normal(size=(30, 4))) for _ in range(6)]
    names = ["relu", "tanh", "erf", "relu", "gelu", "softplus"]
    serial = [equilibrium_covariance(x, activation=n, weight_variance=0.5) for x, n in zip(xs, names, strict=True)]
    results = [None] * len(xs)

    def worker(i):
        results[i] = equilibrium_covariance(xs[i], activation=names[i], weight_variance=0.5)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial, strict=True):
        assert torch.equal(a, b)


def test_near_duplicate_points_have_correlation_near_one(rng):
    """rho -> 1 smoothly for contractive activations as points merge."""
    x = rng.normal(size=(1, 3))
    for eps in (1e-4, 1e-8, 1e-12):
        pts = np.vstack([x, x + eps])
        for name in ("relu", "tanh"):
            k = equilibrium_covariance(pts, activation=name, weight_variance=0.5, output="preactivation").numpy()
            corr = k[0, 1] / np.sqrt(k[0, 0] * k[1, 1])
            assert 1 - 1e-6 < corr <= 1 + 1e-15


def test_step_kernel_is_discontinuous_on_the_diagonal():
    """The step's correlation map repels rho = 1: nearby distinct points stay below cos(w / (pi q))."""
    x = np.array([[1.0, 0.5], [1.0, 0.5 + 1e-7], [1.0, 0.5]])
    w = 2.0
    k = equilibrium_covariance(x, activation="step", weight_variance=w, output="preactivation").numpy()
    q = k[0, 0]
    assert k[0, 2] == pytest.approx(q, rel=1e-15)  # an exact duplicate is the same point
    assert k[0, 1] / q < math.cos(w / (math.pi * q)) + 1e-6


def test_version_is_exposed():
    assert deq_kernel.__version__


@pytest.mark.parametrize("output", ["nngp", "ntk"])
def test_collinear_points_have_correlation_exactly_one(output):
    # x' = a x without bias: correlation +-1 exactly, which rounding would turn into
    # 1 - O(eps); the step's dual (and relu's tangent kernel) would amplify that to 1e-8.
    x = np.array([[0.1257302210933933], [1.2573022109339329], [-0.5029208843735732]])
    act = "step" if output == "nngp" else "relu"
    hyper = dict(activation=act, weight_variance=0.0, input_variance=0.5, bias_variance=0.0, output=output)
    joint = equilibrium_covariance(x, **hyper)
    for i in range(3):
        for j in range(3):
            cross = equilibrium_covariance(x[i : i + 1], x[j : j + 1], **hyper)
            assert float(cross) == pytest.approx(float(joint[i, j]), abs=1e-15)
    if output == "nngp":  # E[step(u) step(v)] = 1/2 for rho = 1 and 0 for rho = -1
        expected = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.5]])
        assert np.allclose(joint.numpy(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["tanh", "softplus"])  # the quadrature (Hermite series) activations
def test_series_order_chosen_from_a_sample_keeps_every_pair_exact(rng, monkeypatch, name):
    # 200 points: the series order is chosen for the correlations of a sample of pairs;
    # near-duplicate and strongly correlated points lie beyond it and must stay exact.
    base = rng.normal(size=(170, 48))
    x = np.vstack([base, base[:10] + 1e-3 * rng.normal(size=(10, 48)), 3.0 * base[10:20]])
    kw = dict(activation=name, weight_variance=0.6, bias_variance=0.2)
    chosen = []
    sample = pairs.sampled_coverage

    def spy(*args, **kwargs):
        chosen.append(sample(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(pairs, "sampled_coverage", spy)
    # The general solver's own choice (matrices take the series solver, tested there).
    with settings.pair_solver("general"):
        narrowed = equilibrium_covariance(x, **kw)
        cross = equilibrium_covariance(x, x[::-1].copy(), **kw)
    assert chosen[0] is not None and chosen[0] < 0.9  # the narrower order was used
    monkeypatch.setattr(pairs, "sampled_coverage", lambda *a, **k: None)
    with settings.pair_solver("general"):
        default = equilibrium_covariance(x, **kw)
    scale = float(default.abs().max())
    assert torch.allclose(narrowed, default, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(cross, default.flip(-1), rtol=0, atol=1e-12 * scale)


def test_few_elementwise_pairs_snap_collinear_correlations_as_the_bulk_phase_does():
    # x' = a x without bias has correlation exactly 1; rounding leaves it within an ulp or
    # two, where the relu dual's derivatives are singular: the few-pairs path snaps it as the
    # bulk phase does, so that its value and gradient agree with the matrix's diagonal.
    x1 = torch.as_tensor(np.random.default_rng(3).normal(size=(6, 3)))
    x2 = x1 * torch.tensor([1e-9, 0.5, 2.0, 3.0, 1e3, 0.1], dtype=torch.float64).unsqueeze(-1)
    grads = []
    for diag in (True, False):
        b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        with settings.pair_solver("general"):
            k = equilibrium_covariance(x1, x2, activation="relu", weight_variance=0.4, bias_variance=b, diag=diag)
        k = k if diag else k.diagonal()
        grads.append((k.detach(), *torch.autograd.grad(k.sum(), b)))
    (few_k, few_g), (bulk_k, bulk_g) = grads
    assert torch.allclose(few_k, bulk_k, rtol=1e-13, atol=0)
    # The bias gradient of the pair x' = 1e-9 x is a difference of terms 1e9 times larger
    # than itself (d sqrt(q1 q2)/db against d rho/db): both paths are exact to about
    # 1e9 epsilons there, and an unsnapped rho was off by 17%.
    assert torch.allclose(few_g, bulk_g, rtol=1e-6, atol=0)
