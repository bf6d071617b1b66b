"""Smooth activations through Mehler's series in one fused pass (deq_kernel.equilibrium.series).

Checked against the general solver (the same call with ``settings.pair_solver("general")``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import picard_kernel

from deq_kernel import equilibrium_covariance, get_activation, settings
from deq_kernel.equilibrium import diagonal, pairs
from deq_kernel.equilibrium import series as mehler

SMOOTH = ["tanh", "sigmoid", "softplus", "silu", "gelu"]


def _general(monkeypatch, *args, **kwargs):
    """The same call through the general safeguarded Newton solver instead of the series solver."""
    with settings.pair_solver("general"):
        return equilibrium_covariance(*args, **kwargs)


def _spy_plans(monkeypatch):
    """Record the plans made and the pairs each hands to the general solver."""
    plans = []
    make = pairs.series_plan

    def spy(*args, **kwargs):
        plan = make(*args, **kwargs)
        exact = plan.exact
        plan.handed = plan.calls = 0

        plan.pairs = []

        def counted(i, j, *rest):
            plan.handed += i.numel()
            plan.calls += 1
            plan.pairs.append(set(zip(i.tolist(), j.tolist(), strict=True)))
            return exact(i, j, *rest)

        plan.exact = counted
        plans.append(plan)
        return plan

    monkeypatch.setattr(pairs, "series_plan", spy)
    return plans


def _tol(name: str) -> float:
    # The two paths integrate the Hermite coefficients on different grids (softplus's differ
    # by about 2e-12 of the largest entry); gelu is compared with its closed form.
    return 1e-10 if name == "gelu" else 1e-11


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("output", ["nngp", "preactivation", "ntk"])
def test_series_path_matches_the_general_solver(rng, monkeypatch, name, output):
    x = torch.as_tensor(rng.normal(size=(60, 4)) * rng.uniform(0.2, 3.0, size=(60, 1)))
    z = torch.as_tensor(rng.normal(size=(25, 4)))
    w = get_activation(name).weight_variance_bound * 0.7
    plans = _spy_plans(monkeypatch)
    for second in (None, z):
        kw = dict(activation=name, weight_variance=w, bias_variance=0.2, output=output)
        ours = equilibrium_covariance(x, second, **kw)
        general = _general(monkeypatch, x, second, **kw)
        scale = float(general.abs().max())
        assert torch.allclose(ours, general, rtol=0, atol=_tol(name) * scale)
        if second is None:
            assert torch.equal(ours, ours.mT)
    assert plans, "the series path was not taken"


@pytest.mark.parametrize("name", ["tanh", "softplus", "gelu"])
def test_series_path_matches_picard_iteration(rng, name):
    # An independent computation: the whole matrix by plain Picard iteration to 1e-14.
    x = rng.normal(size=(12, 3))
    w = get_activation(name).weight_variance_bound * 0.5
    ours = equilibrium_covariance(torch.as_tensor(x), activation=name, weight_variance=w, bias_variance=0.1)
    ref = picard_kernel(x, activation=name, weight_variance=w, bias_variance=0.1)
    assert np.allclose(ours.numpy(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["tanh", "softplus", "gelu"])
@pytest.mark.parametrize("output", ["nngp", "preactivation"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gradients_match_the_general_solver(rng, monkeypatch, name, output, symmetric):
    x0 = torch.as_tensor(rng.normal(size=(40, 3)))
    x0[7] = x0[3]  # identical points: handed to the general solver, value and gradient
    z0 = torch.as_tensor(rng.normal(size=(15, 3))) * 1.2
    w0 = get_activation(name).weight_variance_bound * 0.6
    weights = torch.as_tensor(rng.normal(size=(40, 40 if symmetric else 15)))
    plans = _spy_plans(monkeypatch)
    grads = []
    for run in (equilibrium_covariance, lambda *a, **k: _general(monkeypatch, *a, **k)):
        x = x0.clone().requires_grad_(True)
        z = z0.clone().requires_grad_(True)
        hyper = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (w0, 1.3, 0.2, 0.7)]
        k = run(
            x,
            None if symmetric else z,
            activation=name,
            weight_variance=hyper[0],
            input_variance=hyper[1],
            bias_variance=hyper[2],
            output_variance=hyper[3],
            output=output,
        )
        leaves = [x, *hyper[:3]] + ([hyper[3]] if output == "nngp" else []) + ([] if symmetric else [z])
        grads.append(torch.autograd.grad((k * weights).sum(), leaves))
    assert plans and (not symmetric or plans[0].handed > 0)
    for ours, general in zip(*grads, strict=True):
        assert torch.allclose(ours, general, rtol=0, atol=10 * _tol(name) * float(general.abs().max()))


def test_backward_reuses_the_handed_pairs_of_the_forward_pass(rng, monkeypatch):
    # The pairs handed to the general solver keep their graph from the forward pass: the
    # backward pass does not solve them again, and a second backward pass gives the same.
    x = torch.as_tensor(rng.normal(size=(30, 3)))
    x[5] = x[2]
    x.requires_grad_(True)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    plans = _spy_plans(monkeypatch)
    k = equilibrium_covariance(x, activation="tanh", weight_variance=w, bias_variance=0.2)
    assert plans[0].handed > 0 and plans[0].calls == 1
    weights = torch.as_tensor(rng.normal(size=(30, 30)))
    first = torch.autograd.grad((k * weights).sum(), [x, w], retain_graph=True)
    # The pairs whose gradient series alone missed its bound, even at the longer order, were
    # found in the forward pass and solved with the others there: no call in the backward pass.
    assert plans[0].calls == 1
    second = torch.autograd.grad((k * weights).sum(), [x, w])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_strongly_correlated_pairs_resolved_by_the_longer_series(rng, monkeypatch):
    # Pairs beyond the bulk order's reach (near-copies, correlation above 0.9) are summed to
    # order 128 before any goes to the general solver; tanh's coefficients decay fast enough
    # at this variance for the near-copies to be resolved there. Values against plain
    # Picard iteration on a 2-D quadrature, gradients against the general solver.
    x0 = torch.as_tensor(rng.normal(size=(12, 3)))
    x0[6:] = x0[:6] + 1e-3 * torch.as_tensor(rng.normal(size=(6, 3)))
    refined = []
    original = mehler._refined

    def spy(*args):
        out = original(*args)
        refined.append(int(out.value_resolved.sum()))
        return out

    monkeypatch.setattr(mehler, "_refined", spy)
    plans = _spy_plans(monkeypatch)
    kw = dict(activation="tanh", bias_variance=0.1)
    grads = []
    for run in (equilibrium_covariance, lambda *a, **k: _general(monkeypatch, *a, **k)):
        x = x0.clone().requires_grad_(True)
        w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        k = run(x, weight_variance=w, **kw)
        grads.append(torch.autograd.grad((k * torch.cos(x0 @ x0.T)).sum(), [x, w]))
        if run is equilibrium_covariance:
            ours = k.detach()
    assert refined and refined[0] >= 6 and plans
    # One longer-series solve serves both passes: the forward pass also took the pairs whose
    # gradient series alone missed its bound, and the backward pass read them back.
    assert len(refined) == 1
    ref = picard_kernel(x0.numpy(), weight_variance=0.5, **kw)
    assert np.allclose(ours.numpy(), ref, rtol=0, atol=1e-13 * np.abs(ref).max())
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12 * float(b.abs().max()))


def test_compiled_blocks_agree_with_eager(rng, monkeypatch):
    x = torch.as_tensor(rng.normal(size=(70, 5)))
    h = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    results = []
    for mode in (False, True):
        with settings.compile(mode), settings.max_block_size(1000):
            k = equilibrium_covariance(x, activation="tanh", weight_variance=h, bias_variance=0.1)
            (g,) = torch.autograd.grad(k.sum(), h)
        results.append((k.detach(), g))
    (k0, g0), (k1, g1) = results
    assert torch.allclose(k0, k1, rtol=0, atol=1e-12) and torch.allclose(g0, g1, rtol=1e-12)


def test_small_blocks_give_the_same_matrix(rng):
    x = torch.as_tensor(rng.normal(size=(50, 3)))
    z = torch.as_tensor(rng.normal(size=(30, 3)))
    kw = dict(activation="softplus", weight_variance=1.0, bias_variance=0.1)
    for second in (None, z):
        whole = equilibrium_covariance(x, second, **kw)
        with settings.max_block_size(64):
            blocked = equilibrium_covariance(x, second, **kw)
        assert torch.allclose(whole, blocked, rtol=0, atol=1e-14)


def test_large_call_samples_order_and_steps(rng, monkeypatch):
    # n * m >= 16 * SAMPLE: the order and the Newton steps come from the sample of pairs.
    x = torch.as_tensor(rng.normal(size=(200, 16)))
    plans = _spy_plans(monkeypatch)
    ours = equilibrium_covariance(x, activation="tanh", weight_variance=0.5, bias_variance=0.1)
    (plan,) = plans
    assert plan.order < mehler.ORDERS[-1] and 1 <= plan.steps <= mehler.NEWTON_STEPS
    assert all(k % 2 == 1 for k in plan.exps)  # tanh is odd: the even coefficients are dropped
    general = _general(monkeypatch, x, activation="tanh", weight_variance=0.5, bias_variance=0.1)
    assert torch.allclose(ours, general, rtol=0, atol=1e-12)


def test_pairs_missing_the_newton_bound_go_to_the_general_solver(rng, monkeypatch):
    x = torch.as_tensor(rng.normal(size=(30, 3)) * 2.0)
    kw = dict(activation="sigmoid", weight_variance=12.0, bias_variance=0.1)
    expected = _general(monkeypatch, x, **kw)
    plans = _spy_plans(monkeypatch)
    monkeypatch.setattr(mehler, "NEWTON_STEPS", 0)  # the final correction alone: the bound fails
    got = equilibrium_covariance(x, **kw)
    assert plans[0].handed > 0
    assert torch.allclose(got, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


def test_zero_variance_points_use_the_general_solver(rng, monkeypatch):
    x = torch.as_tensor(rng.normal(size=(10, 3)))
    x[2] = 0.0
    plans = _spy_plans(monkeypatch)
    k = equilibrium_covariance(x, activation="tanh", weight_variance=0.5)  # no bias: q = 0 at x[2]
    assert not plans
    assert torch.isfinite(k).all()


@pytest.mark.parametrize("name", SMOOTH)
def test_hermite_slopes_are_derivatives_of_the_coefficients(name):
    act = get_activation(name)
    q = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=torch.float64)
    slopes, slope_total, weighted_total = act.hermite_slopes(q, 20)
    h = 1e-5 * q
    up, _ = act.hermite_expansion(q + h, 20)
    down, _ = act.hermite_expansion(q - h, 20)
    numeric = (up - down) / (2 * h)
    assert torch.allclose(slopes, numeric, rtol=1e-6, atol=1e-9)
    # The totals are the full sums of which the series keep the first terms: at small
    # variances, where the coefficients decay fast, sum (d a_k/dq)^2 and sum k a_k^2 to order
    # 200 reach them; everywhere, the first terms stay below them.
    small = q[:2]
    many = act.hermite_slopes(small, 200)[0]
    coef, _ = act.hermite_expansion(small, 200)
    k = torch.arange(201, dtype=torch.float64).unsqueeze(-1)
    assert torch.allclose((many * many).sum(0), slope_total[:2], rtol=1e-12, atol=0)
    assert torch.allclose((k * coef * coef).sum(0), weighted_total[:2], rtol=1e-12, atol=0)
    coef, _ = act.hermite_expansion(q, 20)
    assert bool(((slopes * slopes).sum(0) <= slope_total * (1 + 1e-12)).all())
    assert bool(((k[:21] * coef * coef).sum(0) <= weighted_total * (1 + 1e-12)).all())


@pytest.mark.parametrize("name", ["tanh", "softplus", "gelu", "erf"])
def test_interpolated_diagonal_matches_the_bracketed_solve(rng, name):
    act = get_activation(name)
    s = torch.as_tensor(rng.uniform(0.01, 50.0, size=500))
    w = torch.tensor(act.weight_variance_bound * 0.8, dtype=torch.float64)
    q, d, dd = diagonal.interpolated_diagonal(act, s, w)
    exact, d_exact, dd_exact = diagonal.bracketed_diagonal(act, s, w)
    assert torch.allclose(q, exact, rtol=1e-14, atol=0)
    assert torch.allclose(q, w * d + s, rtol=1e-14, atol=0)  # the fixed point itself
    assert torch.allclose(dd, act.diag_dual(q)[1], rtol=1e-12, atol=1e-15)
    # The bracketed solve's D and D', carried from its last evaluation, are those at its root.
    d_at, dd_at = act.diag_dual(exact)
    assert torch.allclose(d_exact, d_at, rtol=1e-14, atol=0)
    assert torch.allclose(dd_exact, dd_at, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", ["tanh", "softplus", "erf"])
def test_diagonal_of_points_whose_variances_differ_by_rounding(name):
    # Points on a sphere (an input embedding of constant norm) have s equal up to an ulp:
    # the interpolation nodes then sat within rounding of each other and their barycentric
    # weights cancelled to inf - inf (erf: NaN variances, then a ConvergenceError in a BoTorch
    # loop; tanh: a ZeroDivisionError in its quadrature).
    act = get_activation(name)
    w = torch.tensor([0.4], dtype=torch.float64)
    for base in np.linspace(0.01, 5.0, 20):
        s = torch.tensor([base] * 70 + [np.nextafter(base, 0.0)] * 30, dtype=torch.float64)
        q, _ = diagonal.solve_diagonal(act, s, w)
        exact = diagonal.bracketed_diagonal(act, s, w)[0]
        assert torch.allclose(q, exact, rtol=1e-14, atol=0), base


@pytest.mark.parametrize("pairs_shape", [(7,), (3, 5)])
def test_hermite_series_power_table_agrees_with_horners_rule(rng, monkeypatch, pairs_shape):
    # Small arrays are summed from a table of powers, large ones by Horner's rule: the same
    # values, slopes and gradients to rounding; and the table's gradients are checked by gradcheck.
    from deq_kernel.activations import hermite

    terms = 40
    rho = torch.as_tensor(rng.uniform(-0.99, 0.99, size=pairs_shape)).requires_grad_(True)
    decay = np.arange(1, terms + 1, dtype=float).reshape(-1, *[1] * len(pairs_shape))
    a1 = torch.as_tensor(rng.normal(size=(terms, *pairs_shape)) / decay).requires_grad_(True)
    a2 = torch.as_tensor(rng.normal(size=(terms, *pairs_shape[-1:]))).requires_grad_(True)
    results = []
    for limit in (hermite.POWER_TABLE_ELEMENTS, 0):
        monkeypatch.setattr(hermite, "POWER_TABLE_ELEMENTS", limit)
        value, slope = hermite.HermiteSeries.apply(rho, a1, a2)
        weights = torch.linspace(-1.0, 2.0, value.numel(), dtype=value.dtype).reshape(value.shape)
        grads = torch.autograd.grad((value * weights).sum(), [rho, a1, a2])
        results.append((value.detach(), slope, *grads))
    for table, horner in zip(*results, strict=True):
        assert torch.allclose(table, horner, rtol=1e-13, atol=1e-13 * float(horner.abs().max()))
    monkeypatch.setattr(hermite, "POWER_TABLE_ELEMENTS", 1 << 16)
    assert torch.autograd.gradcheck(lambda r, b, c: hermite.HermiteSeries.apply(r, b, c)[0], (rho, a1, a2))


def test_saved_solutions_serve_a_backward_pass_with_other_blocks_and_a_second_one(monkeypatch):
    """The forward pass keeps its blocks' solutions (below SAVE_ELEMENTS pairs): the backward
    pass reads them in the forward's blocks even where settings.max_block_size changed in
    between, as often as the graph is kept, and agrees with solving again."""
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def gradient(save: int) -> list[torch.Tensor]:
        monkeypatch.setattr(mehler, "SAVE_ELEMENTS", save)
        w = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
        with settings.max_block_size(97):
            k = equilibrium_covariance(x, activation="tanh", weight_variance=w, bias_variance=0.1)
        weights = torch.linspace(0.5, 1.5, k.numel(), dtype=k.dtype).reshape(k.shape)
        return [torch.autograd.grad((k * weights).sum(), w, retain_graph=True)[0] for _ in range(2)]

    saved, solved = gradient(1 << 21), gradient(0)
    assert torch.equal(saved[0], saved[1])
    assert torch.allclose(saved[0], solved[0], rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["tanh", "gelu"])
def test_eager_newton_steps_stop_when_converged_with_the_same_result(rng, monkeypatch, name):
    # Eager blocks stop Newton's steps once the last two show the final, checked correction
    # will meet its bound; the result is that of the fixed number of steps to rounding.
    x = torch.as_tensor(rng.normal(size=(48, 6)))
    w = get_activation(name).weight_variance_bound * 0.5
    steps = []
    original = mehler._newton_step

    def counted(*args):
        steps.append(1)
        return original(*args)

    monkeypatch.setattr(mehler, "_newton_step", counted)
    adaptive = equilibrium_covariance(x, activation=name, weight_variance=w, bias_variance=0.1)
    taken = len(steps)
    make = mehler._forward_function
    monkeypatch.setattr(mehler, "_forward_function", lambda *args: make(*args[:-1], False))  # fixed steps
    steps.clear()
    fixed = equilibrium_covariance(x, activation=name, weight_variance=w, bias_variance=0.1)
    assert taken < len(steps) == mehler.NEWTON_STEPS
    assert torch.allclose(adaptive, fixed, rtol=0, atol=4e-16 * float(fixed.abs().max()))
    assert torch.equal(adaptive, adaptive.mT)


def test_newton_convergence_estimate():
    eps = torch.finfo(torch.float64).eps
    step = torch.tensor([0.0, 1e-6, 4e-5, 4e-5, float("nan"), 1e-3])
    last = torch.tensor([0.0, 1e-3, 0.017, 1e-3, 1e-2, 1e-3])
    # zero steps pass; 1e-6 after 1e-3 (C ~ 1) passes; 4e-5 after 0.017 (C ~ 0.14) passes;
    # 4e-5 after 1e-3 (C ~ 40: bound ~ 1.6e-13) does not; NaN does not; a step that does not shrink does not.
    assert mehler._converging(step, last, eps).tolist() == [True, True, True, False, False, False]
    assert mehler._converging(step, None, eps).tolist() == [True, True, False, False, False, False]
