"""GELU: a closed-form dual, and a Hermite series for the engine."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import _PI, _TWO_PI, Activation, Offers, State, safe_divide, safe_sqrt
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
    offers = Offers(hermite_series=True, near_one="gram")

    def __call__(self, x: Tensor) -> Tensor:
        return x * _normal_cdf(x)

    def derivative(self, x: Tensor) -> Tensor:
        return _normal_cdf(x) + x * torch.exp(-0.5 * x * x) / math.sqrt(_TWO_PI)

    @staticmethod
    def _value(q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
        return Gelu._value_and_slope(q1, q2, c, slope=False)[0]

    @staticmethod
    def _value_and_slope(
        q1: Tensor, q2: Tensor, c: Tensor, *, slope: bool = True, complement: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``V`` and (with ``slope``) ``dV/dc = E[phi'(u) phi'(v)]``, the dual of :class:`_GeluDerivative`.

        ``complement``: ``q1 q2 - c^2`` where the caller knows it more accurately than from
        ``c`` (near correlation one it is a difference of two nearly equal numbers).

        The slope is that dual's closed form, not the derivative of ``V``'s expression: the
        terms of ``V`` are of the size of the variances, and differentiating them term by term
        cancelled to a relative error of about ``eps * q`` (3e-5 at ``q = 1e12``, ``rho = 1``).
        """
        # Written with e = q1 q2 - c^2 = q1 q2 (1 - rho)(1 + rho) and Delta = det S = e + q1 + q2 + 1,
        # which keep their relative accuracy where the textbook form cancels (large
        # variances, |rho| -> 1, float32). The regression coefficients are then
        # alpha1 = (e + q1)/Delta, beta1 = alpha2 = c/Delta, beta2 = (e + q2)/Delta, and the
        # residual covariance of (u, v) given (a, b) is c/Delta.
        root = safe_sqrt(q1 * q2)
        rho = safe_divide(c, root).clamp(-1.0, 1.0)
        e = q1 * q2 * (1.0 - rho) * (1.0 + rho) if complement is None else complement
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
        return value, _derivative_dual_terms(c, a, b, det, root_det, t)

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        return self._value(q, q, q), self._diagonal_slope(q)

    @staticmethod
    def _diagonal_slope(q: Tensor) -> Tensor:
        r"""``D'(q)`` of ``D(q) = E[phi(u)^2]``, ``u ~ N(0, q)``, in closed form.

        By the heat equation :math:`D'(q) = E[\phi'(u)^2] + E[\phi(u)\phi''(u)]`. The first is
        the derivative's dual at ``c = q``; for the second, ``phi''(u) = (2 - u^2) pdf(u)`` and the
        product of the two Gaussian densities is that of ``v = q/(1 + q)``, where Stein's identity
        gives :math:`E[u\Phi(u)]` and :math:`E[u^3\Phi(u)]`:
        :math:`E[\phi\phi''] = \frac{v}{2\pi\sqrt{1 + 2q}}\big(\frac{2}{1 + q} - \frac{q}{1 + 2q}\big)`.
        """
        a = q + 1.0
        det = 2.0 * q + 1.0
        root_det = torch.sqrt(det)
        slope_dual = _derivative_dual_terms(q, a, a, det, root_det, torch.atan2(root_det, q))
        return slope_dual + q / (a * _TWO_PI * root_det) * (2.0 / a - q / det)

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
        value, slope = self._value_and_slope(q1, q2, rho * safe_sqrt(q1 * q2))
        return value, slope.detach()


class _GeluDerivative(Activation):
    """``gelu'``: its dual in closed form (:func:`_derivative_dual_terms`), differentiable in turn."""

    name = "gelu'"
    weight_variance_bound = math.inf

    def __call__(self, x: Tensor) -> Tensor:
        return Gelu().derivative(x)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.exp(-0.5 * x * x) * (2.0 - x * x) / math.sqrt(_TWO_PI)

    @staticmethod
    def _dual(q1: Tensor, q2: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
        """``E[gelu'(u) gelu'(v)]`` (differentiable) and its derivative in the covariance (a plain value).

        In float64 whatever the inputs' dtype: ``e = q1 q2 (1 - rho)(1 + rho)`` carries the
        distance from ``rho = +-1`` with its relative accuracy.
        """
        q1, q2, rho = q1.double(), q2.double(), rho.double()
        c = rho * safe_sqrt(q1 * q2)
        a, b = q1 + 1.0, q2 + 1.0
        det = q1 * q2 * (1.0 - rho) * (1.0 + rho) + q1 + q2 + 1.0
        root_det = torch.sqrt(det)
        t = torch.atan2(root_det, c)
        value = _derivative_dual_terms(c, a, b, det, root_det, t)
        with torch.no_grad():
            curvature = (1.0 + (a + b) / det + (det + 3.0 * c * c) / (det * det)) / (_TWO_PI * root_det)
        return value, curvature

    def diag_dual(self, q: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            qd = q.detach().requires_grad_(True)
            value = self._dual(qd, qd, torch.ones_like(qd))[0]
            (d,) = torch.autograd.grad(value.sum(), qd)
        return self._dual(q, q, torch.ones_like(q))[0].to(q.dtype), d.to(q.dtype)

    def pair_dual(self, state1: State, state2: State, rho: Tensor) -> tuple[Tensor, Tensor]:
        # Ordered variances: (i, j) and (j, i) give bitwise equal results.
        q1, q2 = torch.minimum(state1[0], state2[0]), torch.maximum(state1[0], state2[0])
        value, curvature = self._dual(q1, q2, rho)
        return value.to(rho.dtype), curvature.to(rho.dtype)


def _derivative_dual_terms(c: Tensor, a: Tensor, b: Tensor, det: Tensor, root_det: Tensor, t: Tensor) -> Tensor:
    r"""``E[gelu'(u) gelu'(v)]`` from the quantities of :meth:`Gelu._value_and_slope`.

    ``gelu'(u) = (1 + d/dl) Phi(l u)`` at ``l = 1``, and
    :math:`E[\Phi(l u)\Phi(m v)] = 1/4 + \arcsin(r)/(2\pi)`, ``r = l m c / sqrt((l^2 q1 + 1)(m^2 q2 + 1))``;
    applying ``(1 + d/dl)(1 + d/dm)`` at ``l = m = 1`` gives
    :math:`\frac{\pi - t}{2\pi} + \frac{c}{2\pi\sqrt\Delta}\big(\frac1A + \frac1B + \frac1\Delta\big)`,
    every term positive where ``c`` is, so nothing cancels at large variances.
    """
    return (_PI - t) / _TWO_PI + c / (_TWO_PI * root_det) * (1.0 / a + 1.0 / b + 1.0 / det)


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))
