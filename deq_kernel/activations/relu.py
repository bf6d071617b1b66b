"""The arc-cosine family: relu, leaky_relu, abs, identity (piecewise linear), their derivative, and the step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import _PI, _TWO_PI, Activation, Offers, State, _orthant, _sin_from_cos, safe_divide, safe_sqrt


def kappa_from_angle(
    negative_slope: float | Tensor, cos_t: Tensor, sin_t: Tensor, theta: Tensor
) -> tuple[Tensor, Tensor]:
    """``(kappa, kappa')`` of :class:`PiecewiseLinear` from the angle ``theta = arccos(rho)`` and its cosine and sine.

    Pure elementwise code (``negative_slope`` may be a tensor), shared by the activation and
    the engine's fused correlation-table kernels.
    """
    a = negative_slope
    k1 = (1.0 - a) ** 2
    pi_minus = _PI - theta
    kappa = k1 * (sin_t + pi_minus * cos_t) / _TWO_PI + a * cos_t
    kappa_prime = k1 * pi_minus / _TWO_PI + a
    return kappa, kappa_prime


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

    offers = Offers(pair_equation="correlation_table", linear_diagonal=True, near_one="angle")

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

    def kappa(self, rho: Tensor) -> tuple[Tensor, Tensor]:
        """``(kappa(rho), kappa'(rho))``: the dual of unit-variance inputs and its slope."""
        rho = rho.clamp(-1.0, 1.0)
        return kappa_from_angle(self.negative_slope, rho, _sin_from_cos(rho), torch.arccos(rho))

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
    offers = Offers(near_one="step")

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
        slope = safe_divide(1.0, denom)
        return value, slope
