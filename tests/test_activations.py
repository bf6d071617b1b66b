"""Each dual activation against an independent computation of E[phi(u) phi(v)]."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from reference import FUNCTIONS, closed_form_dual, leaky, quadrature_dual
from scipy import integrate
from scipy.stats import norm

import deq_kernel
from deq_kernel.activations import (
    ACTIVATIONS,
    QuadratureActivation,
    estimate_weight_variance_bound,
    get_activation,
)

# (q1, q2, rho): moderate, unequal, strongly (anti-)correlated, tiny and large variances.
PAIRS = [
    (1.0, 1.0, 0.3),
    (0.5, 2.0, -0.7),
    (3.0, 0.2, 0.5),
    (1.3, 1.1, 0.999),
    (2.0, 2.0, -0.995),
    (0.01, 0.7, 0.2),
    (4.0, 5.0, 0.9),
]


def _dual(name: str, q1: float, q2: float, rho: float, **kwargs) -> tuple[float, float]:
    act = get_activation(name, **kwargs)
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    s1, s2 = act.prepare(t(q1), t(q2))
    value, slope = act.pair_dual(s1, s2, t(rho))
    return float(value), float(slope)


def _conditional_dual(outer, inner_mean, q1: float, q2: float, c: float) -> float:
    """E[phi(u) E[phi(v) | u]] by adaptive 1-D quadrature, split at the kink u = 0."""
    sd_cond = math.sqrt(max(q2 - c * c / q1, 0.0))

    def integrand(u: float) -> float:
        mu = c * u / q1
        return outer(u) * inner_mean(mu, sd_cond) * norm.pdf(u, scale=math.sqrt(q1))

    lim = 40.0 * math.sqrt(q1)
    return sum(
        integrate.quad(integrand, a, b, epsabs=1e-15, epsrel=1e-13, limit=200)[0] for a, b in ((-lim, 0.0), (0.0, lim))
    )


def _mean_relu(mu: float, sd: float) -> float:
    return mu * norm.cdf(mu / sd) + sd * norm.pdf(mu / sd) if sd > 0 else max(mu, 0.0)


def _mean_step(mu: float, sd: float) -> float:
    return norm.cdf(mu / sd) if sd > 0 else float(mu > 0)


@pytest.mark.parametrize("q1,q2,rho", PAIRS)
@pytest.mark.parametrize("slope", [0.0, 0.2, -1.0, 1.0])
def test_piecewise_linear_against_conditional_quadrature(q1, q2, rho, slope):
    c = rho * math.sqrt(q1 * q2)
    # E[leaky(v) | u] = E[relu(v) | u] - a E[relu(-v) | u]
    mean = lambda mu, sd: _mean_relu(mu, sd) - slope * _mean_relu(-mu, sd)  # noqa: E731
    expected = _conditional_dual(leaky(slope), mean, q1, q2, c)
    value, _ = _dual("leaky_relu", q1, q2, rho, negative_slope=slope)
    assert value == pytest.approx(expected, rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("q1,q2,rho", PAIRS)
def test_step_against_conditional_quadrature(q1, q2, rho):
    c = rho * math.sqrt(q1 * q2)
    expected = _conditional_dual(FUNCTIONS["step"], _mean_step, q1, q2, c)
    value, _ = _dual("step", q1, q2, rho)
    assert value == pytest.approx(expected, rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("rho", [-0.5, 0.0, 0.3])
def test_step_is_not_the_arcsine_kernel(rho):
    """(2/pi) arcsin(rho) belongs to the sign function; the step has (pi - arccos rho)/(2 pi)."""
    value, _ = _dual("step", 1.0, 1.0, rho)
    assert value == pytest.approx(0.25 + math.asin(rho) / (2 * math.pi), rel=1e-14)
    assert abs(value - (2 / math.pi) * math.asin(rho)) > 0.05


@pytest.mark.parametrize("name", ["erf", "sin", "cos", "gelu"])
@pytest.mark.parametrize("q1,q2,rho", PAIRS)
def test_smooth_closed_forms_against_2d_quadrature(name, q1, q2, rho):
    c = rho * math.sqrt(q1 * q2)
    expected = float(quadrature_dual(FUNCTIONS[name], q1, q2, c, h=0.05))
    value, _ = _dual(name, q1, q2, rho)
    scale = math.sqrt(
        float(quadrature_dual(FUNCTIONS[name], q1, q1, q1)) * float(quadrature_dual(FUNCTIONS[name], q2, q2, q2))
    )
    assert abs(value - expected) <= 1e-11 * scale


@pytest.mark.parametrize("name", ["relu", "abs", "identity", "step", "erf", "sin", "cos"])
@pytest.mark.parametrize("q1,q2,rho", PAIRS[:5])
def test_closed_forms_against_textbook_formulas(name, q1, q2, rho):
    expected = float(closed_form_dual(name, q1, q2, rho * math.sqrt(q1 * q2)))
    assert _dual(name, q1, q2, rho)[0] == pytest.approx(expected, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(
    "name", ["relu", "leaky_relu", "abs", "step", "erf", "sin", "cos", "gelu", "tanh", "softplus", "silu", "sigmoid"]
)
@pytest.mark.parametrize("q1,q2,rho", [(1.0, 1.0, 0.3), (0.5, 2.0, -0.7), (3.0, 0.2, 0.5)])
def test_slope_is_derivative_in_covariance(name, q1, q2, rho):
    """V_c = dV/dc (Price's theorem), against a central difference of V in c."""
    root = math.sqrt(q1 * q2)
    h = 1e-5
    up = _dual(name, q1, q2, rho + h / root)[0]
    down = _dual(name, q1, q2, rho - h / root)[0]
    assert _dual(name, q1, q2, rho)[1] == pytest.approx((up - down) / (2 * h), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("name", ["erf", "sin", "cos", "gelu", "tanh", "softplus", "silu", "sigmoid"])
def test_slope_is_dual_of_derivative(name):
    """V_c = E[phi'(u) phi'(v)], against quadrature of the derivative."""
    act = get_activation(name)
    d = lambda x: act.derivative(torch.as_tensor(x)).numpy()  # noqa: E731
    for q1, q2, rho in [(1.0, 0.6, 0.4), (2.0, 1.5, -0.8)]:
        expected = float(quadrature_dual(d, q1, q2, rho * math.sqrt(q1 * q2), h=0.05))
        assert _dual(name, q1, q2, rho)[1] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("q", [0.0, 1e-3, 0.7, 2.5])
def test_diagonal_dual_and_its_derivative(name, q):
    act = get_activation(name)
    qt = torch.tensor([q], dtype=torch.float64)
    value, slope = (float(t) for t in act.diag_dual(qt))
    fn = leaky(0.01) if name == "leaky_relu" else FUNCTIONS[name]
    if q > 0:
        expected = (
            float(quadrature_dual(fn, q, q, q, h=0.02)) if name not in ("relu", "leaky_relu", "abs", "step") else None
        )
        if expected is None:
            expected = float(closed_form_dual(name if name != "leaky_relu" else "leaky_relu", q, q, q, slope=0.01))
        assert value == pytest.approx(expected, rel=1e-10, abs=1e-14)
    else:
        assert value == pytest.approx(float(fn(np.zeros(1))[0]) ** 2, abs=1e-14)
    if name == "step" and q == 0.0:
        return  # D jumps from 0 to 1/2 at q = 0: no derivative to compare with
    h = 1e-6
    up = float(act.diag_dual(qt + h)[0])
    down = float(act.diag_dual((qt - h).clamp_min(0.0))[0])
    fd = (up - down) / (h + min(h, q))
    assert slope == pytest.approx(fd, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("q", [1e-6, 0.1, 1.0, 3.56, 40.0, 1e4])
def test_gelu_diagonal_slope_against_quadrature_of_the_heat_equation(q):
    """D'(q) = E[phi'(u)^2 + phi(u) phi''(u)], u ~ N(0, q), by adaptive quadrature (scipy).

    The closed form crosses zero in its second term near q = 3.56, where a wrong sign or
    factor would show; the finite-difference test above holds it only to 1e-5.
    """
    from scipy import integrate
    from scipy.stats import norm

    def integrand(z: float) -> float:
        x = math.sqrt(q) * z
        cdf, pdf = norm.cdf(x), norm.pdf(x)
        return ((cdf + x * pdf) ** 2 + x * cdf * pdf * (2.0 - x * x)) * norm.pdf(z)

    expected = integrate.quad(integrand, -12.0, 12.0, epsabs=1e-16, epsrel=1e-14, limit=400, points=[0.0])[0]
    slope = float(get_activation("gelu").diag_dual(torch.tensor([q], dtype=torch.float64))[1])
    assert slope == pytest.approx(expected, rel=1e-13, abs=1e-16)


PIECES = [(-np.inf, -2.0), (-2.0, 0.0), (0.0, 2.0), (2.0, np.inf)]


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus", "silu"])
@pytest.mark.parametrize("q", [45.0, 400.0])
def test_diagonal_dual_to_rounding_at_large_variance(name, q):
    """D(q) to 1e-13 where the activation is evaluated far out (softplus beyond torch's threshold of 20)."""
    value = float(get_activation(name).diag_dual(torch.tensor([q], dtype=torch.float64))[0])
    fn, root = FUNCTIONS[name], math.sqrt(q)

    def integrand(z: float) -> float:
        return float(fn(np.array([root * z]))[0]) ** 2 * norm.pdf(z)

    expected = sum(integrate.quad(integrand, a, b, epsabs=0.0, epsrel=2e-14, limit=200)[0] for a, b in PIECES)
    assert value == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus", "silu"])
@pytest.mark.parametrize("q1,q2,rho", PAIRS)
def test_quadrature_activations_against_2d_quadrature(name, q1, q2, rho):
    """Hermite-series duals (and their direct fallback near rho = 1) against an independent rule."""
    c = rho * math.sqrt(q1 * q2)
    expected = float(quadrature_dual(FUNCTIONS[name], q1, q2, c, h=0.05))
    value, _ = _dual(name, q1, q2, rho)
    scale = math.sqrt(
        float(quadrature_dual(FUNCTIONS[name], q1, q1, q1)) * float(quadrature_dual(FUNCTIONS[name], q2, q2, q2))
    )
    assert abs(value - expected) <= 1e-10 * scale


def test_series_falls_back_to_direct_quadrature_where_its_tail_is_large():
    act = get_activation("tanh")
    q = torch.tensor([40.0, 45.0], dtype=torch.float64)  # strongly saturated: slow Hermite decay
    s1, _ = act.prepare(q)
    rows = tuple(t.unsqueeze(-1) for t in s1)
    cols = tuple(t.unsqueeze(-2) for t in s1)
    rho = torch.tensor([[0.2, 0.9999], [0.9999, 0.3]], dtype=torch.float64)
    value, _ = act.pair_dual(rows, cols, rho)
    qn = q.numpy()
    c = rho.numpy() * np.sqrt(np.outer(qn, qn))
    expected = quadrature_dual(np.tanh, qn[:, None], qn[None, :], c, h=0.01)
    assert np.max(np.abs(value.numpy() - expected)) < 1e-9


@pytest.mark.parametrize("name", ["tanh", "softplus"])
def test_direct_quadrature_gradients_in_the_variances(name):
    """The two-dimensional rule's value re-enters the graph through its partial derivatives in
    ``q1``, ``q2`` and ``rho``: each against central differences of an independent rule."""
    act = get_activation(name)
    q = torch.tensor([40.0, 45.0], dtype=torch.float64, requires_grad=True)
    s1, _ = act.prepare(q)
    rows = tuple(t.unsqueeze(-1) for t in s1)
    cols = tuple(t.unsqueeze(-2) for t in s1)
    rho = torch.tensor([[0.2, 0.9999], [0.9999, 0.3]], dtype=torch.float64, requires_grad=True)
    value, _ = act.pair_dual(rows, cols, rho)
    grad_q, grad_rho = torch.autograd.grad(value[0, 1], (q, rho))

    def dual(q1: float, q2: float, r: float) -> float:
        return float(quadrature_dual(FUNCTIONS[name], q1, q2, r * math.sqrt(q1 * q2), h=0.01))

    dq, dr = 1e-3, 1e-7
    expected = [
        (dual(40.0 + dq, 45.0, 0.9999) - dual(40.0 - dq, 45.0, 0.9999)) / (2 * dq),
        (dual(40.0, 45.0 + dq, 0.9999) - dual(40.0, 45.0 - dq, 0.9999)) / (2 * dq),
        (dual(40.0, 45.0, 0.9999 + dr) - dual(40.0, 45.0, 0.9999 - dr)) / (2 * dr),
    ]
    got = [float(grad_q[0]), float(grad_q[1]), float(grad_rho[0, 1])]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["tanh", "softplus"])
@pytest.mark.parametrize("q", [1e4, 1e6])
@pytest.mark.parametrize("rho", [0.96, -0.9])
def test_direct_quadrature_of_large_variances_against_nested_adaptive_quadrature(name, q, rho):
    """The two-dimensional rule for strongly correlated pairs of large variance. On the
    ``(z1, z2)`` grid it resolved ``phi(v)``'s steep part only along the axes and erred by
    1e-4 (tanh, inputs of scale 100) to 2e-3 (scale 1e5) for correlations away from 0 and +-1,
    which a sweep caught as an eigenvalue of -4e-3 of a 6 x 6 tanh kernel."""
    import warnings

    from reference import nested_quadrature_dual

    act = get_activation(name)
    fn = {"tanh": math.tanh, "softplus": lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x)))}[name]
    q1, q2 = torch.tensor([q], dtype=torch.float64), torch.tensor([1.3 * q], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    value, _ = act._direct_pairs(q1, q2, torch.tensor([rho], dtype=torch.float64), torch.tensor([True]), zero, zero)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # QUADPACK's roundoff notes at the steep parts
        expected = nested_quadrature_dual(fn, q, 1.3 * q, rho)
    assert float(value) == pytest.approx(expected, rel=1e-11)


def test_direct_quadrature_keeps_no_nodes_for_the_backward_pass():
    """A graph through the integrand kept every pair's nodes (tens of thousands of numbers per
    pair): a few thousand strongly correlated pairs of large variances ran out of memory."""
    act = get_activation("tanh")
    q = torch.linspace(3e5, 4e5, 40, dtype=torch.float64).requires_grad_(True)
    s1, _ = act.prepare(q)
    rho = torch.full((40, 40), 0.99999, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value, _ = act.pair_dual(tuple(t.unsqueeze(-1) for t in s1), tuple(t.unsqueeze(-2) for t in s1), rho)
    value.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(rho.grad).all()
    assert sum(saved) <= 1000 * rho.numel(), sum(saved)


def test_callable_activation_matches_named():
    x = torch.randn(6, 3, dtype=torch.float64)
    named = deq_kernel.equilibrium_covariance(x, activation="tanh", weight_variance=0.6, bias_variance=0.2)
    custom = deq_kernel.equilibrium_covariance(x, activation=torch.tanh, weight_variance=0.6, bias_variance=0.2)
    assert torch.allclose(named, custom, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "fn,expected",
    [
        (torch.tanh, 1.0),
        (torch.sigmoid, 16.0),
        (torch.erf, math.pi / 4),
        (torch.nn.functional.silu, 1.7751175),
        (torch.sin, 1.0),
    ],
)
def test_estimated_bound(fn, expected):
    est = estimate_weight_variance_bound(QuadratureActivation(fn, weight_variance_bound=1.0))
    assert est == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize(
    "name,bound",
    [
        ("relu", 2.0),
        ("abs", 1.0),
        ("identity", 1.0),
        ("step", math.inf),
        ("erf", math.pi / 4),
        ("sin", 1.0),
        ("cos", 2.0),
        ("tanh", 1.0),
        ("sigmoid", 16.0),
        ("softplus", 2.0),
    ],
)
def test_declared_bounds(name, bound):
    assert get_activation(name).weight_variance_bound == bound


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_declared_bound_is_below_the_numerical_supremum(name):
    act = get_activation(name)
    assert act.weight_variance_bound <= estimate_weight_variance_bound(act) < act.weight_variance_bound * 1.001


def test_leaky_relu_bound_depends_on_slope():
    assert get_activation("leaky_relu", negative_slope=0.5).weight_variance_bound == pytest.approx(2 / 1.25)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="activation must be one of relu, leaky_relu"):
        get_activation("swish")


def test_bad_activation_options():
    with pytest.raises(
        TypeError, match="unexpected keyword argument 'negative_slope'; activation 'relu' takes no options"
    ):
        get_activation("relu", negative_slope=0.1)
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        get_activation("leaky_relu", negative_slope="0.1")
    with pytest.raises(TypeError, match="activation must be one of"):
        get_activation(3)
    with pytest.raises(TypeError, match="must return a tensor"):
        get_activation(lambda x: x.numpy())


@pytest.mark.parametrize("q", [1e-3, 1.0, 1e2, 1e6, 1e12])
def test_gelu_derivative_dual_is_the_covariance_derivative_at_every_scale(q):
    """E[gelu'(u) gelu'(v)] in closed form against the derivative of the value's closed form.

    The reference differentiates GELU's value expression numerically at 50 digits (the value
    itself is checked against 2-D quadrature above). Differentiating it in float64, term by
    term, was off by eps * q (7.6e-5 at q = 1e12, rho = 1): the NTK of near-duplicates at scale
    1e6 had eigenvalues of -7e-4 of its largest.
    """
    import mpmath as mp

    from deq_kernel.activations import Gelu

    def value(q1, q2, c):
        e = q1 * q2 - c * c
        a, b, det = q1 + 1, q2 + 1, q1 * q2 - c * c + q1 + q2 + 1
        root = mp.sqrt(det)
        pi_t = mp.pi - mp.atan2(root, c)
        prob, e_ab = pi_t / (2 * mp.pi), (root + pi_t * c) / (2 * mp.pi)
        e_sq = (pi_t + c * root / (a * b)) / (2 * mp.pi)
        alpha, beta, gamma = (e + q1) / det, c / det, (e + q2) / det
        return beta * prob + alpha * beta * a * e_sq + (alpha * gamma + beta * beta) * e_ab + beta * gamma * b * e_sq

    derivative = Gelu().derivative_activation()
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    with mp.workdps(50):
        for q2 in (q, 0.37 * q):
            for rho in (-1.0, -0.3, 0.5, 0.999, 1 - 1e-9, 1.0):
                c = mp.mpf(rho) * mp.sqrt(mp.mpf(q) * mp.mpf(q2))
                ref = mp.diff(lambda t, q2=q2: value(mp.mpf(q), mp.mpf(q2), t), c)
                curvature = mp.diff(lambda t, q2=q2: value(mp.mpf(q), mp.mpf(q2), t), c, 2)
                dual, slope = derivative.pair_dual((one(q),), (one(q2),), one(rho))
                scale = 0.5  # the dual's size at rho = 1: its values near rho = -1 are tiny differences
                assert abs(float(dual) - float(ref)) <= 2e-14 * scale, (q2, rho)
                assert abs(float(slope) - float(curvature)) <= 1e-13 * abs(float(curvature)), (q2, rho)
                if rho in (0.5, 1.0):  # Gelu's own slope forms c from rho first
                    assert abs(float(Gelu().pair_dual((one(q),), (one(q2),), one(rho))[1]) - float(ref)) <= 2e-14


def test_gelu_derivative_dual_does_not_depend_on_whether_the_variance_requires_grad():
    """The diagonal's derivative dual is a partial derivative in the covariance (regression).

    It was formed by autograd in ``c``; when ``q`` required a gradient, ``c`` and the variances
    were one tensor and the total derivative came back: the NTK of a GPyTorch model (whose
    hyperparameters require gradients) was 2% off the same kernel evaluated without them.
    """
    derivative = deq_kernel.get_activation("gelu").derivative_activation()
    for q in (0.3, 2.0, 50.0):
        root = math.sqrt(q)

        def integrand(z, root=root):
            return (norm.cdf(root * z) + root * z * norm.pdf(root * z)) ** 2 * norm.pdf(z)

        ref = integrate.quad(integrand, -np.inf, np.inf, epsabs=1e-15, limit=200)[0]
        plain = derivative.diag_dual(torch.tensor([q], dtype=torch.float64))[0]
        tracked = derivative.diag_dual(torch.tensor([q], dtype=torch.float64, requires_grad=True))[0]
        assert abs(float(plain) - ref) <= 1e-14 and float(tracked.detach()) == float(plain)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.tensor(1.0, dtype=torch.float64)
    plain = deq_kernel.equilibrium_covariance(x, activation="gelu", output="ntk", weight_variance=w)
    tracked = deq_kernel.equilibrium_covariance(x, activation="gelu", output="ntk", weight_variance=w.requires_grad_())
    assert torch.equal(plain, tracked.detach())


def test_a_misspelled_keyword_is_named_with_the_closest_valid_one():
    import deq_kernel

    x = torch.randn(3, 2, dtype=torch.float64)
    cases = [
        (
            lambda: deq_kernel.equilibrium_covariance(x, weight_varience=0.5),
            "'weight_varience' (did you mean 'weight_variance'?)",
        ),
        (
            lambda: deq_kernel.equilibrium_covariance(x, activation="leaky_relu", negative_slop=0.1),
            "did you mean 'negative_slope'?",
        ),
        (
            lambda: deq_kernel.equilibrium_covariance(x, activation=torch.tanh, derivativ=None),
            "did you mean 'derivative'?",
        ),
        (
            lambda: deq_kernel.DEQKernel("relu", weight_variance=1.5),
            "set it after construction: kernel.weight_variance = value",
        ),
        (lambda: deq_kernel.DEQKernel("relu", ard_num_dim=3), "did you mean 'ard_num_dims'?"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=re.escape(message)) as info:
            call()
        assert "<lambda>" not in str(info.value) and "_make_named" not in str(info.value)


def test_an_unsuitable_callable_is_refused_when_given():
    x = torch.randn(3, 2, dtype=torch.float64)
    from deq_kernel import equilibrium_covariance

    with pytest.raises(TypeError, match=r"differentiable by torch autograd: write it with torch operations"):
        equilibrium_covariance(x, activation=np.tanh, weight_variance=0.3)
    with pytest.raises(ValueError, match="use activation='step'"):
        equilibrium_covariance(x, activation=torch.sign, weight_variance=0.3)
    with pytest.raises(TypeError, match="must act elementwise"):
        equilibrium_covariance(x, activation=lambda t: t - t.mean(), weight_variance=0.3)
    # A smooth torch function is accepted as before.
    assert equilibrium_covariance(x, activation=torch.nn.functional.softsign, weight_variance=0.3).shape == (3, 3)


def test_quadrature_rules_are_shared_between_nearby_variances():
    """The map's scale is rounded down (a rule for a slightly larger variance), so calls share cached rules."""
    from deq_kernel.activations.hermite import _map_level, mapped_nodes, weighted_hermite_table

    for q_max in [0.0, 0.5, 1.0, 1.0001, 2.0, 45.0, 1e4, 1e16]:
        a = 2.0 ** (-_map_level(q_max) / 4)
        assert a <= min(1.0, 1.0 / math.sqrt(max(q_max, 1e-300))) * (1 + 1e-12)
        assert a > 2.0 ** (-1 / 4) * min(1.0, 1.0 / math.sqrt(max(q_max, 1e-300)))  # the largest such power
    assert mapped_nodes(3.0, 0.04, 9.0)[0] is mapped_nodes(3.1, 0.04, 9.0)[0]
    z, table = weighted_hermite_table(3.0, 0.04, 14.0, 64)
    assert table is weighted_hermite_table(3.1, 0.04, 14.0, 64)[1] and table.shape == (z.numel(), 65)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("rho", [0.9, 0.995, 0.9999999])
def test_quadrature_pair_dual_slope_and_gradient_at_high_correlation(name, rho):
    # Near rho = 1 the series of dV/drho (coefficients k a_k b_k) converges more slowly than
    # that of V: pairs whose slope the series does not resolve go to the top order or to the
    # two-dimensional rule, whose value must keep its derivative in rho for autograd (it
    # was lost, and NTK gradients through sigmoid's derivative dual came out 3.5% off).
    act = get_activation(name)
    q1, q2 = torch.tensor([1.3], dtype=torch.float64), torch.tensor([2.1], dtype=torch.float64)
    s1, s2 = act.prepare(q1, q2)
    r = torch.tensor([rho], dtype=torch.float64, requires_grad=True)
    value, slope = act.pair_dual(s1, s2, r)
    (by_autograd,) = torch.autograd.grad(value.sum(), r)
    # Price's theorem, by an independent trapezoid rule: dV/drho = sqrt(q1 q2) E[phi'(u) phi'(v)].
    z = np.arange(-12.0, 12.0 + 1e-9, 0.02)
    w = np.exp(-z * z / 2) * 0.02 / np.sqrt(2 * np.pi)
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    u = np.sqrt(1.3) * z1
    v = np.sqrt(2.1) * (rho * z1 + np.sqrt(1 - rho * rho) * z2)
    derivative = act.derivative(torch.as_tensor(u)).numpy() * act.derivative(torch.as_tensor(v)).numpy()
    expected = float((derivative * np.outer(w, w)).sum())
    assert float(slope) == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert float(by_autograd) == pytest.approx(expected * math.sqrt(1.3 * 2.1), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", ["tanh", "softplus", "gelu"])
@pytest.mark.parametrize("cover", [0.3, 0.8, 0.9])
def test_smallest_order_is_the_first_whose_tail_bound_holds(name, cover):
    from deq_kernel.activations.hermite import smallest_order

    q = torch.linspace(0.05, 30.0, 40, dtype=torch.float64)
    a, d = get_activation(name).hermite_expansion(q, 64)
    orders = (8, 16, 24, 32, 48, 64)
    tol = 1e-12

    def holds(k):  # the tail beyond order k, point by point
        return bool(((d - (a[: k + 1] ** 2).sum(0)) / d * cover ** (k + 1) <= tol).all())

    expected = next((k for k in orders if holds(k)), None)
    assert smallest_order([a, a[:, :5]], [d, d[:5]], orders, cover, tol) == expected
