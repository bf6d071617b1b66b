"""erf (the arcsine kernel) and its derivative, a Gaussian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import _PI, Activation, Offers, State, safe_sqrt


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
    offers = Offers(pair_equation="arcsine", monotone_diagonal=True, near_one="arcsine")

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
