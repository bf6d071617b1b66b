r"""The relu family's tangent kernel near correlation one, solved in the complement of the correlation.

The derivative dual of a piecewise-linear activation is :math:`\kappa'(\rho) = m - g\theta`
(``theta = arccos rho``, ``g = (1-a)^2/(2 pi)``, ``m = (1+a^2)/2``): its slope in ``rho`` is
infinite at ``rho = 1``, and the tangent kernel divides by :math:`1 - w\kappa'`, which is
small near the bound. A correlation within ``delta = 1 - rho`` of one is found by the pair
solvers as ``rho``, to a rounding of ``eps / (1 - w m)`` at best (the pair equation is a
difference of two numbers near one): relative errors of ``eps / (delta (1 - w m))`` in
``delta``, of the square root of that in ``theta``. Inputs a millionth apart near the bound
gave tangent kernels 2e-5 off, with eigenvalues of -2.5e-4 of the largest.

Here the pair equation is written in the angle itself. With the diagonal exact
(:math:`q = s / (1 - w m)`), ``rho - w kappa(rho) = (1 - w m) rho_s`` becomes

.. math::
    H(\theta) = \delta\,(1 - w m + w g\theta) - w g\,(\theta - \sin\theta) = (1 - w m)(1 - \rho_s),
    \qquad \delta = 2\sin^2(\theta/2),

whose terms keep their relative accuracy as ``theta -> 0`` (``theta - sin theta`` by its
series); :math:`H' = \sin\theta\,(1 - w m + w g\theta) > 0`, so Newton's method from the
solver's angle converges to it. The input correlation's complement comes from the inputs'
differences: with ``e = x' - x`` and the metric ``S`` of the input variances,
:math:`s_{11}s_{22} - s_{12}^2 = S(x,x)S(e,e) - S(x,e)^2 + b\,S(e,e)`.

Only the value is corrected (the pairs within :data:`NEAR` of one, usually few); the
gradient stays that of the pair solver's computation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..activations import Activation
from .pairs import Pairs

__all__ = ["NEAR", "tangent_near_one"]

#: Pairs with ``1 - rho`` below this are re-solved in the angle.
NEAR = 1e-3

#: Most Newton steps from the solver's angle (a few per cent off at worst, so usually 3 or 4).
_STEPS = 40


def tangent_near_one(
    act: Activation, p: Pairs, rho: Tensor, skip: Tensor, out: Tensor, w: Tensor, ov: Tensor
) -> Tensor:
    """``out`` (the tangent kernel of the pairs) with the pairs near correlation one re-solved.

    ``rho`` is the pairs' correlation as solved, ``skip`` the pairs that take another value
    (zero-variance points); ``w`` and ``ov`` broadcast against the pair array.
    """
    near = ((rho.detach() > 1.0 - NEAR) & ~skip).expand(out.shape)
    if p.outer and p.symmetric:
        near = near.triu(1)  # solved once per pair and mirrored: the matrix stays bitwise symmetric
    if not bool(near.any()):
        return out
    idx = near.nonzero(as_tuple=True)
    shape, batch, d = near.shape, near.shape[: -2 if p.outer else -1], p.x1.shape[-1]
    bidx, i = idx[: len(batch)], idx[len(batch)]
    j = idx[len(batch) + 1] if p.outer else i
    f64 = torch.float64

    def per_pair(t: Tensor) -> Tensor:
        return torch.broadcast_to(t.detach(), shape)[idx].to(f64)

    def rows_of(x: Tensor, k: Tensor) -> Tensor:
        return torch.broadcast_to(x.detach(), (*batch, x.shape[-2], d))[(*bidx, k)].to(f64)

    with torch.no_grad():
        u, v = rows_of(p.x1, i), rows_of(p.x2, j)
        metric = torch.broadcast_to(p.scale.detach(), (*batch, 1, d))[(*bidx, torch.zeros_like(i))].to(f64)
        bias = per_pair(p.bias[..., None, None] if p.outer else p.bias[..., None])
        s11, s22 = per_pair(p.rows(p.s11)), per_pair(p.cols(p.s22))
        q1, q2 = per_pair(p.rows(p.q1)), per_pair(p.cols(p.q2))
        w_, ov_ = per_pair(w), per_pair(ov)
        e = v - u
        see = (metric * e * e).sum(-1)
        # S(x,x) S(e,e) - S(x,e)^2 vanishes for collinear inputs (d = 1 exactly)
        gram = ((metric * u * u).sum(-1) * see - (metric * u * e).sum(-1) ** 2).clamp_min(0.0) if d > 1 else 0.0
        root_s = torch.sqrt(s11 * s22)
        s12 = (metric * u * v).sum(-1) + bias
        complement = (gram + bias * see) / (root_s * (root_s + s12))  # 1 - rho_s
        theta, converged = _solve_angle(act, complement, rho.detach().expand(shape)[idx].to(f64), w_)
        a, m = act.negative_slope, act.variance_gain
        g = (1.0 - a) ** 2 / (2.0 * math.pi)
        delta = 2.0 * torch.sin(0.5 * theta) ** 2
        kappa = m - (g * ((math.pi - theta) * delta + _theta_minus_sin(theta)) + a * delta)
        slope = m - g * theta
        root = torch.sqrt(q1 * q2)
        tangent = ov_ * root * (kappa + slope * (1.0 - delta) / ((1.0 - w_ * m) + w_ * g * theta))
        change = torch.zeros(shape, dtype=out.dtype, device=out.device)
        # A pair whose angle did not converge keeps the pair solver's value.
        change[idx] = torch.where(converged, tangent.to(out.dtype) - out.detach()[idx], 0.0)
        if p.outer and p.symmetric:
            change = change + change.mT
    return out + change


def _solve_angle(act: Activation, complement: Tensor, rho: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """The root of ``H(theta) = (1 - w m) complement`` (module docstring) by Newton's method from the solver's angle.

    Also returns which pairs converged (all, unless the step limit was reached).
    """
    a, m = act.negative_slope, act.variance_gain
    g = (1.0 - a) ** 2 / (2.0 * math.pi)
    lin = 1.0 - w * m
    target = lin * complement
    # The solver's angle where it has one; at a correlation rounded to one, the small-angle root
    # of lin theta^2 / 2 = target (above the root: H grows faster than its first term).
    theta = torch.where(rho < 1.0, 2.0 * torch.asin(torch.sqrt(((1.0 - rho) / 2.0).clamp(0.0, 1.0))), 0.0)
    theta = torch.where(theta > 0, theta, torch.sqrt(2.0 * target / lin.clamp_min(1e-300)))
    eps = torch.finfo(theta.dtype).eps
    for _ in range(_STEPS):
        delta = 2.0 * torch.sin(0.5 * theta) ** 2
        gain = lin + w * g * theta
        h = delta * gain - w * g * _theta_minus_sin(theta) - target
        dh = torch.sin(theta) * gain
        new = torch.where(dh > 0, theta - h / torch.where(dh > 0, dh, 1.0), theta).clamp(0.0, math.pi)
        done = bool(((new - theta).abs() <= 4.0 * eps * theta).all())
        theta = new
        if done:
            return torch.where(complement > 0, theta, 0.0), torch.ones_like(theta, dtype=torch.bool)
    converged = (h.abs() <= 16.0 * eps * (delta * gain).abs()) | (complement <= 0)
    return torch.where(complement > 0, theta, 0.0), converged


def _theta_minus_sin(theta: Tensor) -> Tensor:
    """``theta - sin(theta)`` to relative rounding: its series below 1/2 (truncated at 3e-17), else directly."""
    t2 = theta * theta
    series = torch.zeros_like(theta)
    for k in range(6, -1, -1):
        series = series * t2 + (-1.0) ** k / math.factorial(2 * k + 3)
    return torch.where(theta < 0.5, theta * t2 * series, theta - torch.sin(theta))
