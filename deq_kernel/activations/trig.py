"""sin and cos: duals as exponentials of the variances times hyperbolic functions of the covariance."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Activation, Offers, State, safe_sqrt


class Sin(Activation):
    r"""``phi = sin``: :math:`V = e^{-(q_1 + q_2)/2}\sinh c`, :math:`V_c = e^{-(q_1+q_2)/2}\cosh c`,
    :math:`D(q) = (1 - e^{-2q})/2`.

    Bound: ``w < 1``, sharp: ``cos^2`` peaks at 0 with value 1.
    """

    name = "sin"
    weight_variance_bound = 1.0
    offers = Offers(monotone_diagonal=True)  # D concave

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
    offers = Offers(monotone_diagonal=True, near_one="distance")  # D convex

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
