r"""Dual activations: :math:`E[\phi(u)\phi(v)]` for a centred Gaussian pair, its derivatives, bounds.

For an elementwise activation :math:`\phi` and :math:`(u, v) \sim N(0, [[q_1, c], [c, q_2]])`
every activation here provides

* the *dual* :math:`V(q_1, q_2, c) = E[\phi(u)\phi(v)]`, written in terms of the
  correlation :math:`\rho = c / \sqrt{q_1 q_2}`;
* its derivative in the covariance, :math:`V_c = \partial V / \partial c = E[\phi'(u)\phi'(v)]`
  (Price's theorem), which is also the derivative dual that the neural tangent kernel needs;
* the diagonal :math:`D(q) = E[\phi(u)^2]`, :math:`u \sim N(0, q)`, and :math:`D'(q)`;
* ``weight_variance_bound``: the weight variance below which the equilibrium map is a
  contraction for every input, so that its fixed point exists, is unique and is found.

The bounds follow from one argument. Write :math:`t = \sqrt{q}`. The diagonal map is
:math:`t \mapsto \sqrt{w\,\|\phi(tZ)\|^2 + s}`, whose Lipschitz constant is at most
:math:`\sqrt{w}\,\sup_t \|\phi'(tZ) Z\|` (the derivative of a norm is at most the norm of
the derivative). The pair map is :math:`c \mapsto w V(q_1, q_2, c) + s_{12}`, with slope
:math:`w E[\phi'(u)\phi'(v)] \le w \sup_q E[\phi'(\sqrt{q} Z)^2]` (Cauchy-Schwarz). Both are
contractions when

.. math:: w < 1 / \max(\sup_t E[\phi'(tZ)^2],\ \sup_t E[\phi'(tZ)^2 Z^2]),

which each activation states, exactly where the supremum has a closed form. The
bound is sharp wherever the supremum sits at :math:`t = 0` (tanh, erf, sin): a zero input
without bias then has the fixed point :math:`q = 0`, which loses uniqueness at the bound.

Closed forms are used for relu, leaky_relu, abs, identity (the arc-cosine family), step,
erf (the arcsine kernel), sin, cos and gelu. tanh, sigmoid, softplus, silu and any
user callable are integrated numerically (:class:`QuadratureActivation`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Cos",
    "Erf",
    "Gaussian",
    "Gelu",
    "PiecewiseLinear",
    "QuadratureActivation",
    "Sin",
    "Step",
    "StepMixture",
    "get_activation",
]

_PI = math.pi
_TWO_PI = 2.0 * math.pi

State = tuple[Tensor, ...]


class _SafeSqrt(torch.autograd.Function):
    """``sqrt`` whose derivative at 0 is 0 instead of inf.

    A zero variance arises only for a zero input without bias; the kernel is then
    identically 0 near that point in the directions the optimiser can move (variances
    stay >= 0), and a 0 derivative keeps ``inf * 0`` from turning into NaN downstream.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        positive = y > 0
        return torch.where(positive, grad / (2 * torch.where(positive, y, 1.0)), 0.0)


def safe_sqrt(x: Tensor) -> Tensor:
    """Square root of a non-negative tensor with a finite (zero) derivative at 0."""
    return _SafeSqrt.apply(x.clamp_min(0.0))


def _sin_from_cos(rho: Tensor) -> Tensor:
    return torch.sqrt(torch.clamp(1.0 - rho * rho, min=0.0))


def _orthant(rho: Tensor) -> Tensor:
    r"""``(pi - arccos rho) / (2 pi)``, the orthant probability, with a finite gradient at ``|rho| = 1``.

    Its derivative ``1 / (2 pi sqrt(1 - rho^2))`` is infinite at ``rho = +-1``, where
    ``rho`` is at an extreme and its own derivative with respect to the inputs vanishes:
    the chain rule's ``inf * 0`` would give NaN. There the (one-sided) derivative is
    replaced by 0, the limit of the product; elsewhere it is exact.
    """
    r = rho.detach()
    sin = _sin_from_cos(r)
    slope = torch.where(sin > 0, 1.0 / (_TWO_PI * torch.where(sin > 0, sin, 1.0)), 0.0)
    return (_PI - torch.arccos(r)) / _TWO_PI + slope * (rho - r)


class Activation(abc.ABC):
    """An elementwise activation together with its Gaussian dual.

    Subclasses implement :meth:`__call__`, :meth:`derivative`, :meth:`diag_dual` and
    :meth:`pair_dual`, and set :attr:`name` and :attr:`weight_variance_bound`.
    """

    #: Short name, as accepted by :func:`get_activation`.
    name: str = "activation"
    #: Strict upper bound on ``weight_variance`` for a well-posed equilibrium.
    weight_variance_bound: float = math.inf
    #: True for positively homogeneous activations of degree 1 (relu family):
    #: then ``V = sqrt(q1 q2) * kappa(rho)`` and the pair equation has one variable.
    homogeneous: bool = False

    @abc.abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """The activation, elementwise."""

    @abc.abstractmethod
    def derivative(self, x: Tensor) -> Tensor:
        """The activation's derivative, elementwise (almost everywhere)."""

    @abc.abstractmethod
    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(D(q), D'(q))`` with ``D(q) = E[phi(u)^2]``, ``u ~ N(0, q)``."""

    def diag_value(self, q: Tensor) -> Tensor:
        """``D(q)`` alone (no gradient needed); subclasses where ``D'`` costs extra override it."""
        return self.diag_dual(q)[0]

    @abc.abstractmethod
    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(V, V_c)`` at correlation ``rho`` for two broadcast point states.

        ``V = E[phi(u) phi(v)]`` and ``V_c = E[phi'(u) phi'(v)]``, where ``u`` and ``v`` have
        variances ``state1[0]``, ``state2[0]`` and correlation ``rho``. ``V`` is
        differentiable in the states (``rho`` held fixed); ``V_c`` is a plain value.
        """

    def derivative_activation(self) -> Activation:
        """The activation ``phi'``, whose dual ``E[phi'(u) phi'(v)]`` the neural tangent kernel needs.

        Its :meth:`pair_dual` value is differentiable in the states and in ``rho``.
        """
        raise ValueError(f"activation {self.name!r} has no derivative dual")

    def bulk_pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`pair_dual` for the bulk of the pairs, as pure elementwise tensor code (fusable).

        Exact unless :meth:`inexact_pairs` says otherwise; the default is :meth:`pair_dual`.
        """
        return self.pair_dual(state1, state2, rho)

    def inexact_pairs(self, state1: State, state2: State, rho: Tensor) -> Tensor | None:
        """Pairs at which :meth:`bulk_pair_dual` is not accurate (``None``: none)."""
        return None

    def prepare(
        self, q1: Tensor, q2: Tensor | None = None, *, coverage: float | None = None
    ) -> tuple[State, State | None]:
        """Per-point state for :meth:`pair_dual`; a tuple whose first entry is ``q``.

        The last dimension of every tensor of a state indexes the points. ``coverage`` is
        a correlation below which most pairs are expected to lie (a hint for series
        activations; pairs beyond it stay exact, through :meth:`inexact_pairs`).
        """
        return (q1,), (None if q2 is None else (q2,))

    def pair_start(self, state1: State, state2: State, c_tilde: Tensor, inv_root: Tensor, w: Tensor) -> Tensor:
        """A starting correlation for the pair equation ``rho = c_tilde + w V(rho) / sqrt(q1 q2)``."""
        return c_tilde

    def hermite_expansion(self, q: Tensor, order: int) -> tuple[Tensor, Tensor] | None:
        r"""``(a, D)``: Hermite coefficients of ``phi(sqrt(q) Z)`` and ``D(q)``, or ``None``.

        ``a[k] = E[phi(sqrt(q) Z) He_k(Z)] / sqrt(k!)`` for ``k <= order``, shape
        ``(order + 1, *q.shape)``, float64 and without gradient; then
        :math:`V = \sum_k a_k(q_1) a_k(q_2) \rho^k` (Mehler's formula), and
        ``D(q) - sum_{k <= K} a_k(q)^2`` bounds the tail. Activations with such a series
        (smooth ones) return it; :mod:`deq_kernel.mehler` then solves their pairs in one fused
        pass.
        """
        return None

    def hermite_slopes(self, q: Tensor, order: int) -> Tensor:
        r"""``d a_k / dq`` for ``k <= order`` (float64), for activations with :meth:`hermite_expansion`.

        From :math:`d a_k/dq = E[\phi'(\sqrt q Z)\, Z h_k(Z)]/(2\sqrt q)` and
        :math:`Z h_k = \sqrt{k+1}\,h_{k+1} + \sqrt k\,h_{k-1}` (``h_k`` the orthonormal Hermite
        polynomials): the coefficients ``b`` of ``phi'`` to order ``order + 1`` give
        ``(sqrt(k+1) b[k+1] + sqrt(k) b[k-1]) / (2 sqrt(q))``. ``q`` must be positive.
        """
        q64 = q.detach().to(torch.float64)
        b, _ = _hermite_expansion(self.derivative, q64, order + 1, self._series_spacing())
        k = torch.arange(order + 1, dtype=torch.float64, device=q.device).reshape(-1, *([1] * q.dim()))
        up = torch.sqrt(k + 1.0) * b[1:]
        down = torch.sqrt(k[1:]) * b[:order]
        slopes = up.clone()
        slopes[1:] += down
        return slopes / (2.0 * torch.sqrt(q64))

    def _series_spacing(self) -> float:
        # Resolves Hermite polynomials to order 65 and an integrand analytic in |Im z| < pi/2
        # to rounding (the order-256 coefficients of QuadratureActivation.prepare use 0.04).
        return 0.1

    def check_weight_variance(self, weight_variance: Tensor) -> None:
        """Raise ``ValueError`` if any weight variance is outside the well-posed range."""
        bad = ~(weight_variance < self.weight_variance_bound)
        if bool(bad.any()):
            worst = float(weight_variance.detach().max())
            raise ValueError(
                f"weight_variance must be < {self.weight_variance_bound:.6g} for activation "
                f"{self.name!r} (the equilibrium map is a contraction only below it), got {worst:.6g}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PiecewiseLinear(Activation):
    r"""``phi(x) = x`` for ``x > 0`` and ``negative_slope * x`` otherwise.

    relu (slope 0), leaky_relu, abs (slope -1) and identity (slope 1) are this family.
    Writing ``phi(x) = relu(x) - a relu(-x)`` and using the arc-cosine kernel of degree 1
    (Cho & Saul, 2009), :math:`J(\rho) = E[\mathrm{relu}(u)\mathrm{relu}(v)]/\sqrt{q_1 q_2}
    = (\sin\theta + (\pi - \theta)\cos\theta) / (2\pi)`, :math:`\theta = \arccos\rho`,
    and :math:`J(\rho) - J(-\rho) = \rho/2`, the dual is

    .. math:: V = \sqrt{q_1 q_2}\,\kappa(\rho),\quad \kappa(\rho) = (1 - a)^2 J(\rho) + a\rho,

    with :math:`\kappa'(\rho) = (1 - a)^2 (\pi - \theta)/(2\pi) + a` and
    :math:`D(q) = m q`, :math:`m = \kappa(1) = (1 + a^2)/2`.

    Bound: :math:`\kappa'` is largest at :math:`\rho = 1`, where it equals ``m``; both the
    diagonal map :math:`q \mapsto w m q + s` and the correlation map have slope at most
    ``w m``, so the equilibrium is unique and attracting iff ``w < 1/m = 2/(1 + a^2)``
    (relu: 2; abs and identity: 1).
    """

    homogeneous = True

    def __init__(self, negative_slope: float = 0.0, name: str | None = None) -> None:
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(f"negative_slope must be a real number, got {negative_slope!r}")
        if not math.isfinite(negative_slope):
            raise ValueError(f"negative_slope must be finite, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)
        self.name = name or "leaky_relu"
        self.variance_gain = (1.0 + self.negative_slope**2) / 2.0
        self.weight_variance_bound = 1.0 / self.variance_gain

    def __call__(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, self.negative_slope * x)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, self.negative_slope))

    def kappa_theta(self, cos_t: Tensor, sin_t: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(kappa, kappa')`` from the angle ``theta = arccos(rho)`` and its sine and cosine."""
        a = self.negative_slope
        k1 = (1.0 - a) ** 2
        pi_minus = _PI - theta
        kappa = k1 * (sin_t + pi_minus * cos_t) / _TWO_PI + a * cos_t
        kappa_prime = k1 * pi_minus / _TWO_PI + a
        return kappa, kappa_prime

    def kappa(self, rho: Tensor) -> tuple[Tensor, Tensor]:
        """``(kappa(rho), kappa'(rho))``: the dual of unit-variance inputs and its slope."""
        rho = rho.clamp(-1.0, 1.0)
        return self.kappa_theta(rho, _sin_from_cos(rho), torch.arccos(rho))

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        return self.variance_gain * q, torch.full_like(q, self.variance_gain)

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        kappa, kappa_prime = self.kappa(rho)
        return safe_sqrt(state1[0] * state2[0]) * kappa, kappa_prime

    def derivative_activation(self) -> Activation:
        return StepMixture(self.negative_slope)

    def __repr__(self) -> str:
        return f"PiecewiseLinear(negative_slope={self.negative_slope!r}, name={self.name!r})"


class StepMixture(Activation):
    r"""``phi(x) = a + (1 - a) 1[x > 0]``: the derivative of the relu family (slope ``a``).

    With ``p_i = P(u_i > 0)`` (1/2 for a positive variance, 0 for a zero one) and
    :math:`P(u > 0, v > 0) = (\pi - \theta)/(2\pi)`,

    .. math:: V = a^2 + a(1 - a)(p_1 + p_2) + (1 - a)^2 (\pi - \theta)/(2\pi),

    which at unit variances is :math:`\kappa'(\rho)` of :class:`PiecewiseLinear`. Used for
    the neural tangent kernel; it is never iterated, so it has no bound.
    """

    weight_variance_bound = math.inf

    def __init__(self, negative_slope: float) -> None:
        self.negative_slope = float(negative_slope)
        self.name = f"step_mixture({self.negative_slope:g})"

    def __call__(self, x: Tensor) -> Tensor:
        a = self.negative_slope
        return a + (1.0 - a) * (x > 0).to(x.dtype)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        a = self.negative_slope
        half = torch.where(q > 0, 0.5, 0.0).to(q.dtype)
        return a * a + (1.0 - a * a) * half + 0.0 * q, torch.zeros_like(q)

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        a = self.negative_slope
        q1, q2 = state1[0], state2[0]
        p1 = torch.where(q1 > 0, 0.5, 0.0).to(rho.dtype)
        p2 = torch.where(q2 > 0, 0.5, 0.0).to(rho.dtype)
        both = (q1 * q2) > 0
        rho_c = rho.clamp(-1.0, 1.0)
        joint = torch.where(both, _orthant(rho_c), 0.0)
        value = a * a + a * (1.0 - a) * (p1 + p2) + (1.0 - a) ** 2 * joint + 0.0 * (q1 * q2)
        qq = (q1 * q2).detach()
        denom = _TWO_PI * torch.sqrt(qq) * _sin_from_cos(rho_c.detach())
        # Infinite at |rho| = 1, where rho is extreme and its own derivative vanishes: 0 there.
        slope = torch.where(both & (denom > 0), (1.0 - a) ** 2 / torch.where(denom > 0, denom, 1.0), 0.0)
        return value, slope


class Step(Activation):
    r"""Heaviside step, ``phi(x) = 1[x > 0]``.

    The arc-cosine kernel of degree 0: :math:`V = P(u > 0, v > 0) = (\pi - \theta)/(2\pi)`,
    :math:`\theta = \arccos\rho`, independent of the variances; :math:`D(q) = 1/2`. (The
    arcsine formula :math:`(2/\pi)\arcsin\rho` belongs to the sign function, not to the step.)
    :math:`V_c = 1 / (2\pi\sqrt{q_1 q_2 - c^2})`.

    Bound: none. The diagonal is explicit, ``q = w/2 + s``. For distinct inputs the pair
    equation has exactly one root in (-1, 1): in the angle, ``g(theta) = sqrt(q1 q2) cos(theta)
    + w theta / (2 pi) - w/2 - s12`` is positive at 0, negative at pi and has a single
    decreasing stretch, and the root lies there, where the correlation map's slope is < 1.
    The slope is unbounded near ``rho = 1``, so ``rho = 1`` repels: the kernel is
    discontinuous on the diagonal (near-duplicates have correlation below
    ``cos(w / (pi q))``, identical points have 1). Since ``step(0) = 0``, a zero input
    without bias keeps ``q = 0``, the limit of the layer iteration started from ``K = s``
    (the finite network has the fixed point ``h = 0`` there).
    """

    name = "step"
    weight_variance_bound = math.inf

    def __call__(self, x: Tensor) -> Tensor:
        return (x > 0).to(x.dtype)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def derivative_activation(self) -> Activation:
        raise ValueError(
            "the step activation has no neural tangent kernel: its derivative is a Dirac delta, "
            "whose dual is infinite on the diagonal"
        )

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        return torch.where(q > 0, 0.5, 0.0).to(q.dtype) + 0.0 * q, torch.zeros_like(q)

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        qq = state1[0] * state2[0]
        rho = rho.clamp(-1.0, 1.0)
        value = torch.where(qq > 0, _orthant(rho), 0.0) + 0.0 * qq
        qq = qq.detach()
        denom = _TWO_PI * torch.sqrt(qq) * _sin_from_cos(rho.detach())
        # Infinite at |rho| = 1, where rho is extreme and its own derivative vanishes: 0 there.
        slope = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0)
        return value, slope


class Erf(Activation):
    r"""``phi = erf``: the arcsine kernel (Williams, 1997).

    .. math:: V = \frac{2}{\pi}\arcsin\frac{2c}{\sqrt{(1 + 2q_1)(1 + 2q_2)}},\qquad
              V_c = \frac{4}{\pi}\frac{1}{\sqrt{(1 + 2q_1)(1 + 2q_2) - 4c^2}}.

    Bound: ``phi'`` peaks at 0 with ``phi'(0)^2 = 4/pi``, and both suprema of the module
    docstring are reached there, so ``w < pi/4``, sharp (a zero input without bias has
    the second fixed point ``q > 0`` beyond it).
    """

    name = "erf"
    weight_variance_bound = _PI / 4.0

    def __call__(self, x: Tensor) -> Tensor:
        return torch.erf(x)

    def derivative(self, x: Tensor) -> Tensor:
        return (2.0 / math.sqrt(_PI)) * torch.exp(-x * x)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        one_4q = torch.sqrt(1.0 + 4.0 * q)
        value = (2.0 / _PI) * torch.atan2(2.0 * q, one_4q)
        slope = (4.0 / _PI) / ((1.0 + 2.0 * q) * one_4q)
        return value, slope

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        # arcsin(2c / sqrt(P)) = atan2(2c, sqrt(P - 4c^2)), P = (1 + 2 q1)(1 + 2 q2), with
        # P - 4c^2 = 1 + 2(q1 + q2) + 4 q1 q2 (1 - rho)(1 + rho) formed without cancellation.
        q1, q2 = state1[0], state2[0]
        c = rho * safe_sqrt(q1 * q2)
        gap = torch.sqrt(1.0 + 2.0 * (q1 + q2) + 4.0 * q1 * q2 * (1.0 - rho) * (1.0 + rho))
        value = (2.0 / _PI) * torch.atan2(2.0 * c, gap)
        return value, (4.0 / _PI) / gap.detach()

    def derivative_activation(self) -> Activation:
        return Gaussian(2.0 / math.sqrt(_PI))


class Gaussian(Activation):
    r"""``phi(x) = a exp(-x^2)`` (the derivative of erf, with ``a = 2/sqrt(pi)``).

    .. math:: V = a^2 / \sqrt{(1 + 2q_1)(1 + 2q_2) - 4c^2},\qquad
              V_c = 4 a^2 c / ((1 + 2q_1)(1 + 2q_2) - 4c^2)^{3/2}.

    Used for the neural tangent kernel; never iterated, so it has no bound.
    """

    weight_variance_bound = math.inf

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)
        self.name = f"gaussian({self.scale:g})"

    def __call__(self, x: Tensor) -> Tensor:
        return self.scale * torch.exp(-x * x)

    def derivative(self, x: Tensor) -> Tensor:
        return -2.0 * x * self.scale * torch.exp(-x * x)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        a2 = self.scale**2
        base = 1.0 + 4.0 * q
        return a2 / torch.sqrt(base), -2.0 * a2 / base**1.5

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        q1, q2 = state1[0], state2[0]
        c = rho * safe_sqrt(q1 * q2)
        # (1 + 2 q1)(1 + 2 q2) - 4 c^2 without cancellation (see Erf.pair_dual)
        det = 1.0 + 2.0 * (q1 + q2) + 4.0 * q1 * q2 * (1.0 - rho) * (1.0 + rho)
        a2 = self.scale**2
        return a2 / torch.sqrt(det), (4.0 * a2 * c / det**1.5).detach()


class Sin(Activation):
    r"""``phi = sin``: :math:`V = e^{-(q_1 + q_2)/2}\sinh c`, :math:`V_c = e^{-(q_1+q_2)/2}\cosh c`,
    :math:`D(q) = (1 - e^{-2q})/2`.

    Bound: ``w < 1``, sharp: ``cos^2`` peaks at 0 with value 1.
    """

    name = "sin"
    weight_variance_bound = 1.0

    def __call__(self, x: Tensor) -> Tensor:
        return torch.sin(x)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.cos(x)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.exp(-2.0 * q)
        return -0.5 * torch.expm1(-2.0 * q), e  # expm1: no cancellation as q -> 0

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        return _exp_duals(state1[0], state2[0], rho, odd=True)

    def derivative_activation(self) -> Activation:
        return Cos()


class Cos(Activation):
    r"""``phi = cos``: :math:`V = e^{-(q_1 + q_2)/2}\cosh c`, :math:`V_c = e^{-(q_1+q_2)/2}\sinh c`,
    :math:`D(q) = (1 + e^{-2q})/2`.

    Bound: ``w < 2``. The diagonal map ``q -> w (1 + e^{-2q})/2 + s`` is decreasing, so its
    fixed point is unique, and since ``q >= w/2`` there its slope ``w e^{-2q} <= w e^{-w} < 1``.
    The pair slope is ``w e^{-(q1+q2)/2} sinh(c) <= w e^{-g} sinh(g) < w/2`` with
    ``g = sqrt(q1 q2) <= (q1 + q2)/2``; the bound 2 is approached as the variances grow.
    """

    name = "cos"
    weight_variance_bound = 2.0

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cos(x)

    def derivative(self, x: Tensor) -> Tensor:
        return -torch.sin(x)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.exp(-2.0 * q)
        return 0.5 * (1.0 + e), -e

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        return _exp_duals(state1[0], state2[0], rho, odd=False)

    def derivative_activation(self) -> Activation:
        return _Negated(Sin())  # cos' = -sin; the sign cancels in the dual


class _Negated(Activation):
    """``-phi``: the same dual as ``phi``."""

    def __init__(self, base: Activation) -> None:
        self.base = base
        self.name = f"-{base.name}"
        self.weight_variance_bound = base.weight_variance_bound

    def __call__(self, x: Tensor) -> Tensor:
        return -self.base(x)

    def derivative(self, x: Tensor) -> Tensor:
        return -self.base.derivative(x)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.diag_dual(q)

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.pair_dual(state1, state2, rho)


def _exp_duals(q1: Tensor, q2: Tensor, rho: Tensor, *, odd: bool) -> tuple[Tensor, Tensor]:
    """``e^{-(q1+q2)/2}`` times ``(sinh c, cosh c)`` (odd) or ``(cosh c, sinh c)``, accurate throughout.

    For ``|c| < 1`` the hyperbolic functions are used directly (the difference of
    exponentials would cancel, losing all relative accuracy as ``c -> 0``); beyond, the
    product is formed as exponentials of differences, which cannot overflow because
    ``|c| <= sqrt(q1 q2) <= (q1 + q2)/2``.
    """
    half = 0.5 * (q1 + q2)
    c = rho * safe_sqrt(q1 * q2)

    def pair(c: Tensor, half: Tensor) -> tuple[Tensor, Tensor]:
        small = c.abs() < 1.0
        cs = torch.where(small, c, 0.0)
        damp = torch.exp(-half)
        plus = 0.5 * torch.exp(torch.where(small, 0.0, c) - half)
        minus = 0.5 * torch.exp(-torch.where(small, 0.0, c) - half)
        sinh = torch.where(small, torch.sinh(cs) * damp, plus - minus)
        cosh = torch.where(small, torch.cosh(cs) * damp, plus + minus)
        return sinh, cosh

    sinh, cosh = pair(c, half)
    slope_sinh, slope_cosh = pair(c.detach(), half.detach())
    return (sinh, slope_cosh) if odd else (cosh, slope_sinh)


class Gelu(Activation):
    r"""``phi(x) = x Phi(x)`` (exact GELU, ``Phi`` the standard normal CDF).

    Closed form. With ``g1, g2`` independent standard normals, ``Phi(u) = P(g1 < u | u)``, so
    :math:`E[\phi(u)\phi(v)] = E[u v\,1\{a > 0\}1\{b > 0\}]`, ``a = u - g1``, ``b = v - g2``.
    ``(a, b)`` has covariance ``S = [[q1 + 1, c], [c, q2 + 1]]``; conditioning ``u, v`` on
    ``(a, b)`` leaves the linear regressions ``E[u|a,b]``, ``E[v|a,b]`` and a constant
    residual covariance, and the truncated bivariate moments are

    * ``P(a > 0, b > 0) = (pi - t) / (2 pi)``,
    * ``E[a b 1] = sqrt(AB) (sin t + (pi - t) cos t) / (2 pi)``,
    * ``E[a^2 1] = A ((pi - t) + cos t sin t) / (2 pi)``,

    with ``t = arccos(c / sqrt(AB))``. As ``|c| <= sqrt(q1 q2) < sqrt(AB)`` nothing here is
    singular. ``V_c`` is the exact derivative of this expression in ``c``.

    Bound: ``w < 1.728`` from the module docstring's suprema, evaluated numerically
    (``sup_t E[phi'(tZ)^2 Z^2] = 0.578523`` at ``t = 0.9704``, which dominates; rounded down).
    """

    name = "gelu"
    weight_variance_bound = 1.728

    def __call__(self, x: Tensor) -> Tensor:
        return x * _normal_cdf(x)

    def derivative(self, x: Tensor) -> Tensor:
        return _normal_cdf(x) + x * torch.exp(-0.5 * x * x) / math.sqrt(_TWO_PI)

    @staticmethod
    def _value(q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
        return Gelu._value_and_slope(q1, q2, c, slope=False)[0]

    @staticmethod
    def _value_and_slope(q1: Tensor, q2: Tensor, c: Tensor, *, slope: bool = True) -> tuple[Tensor, Tensor | None]:
        """``V`` and (with ``slope``) ``dV/dc``, the latter differentiated by hand term by term.

        With ``x^2 + y^2 = A B`` for ``t = atan2(y, x)``, ``y = sqrt(Delta)``, ``x = c``:
        ``dDelta/dc = -2c``, ``dt/dc = -1/sqrt(Delta)``; the rest is the product rule.
        """
        # Written with e = q1 q2 - c^2 = q1 q2 (1 - rho)(1 + rho) and Delta = det S = e + q1 + q2 + 1,
        # which keep their relative accuracy where the textbook form cancels (large
        # variances, |rho| -> 1, float32). The regression coefficients are then
        # alpha1 = (e + q1)/Delta, beta1 = alpha2 = c/Delta, beta2 = (e + q2)/Delta, and the
        # residual covariance of (u, v) given (a, b) is c/Delta.
        root = safe_sqrt(q1 * q2)
        rho = torch.where(root > 0, c / torch.where(root > 0, root, 1.0), 0.0).clamp(-1.0, 1.0)
        e = q1 * q2 * (1.0 - rho) * (1.0 + rho)
        a = q1 + 1.0
        b = q2 + 1.0
        det = e + q1 + q2 + 1.0
        root_det = torch.sqrt(det)
        t = torch.atan2(root_det, c)  # the angle between a and b: cos t = c/sqrt(AB), sin t = sqrt(det/(AB))
        pi_t = _PI - t
        prob = pi_t / _TWO_PI
        e_ab = (root_det + pi_t * c) / _TWO_PI
        e_sq = (pi_t + c * root_det / (a * b)) / _TWO_PI  # E[a^2 1] / A, and the same for b
        alpha1 = (e + q1) / det
        beta1 = c / det
        beta2 = (e + q2) / det
        mixed = alpha1 * beta2 + beta1 * beta1
        value = beta1 * prob + alpha1 * beta1 * a * e_sq + mixed * e_ab + beta1 * beta2 * b * e_sq
        if not slope:
            return value, None
        inv_det2 = 1.0 / (det * det)
        d_prob = 1.0 / (_TWO_PI * root_det)
        d_e_ab = prob
        d_e_sq = (1.0 / root_det + (det - c * c) / (root_det * a * b)) / _TWO_PI
        d_alpha1 = -2.0 * c * b * inv_det2
        d_beta1 = (det + 2.0 * c * c) * inv_det2
        d_beta2 = -2.0 * c * a * inv_det2
        d_value = (
            d_beta1 * prob
            + beta1 * d_prob
            + a * ((d_alpha1 * beta1 + alpha1 * d_beta1) * e_sq + alpha1 * beta1 * d_e_sq)
            + (d_alpha1 * beta2 + alpha1 * d_beta2 + 2.0 * beta1 * d_beta1) * e_ab
            + mixed * d_e_ab
            + b * ((d_beta1 * beta2 + beta1 * d_beta2) * e_sq + beta1 * beta2 * d_e_sq)
        )
        return value, d_value

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            qd = q.detach().requires_grad_(True)
            (slope,) = torch.autograd.grad(self._value(qd, qd, qd).sum(), qd)
        return self._value(q, q, q), slope

    def derivative_activation(self) -> Activation:
        return _GeluDerivative()

    def hermite_expansion(self, q: Tensor, order: int) -> tuple[Tensor, Tensor]:
        # GELU is entire: the default spacing resolves it as finely as tanh.
        return _hermite_expansion(self, q.detach().to(torch.float64), order, self._series_spacing())

    def bulk_pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        """Value and slope in one pass of elementwise code (float64; float32 as :meth:`pair_dual`)."""
        if rho.dtype != torch.float64:
            return self.pair_dual(state1, state2, rho)
        q1, q2 = torch.minimum(state1[0], state2[0]), torch.maximum(state1[0], state2[0])
        value, slope = self._value_and_slope(q1, q2, rho * safe_sqrt(q1 * q2))
        return value, slope

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        # The expression is symmetric in (q1, q2) only mathematically: order the two
        # variances so that (i, j) and (j, i) give bitwise equal results.
        q1, q2 = torch.minimum(state1[0], state2[0]), torch.maximum(state1[0], state2[0])
        c = rho * safe_sqrt(q1 * q2)
        value = self._value(q1, q2, c)
        with torch.enable_grad():
            cd = c.detach().requires_grad_(True)
            (slope,) = torch.autograd.grad(self._value(q1.detach(), q2.detach(), cd).sum(), cd)
        return value, slope


class _GeluDerivative(Activation):
    """``gelu'``: its dual is the covariance derivative of the GELU closed form, by autograd
    (with a graph, so that it is differentiable in turn)."""

    name = "gelu'"
    weight_variance_bound = math.inf

    def __call__(self, x: Tensor) -> Tensor:
        return Gelu().derivative(x)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.exp(-0.5 * x * x) * (2.0 - x * x) / math.sqrt(_TWO_PI)

    @staticmethod
    def _slope(q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
        # The derivative of the closed form cancels badly in float32 at large variances:
        # always differentiate in float64.
        dtype = c.dtype
        q1, q2, c = q1.double(), q2.double(), c.double()
        with torch.enable_grad():
            leaf = not c.requires_grad
            c_ = c.detach().requires_grad_(True) if leaf else c
            value = Gelu._value(q1, q2, c_)
            (slope,) = torch.autograd.grad(value.sum(), c_, create_graph=True)
        slope = slope if not leaf or q1.requires_grad or q2.requires_grad else slope.detach()
        return slope.to(dtype)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            qd = q.detach().requires_grad_(True)
            value = self._slope(qd, qd, qd)
            (d,) = torch.autograd.grad(value.sum(), qd)
        return self._slope(q, q, q), d

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        dtype = rho.dtype
        q1, q2 = torch.minimum(state1[0], state2[0]).double(), torch.maximum(state1[0], state2[0]).double()
        c = rho.double() * safe_sqrt(q1 * q2)  # formed in float64: |c| <= sqrt(q1 q2) exactly
        value = self._slope(q1, q2, c)
        with torch.enable_grad():
            cd = c.detach().requires_grad_(True)
            (curvature,) = torch.autograd.grad(self._slope(q1.detach(), q2.detach(), cd).sum(), cd)
        return value.to(dtype), curvature.detach().to(dtype)


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


# --------------------------------------------------------------------------- quadrature


def _trapezoid_nodes(spacing: float, half_width: float) -> tuple[Tensor, Tensor]:
    """Trapezoid nodes and N(0, 1) weights on [-half_width, half_width], float64.

    For an integrand analytic in the strip ``|Im z| < tau`` the error decays like
    ``exp(-2 pi tau / spacing)``; the Gaussian tail beyond ``half_width`` is ``exp(-half_width^2/2)``.
    """
    count = 2 * math.ceil(half_width / spacing) + 1
    z = torch.linspace(-half_width, half_width, count, dtype=torch.float64)
    h = float(z[1] - z[0])
    weights = torch.exp(-0.5 * z * z) * (h / math.sqrt(_TWO_PI))
    return z, weights


def _mapped_nodes(q_max: float, spacing: float, half_width: float) -> tuple[Tensor, Tensor]:
    r"""Nodes and N(0, 1) weights of the trapezoid rule under ``z = asinh(a sinh t)``, float64.

    ``a = min(1, 1/sqrt(q_max))``. Near 0 the map is ``z = a t``, so an activation evaluated
    at ``sqrt(q) z`` varies on the scale of ``t`` however large ``q`` is; away from 0 it is
    ``z = t + log(a/2)``, uniform spacing, which resolves the Hermite polynomials and the
    Gaussian. The map is analytic in a strip, so the rule keeps the trapezoid rule's
    exponential accuracy (about 1e-14 for tanh at any ``q`` up to 1e16), with at most a
    few hundred more nodes than the uniform rule, rather than a number growing like
    ``sqrt(q)``. For ``q_max <= 1`` it is the uniform rule.
    """
    a = min(1.0, 1.0 / math.sqrt(max(q_max, 1e-300)))
    top = half_width + math.log(2.0 / a) + 1.0
    t = torch.arange(-top, top + spacing / 2, spacing, dtype=torch.float64)
    sh = torch.sinh(t)
    z = torch.asinh(a * sh)
    dz = a * torch.cosh(t) / torch.sqrt(1.0 + (a * sh) ** 2)
    return z, torch.exp(-0.5 * z * z) * dz * (spacing / math.sqrt(_TWO_PI))


def _hermite_table(z: Tensor, order: int) -> Tensor:
    """Orthonormal probabilists' Hermite polynomials ``He_k(z)/sqrt(k!)``, ``k = 0..order``."""
    out = torch.empty(order + 1, z.numel(), dtype=z.dtype, device=z.device)
    out[0] = 1.0
    if order >= 1:
        out[1] = z
    for k in range(1, order):
        out[k + 1] = (z * out[k] - math.sqrt(k) * out[k - 1]) / math.sqrt(k + 1)
    return out


def _hermite_expansion(fn: Callable[[Tensor], Tensor], q: Tensor, order: int, spacing: float) -> tuple[Tensor, Tensor]:
    """``(a, D)`` of :meth:`Activation.hermite_expansion` for ``fn`` (``q`` float64, no gradient).

    The trapezoid rule on the mapped nodes of :func:`_mapped_nodes` with a window of 14
    (Hermite products grow like ``exp(z^2 / 4)``).
    """
    with torch.no_grad():
        z, weights = _mapped_nodes(_max_or_zero(q), spacing, 14.0)
        z, weights = z.to(q.device), weights.to(q.device)
        weighted = (_hermite_table(z, order) * weights).T  # (nodes, order + 1)
        phi = fn(safe_sqrt(q).unsqueeze(-1) * z)
        coef = torch.movedim(phi @ weighted, -1, 0)
        total = (phi * phi * weights).sum(-1)
    return coef, total


class _HermiteSeries(torch.autograd.Function):
    r"""``V = sum_k A1[k] A2[k] rho^k`` (Mehler's formula) by Horner's rule, with ``dV/drho``.

    ``A1`` and ``A2`` are broadcast coefficient stacks ``(K+1, ...)``. The backward pass
    recomputes powers of ``rho`` one at a time, so memory stays O(size of V) for any K.
    """

    @staticmethod
    def forward(ctx: Any, rho: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
        order = a1.shape[0] - 1
        value = a1[order] * a2[order] * torch.ones_like(rho)
        slope = torch.zeros_like(value)
        for k in range(order - 1, -1, -1):
            slope = slope * rho + value
            value = value * rho + a1[k] * a2[k]
        ctx.save_for_backward(rho, a1, a2, slope)
        ctx.mark_non_differentiable(slope)
        return value, slope

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_value: Tensor, _grad_slope: Tensor) -> tuple[Tensor | None, ...]:
        rho, a1, a2, slope = ctx.saved_tensors
        grad_rho = grad_value * slope if ctx.needs_input_grad[0] else None
        grad_a1 = torch.zeros_like(a1) if ctx.needs_input_grad[1] else None
        grad_a2 = torch.zeros_like(a2) if ctx.needs_input_grad[2] else None
        if grad_a1 is not None or grad_a2 is not None:
            power = grad_value
            for k in range(a1.shape[0]):
                if grad_a1 is not None:
                    grad_a1[k] = (power * a2[k]).sum_to_size(a1.shape[1:])
                if grad_a2 is not None:
                    grad_a2[k] = (power * a1[k]).sum_to_size(a2.shape[1:])
                power = power * rho
        return grad_rho, grad_a1, grad_a2


class QuadratureActivation(Activation):
    r"""Any smooth elementwise activation, integrated numerically.

    Per point, the Hermite coefficients :math:`a_k(q) = E[\phi(\sqrt{q}Z) He_k(Z)]/\sqrt{k!}` are
    computed by the trapezoid rule on a fine grid (exponentially accurate for integrands
    analytic in a strip; the spacing follows the activation's strip of analyticity and the
    largest variance). Pairs then use Mehler's formula

    .. math:: V = \sum_{k=0}^{K} a_k(q_1) a_k(q_2) \rho^k + R_K,\qquad
              |R_K| \le |\rho|^{K+1}\sqrt{T_K(q_1) T_K(q_2)},

    where :math:`T_K(q) = D(q) - \sum_{k \le K} a_k(q)^2` is the coefficient tail (Cauchy-Schwarz).
    The main order ``K`` is the smallest of 8, 16, ..., 64 whose bound holds for every point
    at ``|rho| <= 0.9``. Pairs whose bound fails (strongly correlated pairs) are evaluated
    again at order 256, gathered; the few whose bound fails even there (strongly
    correlated pairs of large-variance points) are integrated directly by a
    two-dimensional trapezoid rule. The truncation error is kept below 1e-12 of
    ``sqrt(D(q1) D(q2))`` in float64 (1e-8 in float32).

    Parameters
    ----------
    fn : callable
        Elementwise torch function, differentiable by autograd unless ``derivative`` and
        ``second_derivative`` are given.
    name : str, optional
    derivative, second_derivative : callable, optional
        ``phi'`` and ``phi''``; by default obtained from ``fn`` by autograd.
    weight_variance_bound : float, optional
        Strict bound on ``weight_variance``. By default estimated numerically from the
        suprema in the module docstring, on a grid of scales (an estimate, not a proof:
        pass the bound if it is known).
    analytic_strip : float, optional
        Half-width of the strip ``|Im x| < tau`` in which ``fn`` is analytic, which sets the
        quadrature spacing; default 0.5 (conservative). tanh: pi/2; sigmoid, softplus,
        silu: pi. Non-smooth callables converge only algebraically; use the named
        closed forms for relu-like activations.
    """

    _ORDERS = (8, 16, 24, 32, 48, 64, 256)

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        *,
        name: str | None = None,
        derivative: Callable[[Tensor], Tensor] | None = None,
        second_derivative: Callable[[Tensor], Tensor] | None = None,
        weight_variance_bound: float | None = None,
        analytic_strip: float | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"activation must be a name or a callable, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        self._derivative = derivative
        self._second_derivative = second_derivative
        if analytic_strip is None:
            analytic_strip = 0.5
        if not analytic_strip > 0:
            raise ValueError(f"analytic_strip must be > 0, got {analytic_strip!r}")
        self.analytic_strip = float(analytic_strip)
        self._check_callable()
        if weight_variance_bound is None:
            weight_variance_bound = estimate_weight_variance_bound(self)
        elif not weight_variance_bound > 0:
            raise ValueError(f"weight_variance_bound must be > 0, got {weight_variance_bound!r}")
        self.weight_variance_bound = float(weight_variance_bound)

    def _check_callable(self) -> None:
        probe = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64)
        try:
            out = self.fn(probe)
        except Exception as exc:  # the user's function failed on a plain tensor
            raise TypeError(f"activation callable {self.name!r} must map a float64 tensor elementwise: {exc}") from exc
        if not isinstance(out, Tensor) or out.shape != probe.shape:
            raise TypeError(f"activation callable {self.name!r} must return a tensor of its input's shape")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"activation callable {self.name!r} returned non-finite values")

    # -- the function and its derivatives ------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def derivative(self, x: Tensor) -> Tensor:
        if self._derivative is not None:
            return self._derivative(x)
        return self._autograd_derivatives(x, second=False)[0]

    def derivative_activation(self) -> Activation:
        return QuadratureActivation(
            self.derivative,
            name=f"{self.name}'",
            derivative=self.second_derivative,
            weight_variance_bound=math.inf,
            analytic_strip=self.analytic_strip,
        )

    def second_derivative(self, x: Tensor) -> Tensor:
        if self._second_derivative is not None:
            return self._second_derivative(x)
        return self._autograd_derivatives(x, second=True)[1]

    def _autograd_derivatives(self, x: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (d1,) = torch.autograd.grad(self.fn(xd).sum(), xd, create_graph=second)
            d2 = None
            if second:
                (d2,) = torch.autograd.grad(d1.sum(), xd, allow_unused=True)
                if d2 is None:
                    d2 = torch.zeros_like(xd)
        return d1.detach(), (None if d2 is None else d2.detach())

    # -- quadrature ------------------------------------------------------------------------
    def hermite_expansion(self, q: Tensor, order: int) -> tuple[Tensor, Tensor]:
        return _hermite_expansion(self.fn, q.detach().to(torch.float64), order, self._series_spacing())

    def _series_spacing(self) -> float:
        return min(0.1, self.analytic_strip / 6.0)

    def _nodes(self, q_max: float, hermite: bool) -> tuple[Tensor, Tensor]:
        # Hermite products grow like e^{z^2/4}, so the coefficient integrals need a wider
        # window than the plain Gaussian tail.
        half_width = 14.0 if hermite else 9.0
        return _mapped_nodes(q_max, min(0.04, self.analytic_strip / 6.0), half_width)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        q64 = q.to(torch.float64)
        z, weights = self._nodes(_max_or_zero(q64), hermite=False)
        z, weights = z.to(q.device), weights.to(q.device)
        u = safe_sqrt(q64).unsqueeze(-1) * z
        phi = self.fn(u)
        value = (phi * phi * weights).sum(-1)
        ud = u.detach()
        slope = ((self.derivative(ud) ** 2 + phi.detach() * self.second_derivative(ud)) * weights).sum(-1)
        return value.to(q.dtype), slope.to(q.dtype)

    def diag_value(self, q: Tensor) -> Tensor:
        q64 = q.detach().to(torch.float64)
        z, weights = self._nodes(_max_or_zero(q64), hermite=False)
        phi = self.fn(safe_sqrt(q64).unsqueeze(-1) * z.to(q.device))
        return (phi * phi * weights.to(q.device)).sum(-1).to(q.dtype)

    def prepare(
        self, q1: Tensor, q2: Tensor | None = None, *, coverage: float | None = None
    ) -> tuple[State, State | None]:
        qs = [q1] if q2 is None else [q1, q2]
        q_max = max(_max_or_zero(q.detach().to(torch.float64)) for q in qs)
        z, weights = self._nodes(q_max, hermite=True)
        top = self._ORDERS[-1]
        hermite = _hermite_table(z, top).to(q1.device)
        weighted = (hermite * weights.to(q1.device)).T  # (nodes, K+1)
        raw = []
        for q in qs:
            q64 = q.to(torch.float64)
            phi = self.fn(safe_sqrt(q64).unsqueeze(-1) * z.to(q.device))
            coef = torch.movedim(phi @ weighted, -1, 0)  # (K+1, ..., n)
            total = (phi * phi * weights.to(q.device)).sum(-1)
            raw.append((q, coef, total))
        states = self._states(raw, coverage)
        return states[0], (states[1] if q2 is not None else None)

    def narrow(self, state1: State, state2: State | None, coverage: float) -> tuple[State, State | None]:
        """The states of :meth:`prepare` with the main order chosen for ``coverage`` instead."""
        given = [state1] if state2 is None else [state1, state2]
        raw = [(st[0], st[2].to(torch.float64), st[3].to(torch.float64)) for st in given]
        states = self._states(raw, coverage)
        return states[0], (states[1] if state2 is not None else None)

    def _states(self, raw: list[tuple[Tensor, Tensor, Tensor]], coverage: float | None) -> list[State]:
        """States from ``(q, float64 coefficients to the top order, float64 D(q))`` per point set.

        The main order is the smallest whose bound holds at ``|rho| <= coverage`` (default
        and at most 0.9) for every point; pairs beyond it are re-evaluated at the top order,
        and beyond that integrated.
        """
        tol = _series_tolerance(raw[0][0].dtype)
        cover = 0.9 if coverage is None else min(max(float(coverage), 0.0), 0.9)
        main = self._ORDERS[-2]
        for candidate in self._ORDERS[:-1]:
            if all(_tail_ratio(coef, total, candidate) * cover ** (candidate + 1) <= tol for _, coef, total in raw):
                main = candidate
                break
        states = []
        for q, coef, total in raw:
            tail_main = (total - (coef[: main + 1] ** 2).sum(0)).clamp_min(0.0)
            tail_top = (total - (coef * coef).sum(0)).clamp_min(0.0)
            dt = q.dtype
            states.append((q, coef[: main + 1].to(dt), coef.to(dt), total.to(dt), tail_main.to(dt), tail_top.to(dt)))
        return states

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        q1, a1, b1, total1, tail1, top1 = state1
        q2, a2, b2, total2, tail2, top2 = state2
        main = a1.shape[0] - 1
        value, slope_rho = _HermiteSeries.apply(rho, a1, a2)
        tol = _series_tolerance(rho.dtype)
        scale = torch.sqrt(total1.detach() * total2.detach())
        abs_rho = rho.detach().abs()
        inexact = abs_rho ** (main + 1) * torch.sqrt(tail1.detach() * tail2.detach()) > tol * scale
        if bool(inexact.any()):
            # Top order on the gathered pairs only.
            shape = inexact.shape
            i1 = _pair_index(b1, shape, inexact)
            i2 = _pair_index(b2, shape, inexact)
            sub_value, sub_slope = _HermiteSeries.apply(
                rho.expand(shape)[inexact], b1.flatten(1)[:, i1], b2.flatten(1)[:, i2]
            )
            value = value.expand(shape).masked_scatter(inexact, sub_value)
            slope_rho = slope_rho.expand(shape).masked_scatter(inexact, sub_slope)
            still = inexact & (abs_rho ** (b1.shape[0]) * torch.sqrt(top1.detach() * top2.detach()) > tol * scale)
        else:
            still = inexact
        root = torch.sqrt(q1 * q2).detach()
        slope = torch.where(root > 0, slope_rho / torch.where(root > 0, root, 1.0), 0.0)
        if bool(still.any()):
            value, slope = self._direct_pairs(q1, q2, rho, still, value, slope)
        return value, slope

    def pair_start(self, state1: State, state2: State, c_tilde: Tensor, inv_root: Tensor, w: Tensor) -> Tensor:
        """The root of the equation with ``V`` cut after its linear term (exact for small ``rho``)."""
        a1, a2 = state1[1], state2[1]
        slope = w * (a1[1] * a2[1]) * inv_root
        start = (c_tilde + w * (a1[0] * a2[0]) * inv_root) / torch.where(slope < 1.0, 1.0 - slope, 1.0)
        return start.clamp(-1.0, 1.0)

    def bulk_pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        """The main-order series alone (Horner's rule), exact where :meth:`inexact_pairs` is False."""
        a1, a2 = state1[1], state2[1]
        order = a1.shape[0] - 1
        value = a1[order] * a2[order]
        slope = torch.zeros_like(value)
        for k in range(order - 1, -1, -1):
            slope = slope * rho + value
            value = value * rho + a1[k] * a2[k]
        root = torch.sqrt(state1[0] * state2[0])
        return value, torch.where(root > 0, slope / torch.where(root > 0, root, 1.0), 0.0)

    def inexact_pairs(self, state1: State, state2: State, rho: Tensor) -> Tensor:
        _, a1, _, total1, tail1, _ = state1
        _, _, _, total2, tail2, _ = state2
        bound = rho.abs() ** a1.shape[0] * torch.sqrt(tail1 * tail2)
        return bound > _series_tolerance(rho.dtype) * torch.sqrt(total1 * total2)

    def _direct_pairs(
        self, q1: Tensor, q2: Tensor, rho: Tensor, mask: Tensor, value: Tensor, slope: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Two-dimensional trapezoid rule for the pairs in ``mask``."""
        shape = mask.shape
        q1m = q1.expand(shape)[mask].to(torch.float64)
        q2m = q2.expand(shape)[mask].to(torch.float64)
        rhom = rho.detach().expand(shape)[mask].to(torch.float64).clamp(-1.0, 1.0)
        z, weights = self._nodes(max(_max_or_zero(q1m), _max_or_zero(q2m)), hermite=False)
        z, weights = z.to(rho.device), weights.to(rho.device)
        values, slopes = [], []
        chunk = max(1, 2**22 // (z.numel() ** 2))
        for start in range(0, q1m.numel(), chunk):
            sl = slice(start, start + chunk)
            r = rhom[sl, None, None]
            u = safe_sqrt(q1m[sl])[:, None, None] * z[None, :, None]
            v = safe_sqrt(q2m[sl])[:, None, None] * (r * z[None, :, None] + _sin_from_cos(r) * z[None, None, :])
            w2 = weights[:, None] * weights[None, :]
            values.append((self.fn(u) * self.fn(v) * w2).sum((-1, -2)))
            ud, vd = u.detach(), v.detach()
            slopes.append((self.derivative(ud) * self.derivative(vd) * w2).sum((-1, -2)))
        direct_value = torch.cat(values).to(value.dtype)
        direct_slope = torch.cat(slopes).to(slope.dtype)
        value = value.masked_scatter(mask, direct_value)
        slope = slope.masked_scatter(mask, direct_slope)
        return value, slope

    def __repr__(self) -> str:
        return f"QuadratureActivation(name={self.name!r}, weight_variance_bound={self.weight_variance_bound:.6g})"


def _tail_ratio(coef: Tensor, total: Tensor, order: int) -> float:
    """Largest relative tail ``T_K(q) / D(q)`` over the points."""
    tail = total.detach() - (coef[: order + 1].detach() ** 2).sum(0)
    return float((tail / total.detach().clamp_min(1e-300)).max()) if tail.numel() else 0.0


def _pair_index(coef: Tensor, shape: torch.Size, mask: Tensor) -> Tensor:
    """Flat indices into a broadcast coefficient stack's point dims for the pairs in ``mask``."""
    points = coef[0]
    flat = torch.arange(points.numel(), device=coef.device).reshape(points.shape)
    return flat.expand(shape)[mask]


def _max_or_zero(t: Tensor) -> float:
    return float(t.detach().max()) if t.numel() else 0.0


def _series_tolerance(dtype: torch.dtype) -> float:
    # Relative truncation error allowed in the Hermite series: below the accuracy the
    # kernel promises (1e-10 in float64), and below float32 rounding.
    return 1e-12 if dtype == torch.float64 else 1e-8


def estimate_weight_variance_bound(activation: Activation) -> float:
    r"""Numerical estimate of ``1 / max(sup_t E[phi'(tZ)^2], sup_t E[phi'(tZ)^2 Z^2])``.

    The suprema are taken over a logarithmic grid of scales ``t`` from 1e-3 to 1e3 (and
    ``t = 0``), each expectation by the trapezoid rule. Returns ``inf`` for an activation
    with zero derivative.
    """
    z, weights = _trapezoid_nodes(0.005, 12.0)
    scales = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-3, 3, 601, dtype=torch.float64)])
    best = 0.0
    for t in scales:
        d = activation.derivative(t * z) ** 2
        best = max(best, float((d * weights).sum()), float((d * z * z * weights).sum()))
    if not math.isfinite(best):
        raise ValueError(f"activation {activation.name!r} has an unbounded derivative; pass weight_variance_bound")
    return math.inf if best == 0.0 else 1.0 / best


# --------------------------------------------------------------------------- registry


# Derivatives of the named quadrature activations, at module level so that they pickle.


def _tanh_d1(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x) ** 2


def _tanh_d2(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return -2 * t * (1 - t * t)


def _sigmoid_d1(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _sigmoid_d2(x: Tensor) -> Tensor:
    return _sigmoid_d1(x) * (1 - 2 * torch.sigmoid(x))


def _silu_d1(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_d2(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _make_named() -> dict[str, Callable[..., Activation]]:
    def tanh() -> Activation:
        # tanh' = 1 - tanh^2 peaks at 0 with value 1: both suprema are 1, so w < 1, sharp.
        return QuadratureActivation(
            torch.tanh,
            name="tanh",
            derivative=_tanh_d1,
            second_derivative=_tanh_d2,
            weight_variance_bound=1.0,
            analytic_strip=_PI / 2,
        )

    def sigmoid() -> Activation:
        # sigmoid' <= 1/4, reached at 0: both suprema are 1/16, so w < 16.
        return QuadratureActivation(
            torch.sigmoid,
            name="sigmoid",
            derivative=_sigmoid_d1,
            second_derivative=_sigmoid_d2,
            weight_variance_bound=16.0,
            analytic_strip=_PI,
        )

    def softplus() -> Activation:
        # softplus' = sigmoid < 1 tends to the step as t grows: both suprema are 1/2
        # (approached, not reached), so w < 2, as for relu.
        return QuadratureActivation(
            torch.nn.functional.softplus,
            name="softplus",
            derivative=torch.sigmoid,
            second_derivative=_sigmoid_d1,
            weight_variance_bound=2.0,
            analytic_strip=_PI,
        )

    def silu() -> Activation:
        # sup_t E[silu'(tZ)^2 Z^2] = 0.563343 at t = 1.759 dominates
        # (sup_t E[silu'(tZ)^2] = 0.508392): w < 1.775 (rounded down).
        return QuadratureActivation(
            torch.nn.functional.silu,
            name="silu",
            derivative=_silu_d1,
            second_derivative=_silu_d2,
            weight_variance_bound=1.775,
            analytic_strip=_PI,
        )

    def leaky_relu(negative_slope: float = 0.01) -> Activation:
        return PiecewiseLinear(negative_slope, name="leaky_relu")

    return {
        "relu": lambda: PiecewiseLinear(0.0, name="relu"),
        "leaky_relu": leaky_relu,
        "abs": lambda: PiecewiseLinear(-1.0, name="abs"),
        "identity": lambda: PiecewiseLinear(1.0, name="identity"),
        "step": Step,
        "erf": Erf,
        "gelu": Gelu,
        "sin": Sin,
        "cos": Cos,
        "tanh": tanh,
        "sigmoid": sigmoid,
        "softplus": softplus,
        "silu": silu,
    }


_FACTORIES = _make_named()
#: Names accepted for ``activation``.
ACTIVATIONS: tuple[str, ...] = tuple(_FACTORIES)
_CACHE: dict[tuple[str, tuple[tuple[str, Any], ...]], Activation] = {}


def get_activation(activation: str | Activation | Callable[[Tensor], Tensor] = "relu", **kwargs: Any) -> Activation:
    """Resolve ``activation`` (a name, an :class:`Activation`, or a callable) to an Activation.

    Keyword arguments are the activation's options (``negative_slope`` for
    ``leaky_relu``; those of :class:`QuadratureActivation` for a callable).
    """
    if isinstance(activation, Activation):
        if kwargs:
            raise TypeError(f"activation options {sorted(kwargs)} cannot be applied to an Activation instance")
        return activation
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _FACTORIES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} or a callable, got {activation!r}")
        cache_key = (key, tuple(sorted(kwargs.items())))
        try:
            return _CACHE[cache_key]
        except KeyError:
            pass
        except TypeError:  # unhashable option value: build without caching
            cache_key = None  # type: ignore[assignment]
        try:
            act = _FACTORIES[key](**kwargs)
        except TypeError as exc:
            raise TypeError(f"invalid options for activation {key!r}: {exc}") from None
        if cache_key is not None:
            _CACHE[cache_key] = act
        return act
    if callable(activation):
        return QuadratureActivation(activation, **kwargs)
    raise TypeError(f"activation must be one of {', '.join(ACTIVATIONS)} or a callable, got {activation!r}")
