r"""Pairs near correlation +-1, re-solved in a complement of the correlation (relu family, cos, erf, step, gelu).

The activations whose ``offers.near_one`` names a complement have a pair equation that can be
written in it in closed form: the relu family in the angle (below), cos in the distance
``q1 + q2 - 2 K*`` (:func:`_distance_outputs`; its dual is smooth, but near its bound the
pair equation's rounding, ``eps / (1 - w V_c)`` in ``rho``, reached every output, the tangent
kernel squared: inputs at scale 1e-6 near the bound had tangent kernels 1e-11 off with
eigenvalues of -3e-12, and NNGP kernels with eigenvalues of -1.06e-12 of the largest entry), erf in
``1 - t`` of its arcsine variable (:func:`_arcsine_outputs`; the arcsine's slope turned the
rounding of ``t`` into ``eps sqrt(q)`` in every output), and the step in its angle
(:func:`_step_outputs`; its dual ``(pi - theta)/(2 pi)`` has an infinite slope at both ends).
The relu family corrects the tangent kernel; cos, erf and the step every output, the last
two near -1 as well. gelu's tangent kernel is corrected only without the equilibrium
(``weight_variance = 0``), where ``q1 q2 - K*^2`` is the inputs' Gram complement
(:func:`_gram_outputs`); with it, a complement of gelu's pair equation is not written yet.

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
from typing import NamedTuple

import torch
from torch import Tensor

from ..activations import Activation
from .newton import newton
from .pairs import Pairs

__all__ = ["NEAR", "arcsine_near_possible", "near_one"]

#: Pairs with ``1 - rho`` below this are re-solved in the angle.
NEAR = 1e-3


class _Near(NamedTuple):
    """The pairs near correlation one, gathered (float64, without a graph)."""

    u: Tensor  # (k, d): the first point of each pair
    v: Tensor
    metric: Tensor  # (k, d): input_variance / d
    bias: Tensor  # (k,)
    s11: Tensor
    s22: Tensor
    s12: Tensor
    q1: Tensor
    q2: Tensor
    rho: Tensor  # as the pair solver found it
    w: Tensor
    ov: Tensor


def arcsine_near_possible(p: Pairs) -> bool:
    """Whether some pair of erf can have its arcsine variable within :data:`NEAR` of +-1: an O(n) test.

    ``|t| <= sqrt(q1/(q1 + 1/2) q2/(q2 + 1/2))``, so only variances above about ``1/(4 NEAR)``
    can; typical (standardised) inputs have variances of order one and skip the pair test.
    """
    if p.q1.numel() == 0 or p.q2.numel() == 0:
        return False
    q1, q2 = p.q1.detach(), p.q2.detach()
    top1 = float((q1 / (q1 + 0.5)).amax())
    top2 = top1 if p.q2 is p.q1 else float((q2 / (q2 + 0.5)).amax())
    return top1 * top2 > (1.0 - NEAR) ** 2


def near_one(
    act: Activation,
    p: Pairs,
    rho: Tensor,
    skip: Tensor | None,
    out: Tensor,
    w: Tensor,
    ov: Tensor,
    output: str = "ntk",
) -> Tensor:
    """``out`` (the pairs' ``output``) with the pairs near correlation one re-solved.

    ``act.offers.near_one`` says in which complement. ``rho = K* / sqrt(q1 q2)`` is the pairs'
    correlation as solved, ``skip`` the pairs that take another value (zero-variance points;
    ``None``: found here, only if some pair is near one);
    ``w`` and ``ov`` broadcast against the pair array. The relu family corrects the tangent
    kernel only (its NNGP dual has a finite slope at one); cos, erf and the step every output.
    """
    odd = act.offers.near_one == "arcsine"
    if odd and not arcsine_near_possible(p):
        return out
    both_ends = odd or act.offers.near_one == "step"  # re-solved near -1 too
    far = rho.detach().abs() if both_ends else rho.detach()
    square = p.outer and p.symmetric
    near = far > 1.0 - NEAR
    # A quick test first (most calls have no such pair): a count, less the diagonal's own pairs.
    found = int(near.sum()) - (int(near.diagonal(dim1=-2, dim2=-1).sum()) if square else 0)
    if found == 0:
        return out
    near = near.expand(out.shape)
    if square:
        near = near.triu(1)  # solved once per pair and mirrored: the matrix stays bitwise symmetric
    if odd:
        # erf: near one in its arcsine variable t = K* / sqrt((q1 + 1/2)(q2 + 1/2)), which is far
        # below rho at small variances; and erf is odd, so t near -1 is t near 1 for (x, -x').
        ratio = torch.sqrt(p.rows(p.q1 / (p.q1 + 0.5)).detach() * p.cols(p.q2 / (p.q2 + 0.5)).detach())
        near = near & (far * ratio > 1.0 - NEAR)
    if skip is None:
        skip = (p.rows(p.q1) * p.cols(p.q2)).detach() == 0
    near = near & ~skip
    if act.offers.near_one == "gram":
        near = near & (w.detach() == 0)  # one layer: K* = s12 (see _gram_outputs)
    if not bool(near.any()):
        return out
    idx = near.nonzero(as_tuple=True)
    with torch.no_grad():
        pairs = _gather(p, near, idx, rho, w, ov)
        if act.offers.near_one == "angle":
            solved = _angle_tangent(act, pairs)
        elif act.offers.near_one == "distance":
            solved = _distance_outputs(pairs, output)
        elif act.offers.near_one == "step":
            solved = _step_outputs(pairs, output)
        elif act.offers.near_one == "gram":
            solved = _gram_outputs(act, pairs, output)
        else:
            solved = _arcsine_outputs(pairs, output)
        change = torch.zeros(near.shape, dtype=out.dtype, device=out.device)
        change[idx] = solved.to(out.dtype) - out.detach()[idx]
        if square:
            change = change + change.mT
    return out + change


def _gather(p: Pairs, near: Tensor, idx: tuple[Tensor, ...], rho: Tensor, w: Tensor, ov: Tensor) -> _Near:
    shape, d = near.shape, p.x1.shape[-1]
    batch = shape[: -2 if p.outer else -1]
    bidx, i = idx[: len(batch)], idx[len(batch)]
    j = idx[len(batch) + 1] if p.outer else i
    f64 = torch.float64

    def per_pair(t: Tensor) -> Tensor:
        return torch.broadcast_to(t.detach(), shape)[idx].to(f64)

    def rows_of(x: Tensor, k: Tensor) -> Tensor:
        return torch.broadcast_to(x.detach(), (*batch, x.shape[-2], d))[(*bidx, k)].to(f64)

    u, v = rows_of(p.x1, i), rows_of(p.x2, j)
    metric = torch.broadcast_to(p.scale.detach(), (*batch, 1, d))[(*bidx, torch.zeros_like(i))].to(f64)
    bias = per_pair(p.bias[..., None, None] if p.outer else p.bias[..., None])
    return _Near(
        u=u,
        v=v,
        metric=metric,
        bias=bias,
        s11=per_pair(p.rows(p.s11)),
        s22=per_pair(p.cols(p.s22)),
        s12=(metric * u * v).sum(-1) + bias,
        q1=per_pair(p.rows(p.q1)),
        q2=per_pair(p.cols(p.q2)),
        rho=per_pair(rho),
        w=per_pair(w),
        ov=per_pair(ov),
    )


def _input_distance(n: _Near) -> Tensor:
    """``s11 + s22 - 2 s12 = S(e, e)``, ``e = x' - x``: the bias cancels exactly."""
    e = n.v - n.u
    return (n.metric * e * e).sum(-1)


def _gram_complement(n: _Near, sign: Tensor | float = 1.0) -> Tensor:
    """``s11 s22 - s12^2 = S(x,x) S(f,f) - S(x,f)^2 + b S(e,e)`` from the inputs' differences.

    ``e = x' - x``, and ``f = sign x' - x`` the short difference (``sign = -1`` for pairs near
    correlation -1: the Gram part is the same for ``x'`` and ``-x'``). The Gram part vanishes
    for collinear inputs, exactly so for ``d = 1``.
    """
    see = _input_distance(n)
    if n.u.shape[-1] == 1:
        return n.bias * see
    f = (sign.unsqueeze(-1) if isinstance(sign, Tensor) else sign) * n.v - n.u
    gram = (n.metric * n.u * n.u).sum(-1) * (n.metric * f * f).sum(-1) - (n.metric * n.u * f).sum(-1) ** 2
    return gram.clamp_min(0.0) + n.bias * see


def _angle_tangent(act: Activation, n: _Near) -> Tensor:
    """The relu family: the angle's equation (module docstring), then the tangent kernel."""
    root_s = torch.sqrt(n.s11 * n.s22)
    complement = _gram_complement(n) / (root_s * (root_s + n.s12))  # 1 - rho_s
    theta = _solve_angle(act, complement, n.rho, n.w)
    a, m = act.negative_slope, act.variance_gain
    g = (1.0 - a) ** 2 / (2.0 * math.pi)
    delta = 2.0 * torch.sin(0.5 * theta) ** 2
    kappa = m - (g * ((math.pi - theta) * delta + _theta_minus_sin(theta)) + a * delta)
    slope = m - g * theta
    root = torch.sqrt(n.q1 * n.q2)
    return n.ov * root * (kappa + slope * (1.0 - delta) / ((1.0 - n.w * m) + n.w * g * theta))


def _distance_outputs(n: _Near, output: str) -> Tensor:
    r"""cos: the equation of the distance :math:`\Delta = q_1 + q_2 - 2K^*`, then the ``output``.

    With :math:`V = (e^{-\Delta/2} + e^{\Delta/2 - Q})/2`, ``Q = q1 + q2``, the pair equation less
    the two diagonal ones is
    :math:`\Delta = w\,[-\mathrm{expm1}(-\Delta/2) - e^{-Q}\mathrm{expm1}(\Delta/2) + (e^{-q_1} - e^{-q_2})^2/2]
    + S(e, e)`,
    increasing in ``Delta`` (slope ``1 - w V_c``), solved by :func:`.newton.newton` from the
    solver's distance; each term keeps its relative accuracy as ``Delta -> 0``.
    """
    total = n.q1 + n.q2
    damp = torch.exp(-total)
    given = _input_distance(n) + 0.5 * n.w * (torch.exp(-n.q1) - torch.exp(-n.q2)) ** 2
    start = (total - 2.0 * n.rho * torch.sqrt(n.q1 * n.q2)).clamp_min(0.0)

    def lift(dist: Tensor) -> Tensor:  # e^{Delta/2 - Q} - e^{-Q}, without cancellation or overflow
        return torch.where(dist < 1.0, damp * torch.expm1(0.5 * dist), torch.exp(0.5 * dist - total) - damp)

    def residual(dist: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fall, rise = torch.expm1(-0.5 * dist), lift(dist)
        # 1 - w V_c, with e^{-Delta/2} = 1 + fall and e^{Delta/2 - Q} = rise + damp; the terms
        # are all of the size of Delta, so the stopping rule takes the root to rounding.
        slope = 1.0 - 0.5 * n.w * (1.0 + fall - (rise + damp))
        return dist + n.w * (fall + rise) - given, slope, dist + n.w * (fall.abs() + rise) + given

    zero = torch.zeros_like(start)
    dist = newton(residual, start, zero, torch.full_like(start, math.inf), what="cos pair distance").clamp_min(0.0)
    shrink, grow = 1.0 + torch.expm1(-0.5 * dist), lift(dist) + damp
    value, slope = 0.5 * (shrink + grow), 0.5 * (shrink - grow)
    cov = 0.5 * (total - dist)
    if output == "preactivation":
        return cov
    if output == "nngp":
        return n.ov * value
    return n.ov * (value + slope * cov / (1.0 - n.w * slope))


def _gram_outputs(act: Activation, n: _Near, output: str) -> Tensor:
    r"""gelu's tangent kernel at ``weight_variance = 0``, with ``q1 q2 - K*^2`` from the inputs.

    Without the equilibrium (one layer) ``q = s`` and ``K* = s12``, so the complement its closed
    form reads, :math:`q_1 q_2 - K^{*2} = s_{11}s_{22} - s_{12}^2`, is the inputs' Gram
    complement, exact however close the inputs; from the rounded correlation it erred by
    ``eps q1 q2``, which at variances of 1e10 moved the derivative dual by 1e-12 of itself
    and gave near-duplicate rows a tangent kernel with an eigenvalue of -2.3e-12 of the
    largest entry.
    """
    if output != "ntk":  # the NNGP kernel and K* keep their accuracy there
        raise ValueError(f"the Gram complement serves the tangent kernel only, not {output!r}")
    q1, q2 = torch.minimum(n.s11, n.s22), torch.maximum(n.s11, n.s22)
    value, slope = act._value_and_slope(q1, q2, n.s12, complement=_gram_complement(n))
    return n.ov * (value + slope * n.s12)


def _arcsine_outputs(n: _Near, output: str) -> Tensor:
    r"""erf: the arcsine variable's complement ``u = 1 - t``, ``t = K* / (r1 r2)``, ``r = sqrt(q + 1/2)``.

    ``t - alpha asin t = beta`` (:mod:`.arcsine`) is :math:`u - \alpha\arccos(1 - u) = G`,
    :math:`G = (r_1 r_2 - s_{12} - w) / (r_1 r_2)`, convex and increasing past its minimum.
    ``G``'s numerator is :math:`(P - (s_{12} + w)^2) / (r_1 r_2 + s_{12} + w)` with
    ``P = r1^2 r2^2`` and, writing ``q + 1/2 = s + w + h``, ``h = 1/2 - w (1 - D(q))``,
    :math:`P - (s_{12}+w)^2 = (s_{11}s_{22} - s_{12}^2) + w S(e,e) + h_1(s_{22} + w) + h_2(s_{11} + w) + h_1h_2`,
    whose terms are positive at large variances, where ``t`` is near one. Then
    :math:`E[\phi\phi] = 1 - (2/\pi)\arccos t` and the derivative dual
    :math:`(2/\pi)/\sqrt{P u (2 - u)}` keep their accuracy as ``u -> 0``.
    """
    # Near correlation -1 the pair (x, -x') is solved and the odd outputs negated: with
    # v = sign * x', s12 becomes sign * s12, s11 + s22 - 2 sign s12 = S(v - x) + 2 b (1 - sign),
    # and s11 s22 - s12^2 is unchanged (its Gram part taken on the short difference v - x).
    sign = torch.where(n.rho < 0, -1.0, 1.0)
    r1, r2 = torch.sqrt(n.q1 + 0.5), torch.sqrt(n.q2 + 0.5)
    root = r1 * r2
    s12 = sign * n.s12
    short = sign.unsqueeze(-1) * n.v - n.u
    distance = (n.metric * short * short).sum(-1) + 2.0 * n.bias * (1.0 - sign)
    gram = _gram_complement(n, sign)

    def h(q: Tensor) -> Tensor:  # 1/2 - w (1 - D(q)), 1 - D(q) = (2/pi) acos(2q / (1 + 2q))
        return 0.5 - n.w * (2.0 / math.pi) * torch.atan2(torch.sqrt(1.0 + 4.0 * q), 2.0 * q)

    h1, h2 = h(n.q1), h(n.q2)
    gap = (gram + n.w * distance + h1 * (n.s22 + n.w) + h2 * (n.s11 + n.w) + h1 * h2) / (root + s12 + n.w)
    target = gap / root
    alpha = (2.0 / math.pi) * n.w / root
    given = (1.0 - sign * n.rho * torch.sqrt(n.q1 * n.q2) / root).clamp(0.0, 2.0)

    def residual(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        angle = 2.0 * torch.asin(torch.sqrt(0.5 * u))  # acos(1 - u)
        slope = 1.0 - alpha / torch.sqrt(u * (2.0 - u)).clamp_min(1e-300)
        return u - alpha * angle - target, slope, u + alpha * angle + target.abs()

    # Increasing from its minimum, u = 1 - sqrt(1 - alpha^2), where r <= r(0) = -G <= 0, to 2.
    low = alpha * alpha / (1.0 + torch.sqrt((1.0 - alpha * alpha).clamp_min(0.0)))
    high = torch.full_like(low, 2.0)
    u = newton(residual, torch.maximum(given, low), low, high, what="erf pair complement").clamp(0.0, 2.0)
    angle = 2.0 * torch.asin(torch.sqrt(0.5 * u))
    cov = root * (1.0 - u)
    if output == "preactivation":
        return sign * cov
    value = 1.0 - (2.0 / math.pi) * angle
    if output == "nngp":
        return sign * n.ov * value
    slope = (2.0 / math.pi) / (root * torch.sqrt(u * (2.0 - u)))  # even in the covariance
    return sign * n.ov * (value + slope * cov / (1.0 - n.w * slope))


def _step_outputs(n: _Near, output: str) -> Tensor:
    r"""The step: ``K* = w (pi - theta)/(2 pi) + s12`` with ``q = w/2 + s``, in the angle.

    :math:`H(\theta) = 2r\sin^2(\theta/2) - w\theta/(2\pi) = r - w/2 - s_{12}`, ``r = sqrt(q1 q2)``,
    whose right side is :math:`(q_1q_2 - (s_{12} + w/2)^2)/(r + s_{12} + w/2)` with
    :math:`q_1q_2 - (s_{12}+w/2)^2 = (s_{11}s_{22} - s_{12}^2) + (w/2) S(e, e)`. The root lies where
    ``H`` increases (:class:`deq_kernel.activations.Step`): :func:`.newton.newton` on the bracket
    ``[theta where H' = 0, pi]``.
    """
    root = torch.sqrt(n.q1 * n.q2)
    s12 = n.s12
    half = 0.5 * n.w
    # Near -1, theta = pi - phi: 2 r sin^2(phi/2) - w phi/(2 pi) = r + s12, the same equation in
    # phi, with r^2 - s12^2 = (s11 s22 - s12^2) + (w/2)(s11 + s22) + w^2/4.
    minus = n.rho < 0
    sign = torch.where(minus, -1.0, 1.0)
    gram = _gram_complement(n, sign)
    target = torch.where(
        minus,
        (gram + half * (n.s11 + n.s22) + half * half) / (root - s12),
        (gram + half * _input_distance(n)) / (root + s12 + half),
    )

    def residual(theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        big, small = 2.0 * root * torch.sin(0.5 * theta) ** 2, n.w * theta / (2.0 * math.pi)
        return big - small - target, root * torch.sin(theta) - n.w / (2.0 * math.pi), big + small + target

    lo = torch.asin((n.w / (2.0 * math.pi * root)).clamp(max=1.0))  # H' = 0: H(lo) <= H(0) = 0
    hi = torch.full_like(lo, math.pi)
    start = torch.arccos((sign * n.rho).clamp(-1.0, 1.0)).clamp(lo, hi)
    theta = newton(residual, start, lo, hi, what="step pair angle", skip=target <= 0)
    theta = torch.where(target > 0, theta, 0.0)  # phi near -1
    if output == "preactivation":
        return sign * root * (1.0 - 2.0 * torch.sin(0.5 * theta) ** 2)
    return n.ov * torch.where(minus, theta, math.pi - theta) / (2.0 * math.pi)


def _solve_angle(act: Activation, complement: Tensor, rho: Tensor, w: Tensor) -> Tensor:
    """The root of ``H(theta) = (1 - w m) complement`` (module docstring) in ``[0, pi]``, from the solver's angle."""
    a, m = act.negative_slope, act.variance_gain
    g = (1.0 - a) ** 2 / (2.0 * math.pi)
    lin = 1.0 - w * m
    target = lin * complement

    def residual(theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        delta, gain, rest = 2.0 * torch.sin(0.5 * theta) ** 2, lin + w * g * theta, w * g * _theta_minus_sin(theta)
        return delta * gain - rest - target, torch.sin(theta) * gain, delta * gain + rest + target

    # The solver's angle where it has one; at a correlation rounded to one, the small-angle root
    # of lin theta^2 / 2 = target (above the root: H grows faster than its first term).
    theta = torch.where(rho < 1.0, 2.0 * torch.asin(torch.sqrt(((1.0 - rho) / 2.0).clamp(0.0, 1.0))), 0.0)
    theta = torch.where(theta > 0, theta, torch.sqrt(2.0 * target / lin.clamp_min(1e-300))).clamp(0.0, math.pi)
    zero = torch.zeros_like(theta)
    theta = newton(residual, theta, zero, torch.full_like(theta, math.pi), what="relu pair angle", skip=complement <= 0)
    return torch.where(complement > 0, theta, 0.0)


def _theta_minus_sin(theta: Tensor) -> Tensor:
    """``theta - sin(theta)`` to relative rounding: its series below 1/2 (truncated at 3e-17), else directly."""
    t2 = theta * theta
    series = torch.zeros_like(theta)
    for k in range(6, -1, -1):
        series = series * t2 + (-1.0) ** k / math.factorial(2 * k + 3)
    return torch.where(theta < 0.5, theta * t2 * series, theta - torch.sin(theta))
