"""The DEQ neural tangent kernel: limits, properties, gradients, and finite-width networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import rel_err
from reference import FUNCTIONS, closed_form_dual, quadrature_dual
from torch.func import functional_call, jacrev

from deq_kernel import ACTIVATIONS, equilibrium_covariance, get_activation
from deq_kernel.finite import DEQNetwork, network_generator

NTK_ACTIVATIONS = [a for a in ACTIVATIONS if a != "step"]


def _derivative_dual(name: str, q1, q2, c):
    """E[phi'(u) phi'(v)] independently: arc-cosine of degree 0 for relu, quadrature otherwise."""
    if name == "relu":
        g = np.sqrt(q1 * q2)
        return (np.pi - np.arccos(np.clip(c / g, -1, 1))) / (2 * np.pi)
    act = get_activation(name)
    d = lambda x: act.derivative(torch.as_tensor(x)).numpy()  # noqa: E731
    return quadrature_dual(d, q1, q2, c, h=0.05)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh", "sin"])
def test_zero_weight_variance_is_the_one_hidden_layer_ntk(rng, name):
    """Without feedback: Theta = sigma_v^2 (E[phi phi] + E[phi' phi'] s) under s."""
    x = rng.normal(size=(5, 3))
    ov, b = 1.4, 0.3
    theta = equilibrium_covariance(
        x, activation=name, weight_variance=0.0, bias_variance=b, output_variance=ov, output="ntk"
    )
    s = x @ x.T / 3 + b
    dg = np.diag(s)
    q1, q2 = dg[:, None], dg[None, :]
    value = (
        closed_form_dual(name, q1, q2, s)
        if name in ("relu", "erf", "sin")
        else quadrature_dual(FUNCTIONS[name], q1, q2, s)
    )
    expected = ov * (value + _derivative_dual(name, q1, q2, s) * s)
    assert rel_err(theta, expected) <= 1e-10


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_formula_against_independent_pieces(rng, name):
    """Theta = k + sigma_v^2 E' K* / (1 - sigma_w^2 E') with each piece computed independently."""
    x = rng.normal(size=(5, 2))
    w, ov, b = 0.6, 0.9, 0.2
    kw = dict(activation=name, weight_variance=w, bias_variance=b)
    cov = equilibrium_covariance(x, output="preactivation", **kw).numpy()
    value = equilibrium_covariance(x, **kw).numpy()
    dg = np.diag(cov)
    slope = _derivative_dual(name, dg[:, None], dg[None, :], cov)
    expected = ov * (value + slope * cov / (1 - w * slope))
    theta = equilibrium_covariance(x, output="ntk", output_variance=ov, **kw)
    assert rel_err(theta, expected) <= 1e-9


@pytest.mark.parametrize("name", NTK_ACTIVATIONS)
def test_symmetric_positive_definite_and_diagonal_paths(rng, name):
    x = torch.as_tensor(rng.normal(size=(10, 3)))
    z = torch.as_tensor(rng.normal(size=(10, 3)))
    kw = dict(
        activation=name,
        weight_variance=0.5 * min(get_activation(name).weight_variance_bound, 2.0),
        bias_variance=0.1,
        output="ntk",
    )
    theta = equilibrium_covariance(x, **kw)
    assert torch.equal(theta, theta.mT)
    assert torch.equal(theta.diagonal(), equilibrium_covariance(x, diag=True, **kw))
    cross = equilibrium_covariance(x, z, **kw)
    assert torch.allclose(cross.diagonal(), equilibrium_covariance(x, z, diag=True, **kw), rtol=1e-12, atol=1e-14)
    eig = torch.linalg.eigvalsh(theta)
    if name == "identity":
        assert eig.min() > -1e-12 * eig.max()
    else:
        assert eig.min() > 1e-8 * eig.max()


@pytest.mark.parametrize("name", ["relu", "erf", "gelu", "tanh"])
def test_ntk_gradcheck(rng, name):
    x1 = torch.as_tensor(rng.normal(size=(4, 2))).requires_grad_()
    x2 = torch.as_tensor(rng.normal(size=(3, 2))).requires_grad_()
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ov = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def f(x1, x2, w, b, ov):
        return equilibrium_covariance(
            x1, x2, activation=name, weight_variance=w, bias_variance=b, output_variance=ov, output="ntk"
        )

    def g(x1, w, b):
        return equilibrium_covariance(x1, activation=name, weight_variance=w, bias_variance=b, output="ntk")

    assert torch.autograd.gradcheck(f, (x1, x2, w, b, ov))
    assert torch.autograd.gradcheck(g, (x1, w, b))


def test_step_has_no_ntk():
    with pytest.raises(ValueError, match="step activation has no neural tangent kernel"):
        equilibrium_covariance(np.ones((2, 2)), activation="step", output="ntk")


def test_ntk_bound_is_the_activation_bound():
    with pytest.raises(ValueError, match="weight_variance must be < 2"):
        equilibrium_covariance(np.ones((2, 2)), weight_variance=2.0, output="ntk")


def test_ntk_exceeds_nngp_part(rng):
    """Theta - k = sigma_v^2 E' K* / (1 - w E') is itself a PSD kernel."""
    x = torch.as_tensor(rng.normal(size=(8, 3)))
    theta = equilibrium_covariance(x, weight_variance=1.5, output="ntk")
    k = equilibrium_covariance(x, weight_variance=1.5)
    assert torch.linalg.eigvalsh(theta - k).min() > -1e-12
    # The relu diagonal: Theta(x, x) = q/2 + (1/2) q / (1 - w/2) with q = s / (1 - w/2).
    s = (x * x).sum(-1) / 3
    q = s / (1 - 0.75)
    assert torch.allclose(theta.diagonal(), q / 2 + 0.5 * q / (1 - 0.75), rtol=1e-14)


@pytest.mark.parametrize("name", ["relu", "tanh"])
def test_ntk_float32(rng, name):
    x = rng.normal(size=(12, 4))
    kw = dict(activation=name, weight_variance=0.7, output="ntk")
    a = equilibrium_covariance(torch.as_tensor(x), **kw)
    b = equilibrium_covariance(torch.as_tensor(x, dtype=torch.float32), **kw)
    assert rel_err(b.double(), a) <= 1e-5


def test_derivative_duals_match_quadrature():
    for name in ("relu", "leaky_relu", "abs", "erf", "sin", "cos", "gelu"):
        act = get_activation(name)
        der = act.derivative_activation()

        def d(x, act=act):
            return act.derivative(torch.as_tensor(x)).numpy()

        for q1, q2, rho in [(1.0, 0.7, 0.3), (2.0, 0.5, -0.6)]:
            t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
            s1, s2 = der.prepare(t(q1), t(q2))
            value = float(der.pair_dual(s1, s2, t(rho))[0])
            expected = float(
                quadrature_dual(
                    d, q1, q2, rho * math.sqrt(q1 * q2), h=0.01 if name in ("relu", "leaky_relu", "abs") else 0.05
                )
            )
            # Piecewise-constant derivatives converge only like h in the trapezoid rule.
            tol = 2e-3 if name in ("relu", "leaky_relu", "abs") else 1e-10
            assert value == pytest.approx(expected, rel=tol, abs=tol)
            # and V_c of the activation itself is the same quantity
            s1a, s2a = act.prepare(t(q1), t(q2))
            assert float(act.pair_dual(s1a, s2a, t(rho))[1]) == pytest.approx(value, rel=1e-12)


def _empirical_ntk(x: torch.Tensor, width: int, seed: int, kw: dict) -> torch.Tensor:
    """The NTK of one finite DEQ: Jacobians of its outputs (torch.func, implicit gradients).

    :class:`~deq_kernel.finite.DEQNetwork` stores the scaled weights (``W`` with variance
    ``weight_variance / width``, ...), the standard parameterisation, whereas the kernel is
    derived in the NTK parameterisation, ``W = sigma_w W~ / sqrt(width)`` with ``W~`` trained
    (see :mod:`deq_kernel.equilibrium.ntk`). The chain rule gives ``df/dW~ = (sigma_w / sqrt(width)) df/dW``,
    so each parameter's Jacobian product is weighted by its initial variance.
    """
    d = x.shape[-1]
    net = DEQNetwork(d, width, generator=network_generator(seed), dtype=x.dtype, tol=1e-8, **kw)
    params = {name: p.detach() for name, p in net.named_parameters()}
    # chunk_size=1: one vector-Jacobian product (one adjoint solve) per output, no vmap.
    jac = jacrev(lambda p: functional_call(net, p, (x,))[:, 0], chunk_size=1)(params)
    variance = {
        "input_weight": kw["input_variance"] / d,
        "weight": kw["weight_variance"] / width,
        "bias": kw["bias_variance"],
        "output_weight": kw["output_variance"] / width,
    }
    flat = {name: j.reshape(len(x), -1) for name, j in jac.items()}
    return sum(variance[name] * flat[name] @ flat[name].mT for name in flat)


def test_ntk_is_the_limit_of_finite_deq_ntks(rng):
    """One finite DEQ's empirical NTK (all of U, W, b, v) approaches output="ntk" like 1/sqrt(width).

    Measured (relu, 6 inputs in R^4, 8 networks per width): the mean relative Frobenius error of
    one network's NTK falls from 0.28 (width 64) through 0.13 (256) to 0.077 (1024), and the
    NTK averaged over the 8 networks of width 1024 is within 0.019 of the kernel.
    """
    kw = dict(activation="relu", weight_variance=0.5, input_variance=1.0, bias_variance=0.2, output_variance=1.3)
    x = torch.as_tensor(rng.normal(size=(6, 4)))
    theta = equilibrium_covariance(x, output="ntk", **kw)
    widths, seeds = [64, 256, 1024], range(8)
    per_network, averaged = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small products: one thread is fastest, and several slow down on busy cores
    try:
        for width in widths:
            kernels = torch.stack([_empirical_ntk(x, width, 1000 * width + seed, kw) for seed in seeds])
            errors = torch.linalg.matrix_norm(kernels - theta) / torch.linalg.matrix_norm(theta)
            per_network.append(float(errors.mean()))
            averaged.append(float(torch.linalg.matrix_norm(kernels.mean(0) - theta) / torch.linalg.matrix_norm(theta)))
    finally:
        torch.set_num_threads(threads)
    assert per_network[0] > per_network[1] > per_network[2]
    slope = np.polyfit(np.log(widths), np.log(per_network), 1)[0]
    assert -0.8 < slope < -0.3, (per_network, slope)  # fluctuations of order 1/sqrt(width)
    assert averaged[-1] < 0.05, averaged


def _fixed_point_50_digits(x, activation: str, w: float, iv: float, b: float, ov: float, output: str = "ntk"):
    """The kernel from the diagonal and pair fixed points solved at 50 digits, by bracketed root finding.

    ``activation`` names a closed form: ``("leaky", a)``-style strings ``"leaky:a"``, ``"cos"``,
    ``"step"``, ``"gelu"`` or ``"erf"``; each gives the diagonal dual, the pair dual ``V(q1, q2, c)`` and the
    derivative dual ``E(q1, q2, c)`` as written in their papers.
    """
    import mpmath as mp

    with mp.workdps(50):
        w, iv, b, ov = (mp.mpf(v) for v in (w, iv, b, ov))
        rows = [[mp.mpf(float(v)) for v in r] for r in x]
        d = len(rows[0])
        if activation.startswith("leaky:"):
            a = mp.mpf(activation.split(":")[1])
            g, m = (1 - a) ** 2 / (2 * mp.pi), (1 + a * a) / 2

            def pair(q1, q2, c):
                r = mp.sqrt(q1 * q2)
                t = mp.acos(max(min(c / r, 1), -1))
                return r * (g * (mp.sin(t) + (mp.pi - t) * mp.cos(t)) + a * mp.cos(t)), a + g * (mp.pi - t)

            def diag(q):
                return m * q

        elif activation == "cos":

            def pair(q1, q2, c):
                damp = mp.exp(-(q1 + q2) / 2)
                return damp * mp.cosh(c), damp * mp.sinh(c)

            def diag(q):
                return (1 + mp.exp(-2 * q)) / 2

        elif activation == "step":

            def pair(q1, q2, c):
                return (mp.pi - mp.acos(max(min(c / mp.sqrt(q1 * q2), 1), -1))) / (2 * mp.pi), 0

            def diag(q):
                return mp.mpf(0.5)

        elif activation == "gelu":
            # E[phi'(u) phi'(v)] as (1 + d/dl)(1 + d/dm) of E[Phi(l u) Phi(m v)] = 1/4 + asin(r)/(2 pi),
            # r = l m c / sqrt((l^2 q1 + 1)(m^2 q2 + 1)), at l = m = 1 by the chain rule; V by Price's
            # theorem: E[phi(u)] E[phi(v)] plus the integral of that from 0 to c.
            def slope_at(q1, q2, c):
                a, b = q1 + 1, q2 + 1
                r, one_minus = c / mp.sqrt(a * b), (a * b - c * c) / (a * b)
                r_l, r_m, r_lm = c / (mp.sqrt(b) * a**1.5), c / (mp.sqrt(a) * b**1.5), c / (a * b) ** 1.5
                first = (r_l + r_m) / mp.sqrt(one_minus)
                mixed = r_lm / mp.sqrt(one_minus) + r_l * r_m * r / one_minus**1.5
                return mp.mpf(1) / 4 + (mp.asin(r) + first + mixed) / (2 * mp.pi)

            def pair(q1, q2, c):
                mean = q1 / mp.sqrt(2 * mp.pi * (1 + q1)) * q2 / mp.sqrt(2 * mp.pi * (1 + q2))
                return mean + mp.quad(lambda t: slope_at(q1, q2, t), [0, c]), slope_at(q1, q2, c)

            def diag(q):
                return pair(q, q, q)[0]

        else:  # erf

            def pair(q1, q2, c):
                r = mp.sqrt((q1 + mp.mpf(0.5)) * (q2 + mp.mpf(0.5)))
                return 2 / mp.pi * mp.asin(c / r), 2 / mp.pi / mp.sqrt(r * r - c * c)

            def diag(q):
                return pair(q, q, q)[0]

        def s(i, j):
            return iv / d * mp.fsum(u * v for u, v in zip(rows[i], rows[j], strict=True)) + b

        def root(f, lo, hi):
            if f(hi) <= 0:  # the upper end (correlation one) is the root
                return hi
            return mp.findroot(f, (lo, hi), solver="illinois", tol=mp.mpf(10) ** -45, maxsteps=500)

        def diagonal(i):
            f, hi = (lambda t: t - w * diag(t) - s(i, i)), s(i, i) + 1
            while f(hi) < 0:  # q = w D(q) + s lies in [s, hi]
                hi *= 2
            return root(f, s(i, i), hi)

        q = [s(i, i) if w == 0 else diagonal(i) for i in range(len(rows))]
        out = np.empty((len(rows), len(rows)))
        for i in range(len(rows)):
            for j in range(i, len(rows)):  # every form is symmetric in the pair
                r = mp.sqrt(q[i] * q[j])
                if i == j or w == 0:  # without the equilibrium, K* = s
                    cov = q[i] if i == j else s(i, j)
                else:
                    cov = root(lambda t, i=i, j=j: t - w * pair(q[i], q[j], t)[0] - s(i, j), -r, r)
                value, slope = pair(q[i], q[j], cov)
                tangent = value + slope * cov / (1 - w * slope)
                out[i, j] = out[j, i] = float({"nngp": ov * value, "preactivation": cov, "ntk": ov * tangent}[output])
    return out


_COS_X = [[0.0, 0.0], [1.17982e-06, 6.84683e-07], [1.08442e-06, -1.20445e-06], [-1.99120e-07, 1.21002e-06]]
_COS_NEAR_X = [
    [4.616001984756528e-08, -1.7327834997949465e-07],
    [4.616001989472531e-08, -1.7327835015177303e-07],
    [1.334639784631216e-07, 1.9719700520622706e-06],
    [-8.885424030661786e-07, -9.628992581899867e-07],
    [2.18131665076449e-07, 1.744326467487817e-06],
    [1.2064722936350411e-06, 5.986275116006324e-07],
]
_STEP_X = [[263556.128719064], [-1773964.7380981196], [306684.9774561852], [-1920305.3951625698], [1346180.67890585]]
_ERF_X = [[-534469.59], [1219645.48], [817950.91], [1397580.49], [1031971.27]]
_GELU_X = [[89552.95778940094], [89552.95787905391], [72312.04970471389], [72188.65471252028], [20388.03907022545]]
#: (activation, its reference closed form, inputs, (w, iv, b, ov), output, what went wrong)
NEAR_ONE = [
    # Inputs a millionth apart with a large bias near the bound: the pair equation's
    # correlation is a difference of numbers near one (entries were 1.7e-5 off).
    (
        "relu",
        "leaky:0",
        [[0.0], [-6.0055e-07], [1.11656e-06], [8.8881e-07], [2.5923e-07]],
        (1.99422, 9.92, 2.66, 2.13),
        "ntk",
    ),
    # Points a few ulps of s apart (taken for identical before, 1.4e-7 off).
    (
        "abs",
        "leaky:-1",
        [[1.01097e-07], [1.01097e-07], [1.31574e-07], [-5.13914e-07]],
        (0.8038, 5.34, 1.82, 0.85),
        "ntk",
    ),
    (
        "leaky_relu",
        "leaky:0.01",
        [[0.0335821], [0.0335821], [-0.0270971], [0.0534266]],
        (1.96197, 3.84, 0.0, 0.88),
        "ntk",
    ),
    (
        "relu",
        "leaky:0",
        [[0.3, -0.2], [0.3 + 1e-9, -0.2], [0.3, -0.2 - 3e-8], [-0.1, 0.5]],
        (1.999, 1.0, 0.5, 1.0),
        "ntk",
    ),
    # cos near its bound at scale 1e-6: the rounding of rho reached the NTK squared (1e-11).
    ("cos", "cos", [*_COS_X, [-1.17982e-06, -6.84683e-07]], (1.99251, 6.76291, 1.89509, 2.64468), "ntk"),
    # cos near its bound at scale 1e-7, with near-duplicate rows (sweep seed 9): every pair is
    # near one, and the NNGP kernel's rounding gave an eigenvalue of -1.06e-12 of its largest entry.
    *[("cos", "cos", _COS_NEAR_X, (1.99818, 6.31866, 3.43312, 1.07184), out) for out in ("nngp", "preactivation")],
    # erf at scale 1e6, collinear: the rounding of t reached the entries as eps sqrt(q) through
    # the arcsine's slope (NNGP 2e-10, NTK 1e-4 off).
    *[("erf", "erf", _ERF_X, (0.25832, 5.56835, 0.0, 1.28589), out) for out in ("nngp", "preactivation", "ntk")],
    # gelu without the equilibrium at scale 1e5, near-duplicate rows (sweep seed 9): the
    # complement q1 q2 - K*^2 from the rounded correlation moved the derivative dual by 1e-12.
    ("gelu", "gelu", _GELU_X, (0.0, 3.5276, 4.5769, 1.58204), "ntk"),
    # The step at large weight variance and scale 1e5: its dual's slope is infinite at one.
    *[("step", "step", _STEP_X, (7.93842, 7.09872, 4.94066, 1.76057), out) for out in ("nngp", "preactivation")],
]


@pytest.mark.parametrize("name,form,x,hyper,output", NEAR_ONE)
def test_pairs_near_correlation_one_against_50_digit_fixed_points(name, form, x, hyper, output):
    """Pairs near correlation +-1 are re-solved in a complement of the correlation, to rounding (sweep misses)."""
    w, iv, b, ov = hyper
    k = equilibrium_covariance(
        torch.tensor(x, dtype=torch.float64),
        activation=name,
        output=output,
        weight_variance=w,
        input_variance=iv,
        bias_variance=b,
        output_variance=ov,
    ).numpy()
    ref = _fixed_point_50_digits(x, form, w, iv, b, ov, output)
    assert np.abs(k - ref).max() <= 5e-14 * np.abs(ref).max()
    assert np.linalg.eigvalsh(k).min() >= -1e-12 * np.abs(ref).max()
