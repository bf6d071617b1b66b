"""GELU: a closed-form dual, and a Hermite series for the engine."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import _PI, _TWO_PI, Activation, Offers, State, safe_sqrt
from .hermite import hermite_expansion


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
    offers = Offers(hermite_series=True)

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
        return hermite_expansion(self, q.detach().to(torch.float64), order, self._series_spacing(order))

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
