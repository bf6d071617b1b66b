r"""erf: the pair equation in the arcsine variable, solved in one fused pass.

For :math:`\phi = \mathrm{erf}`, :math:`V = \frac{2}{\pi}\arcsin t` with
:math:`t = 2c/\sqrt{P}`, :math:`P = (1 + 2q_1)(1 + 2q_2)` (Williams, 1997). With
:math:`r_i = \sqrt{q_i + 1/2}`, so that :math:`\sqrt{P} = 2 r_1 r_2`, the pair equation
:math:`c = w V + s_{12}` becomes

.. math:: t - \alpha \arcsin t = \beta,\qquad
          \alpha = \frac{2w}{\pi r_1 r_2},\quad \beta = \frac{s_{12}}{r_1 r_2},

two numbers per pair: :math:`\beta` comes out of one matrix product with :math:`1/r` folded
into the operands, :math:`\alpha` from the point factors. On the range the pair can reach,
:math:`\sqrt{1 - t^2} > \alpha` (the equilibrium map is a contraction for
:math:`w < \pi/4`), so :math:`f(t) = t - \alpha\arcsin t - \beta` is increasing there, concave
for :math:`t > 0` and convex for :math:`t < 0`. Newton's method started on the side of
the root towards 0 therefore approaches it monotonically, never leaving the range, and
needs no bracket. The start solves the cubic truncation
:math:`t(1 - \alpha) - \alpha t^3/6 = \beta` to first order, which stays on that side
because :math:`\arcsin t \ge t + t^3/6` for :math:`t \ge 0`.

A block takes :data:`NEWTON_STEPS` steps, then one more evaluation gives the Newton
correction :math:`\delta`, which is applied (to :math:`t` and, linearly, to
:math:`\theta = \arcsin t`) and bounds what is left: after it the relative error of
:math:`\theta` is at most about :math:`\delta^2 / (2 s^2 (s - \alpha))`, :math:`s = \sqrt{1 - t^2}`.
A block whose bound exceeds eight machine epsilons is iterated further, eagerly, until it
holds (or :class:`~deq_kernel.ConvergenceError` is raised). The backward pass
recomputes the block and applies the implicit function theorem,
:math:`dt = (d\beta + \theta\,d\alpha) / (1 - \alpha/s)`.

The variable :math:`t` resolves :math:`1 - t` only to the working precision, which matters
for saturated pairs of large variances (:math:`1 - t \approx 1/(4q)`); calls whose largest
variance would lose accuracy that way (:func:`arcsine_resolves`: in float32 above about
:math:`q = 90`, in float64 above about :math:`2.5 \cdot 10^9`) are left to the general solver,
whose correlation variable keeps it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import settings
from .blocks import product_kernel
from .newton import unconverged

__all__ = ["NEWTON_STEPS", "arcsine_kernel", "arcsine_resolves", "solve_block"]

#: Newton steps per block before the final, checked correction. Three quarters of the
#: pairs of a broad random sample of variances, correlations and weight variances are at
#: rounding level after two, all but a few in ten thousand after three.
NEWTON_STEPS = 2

_TWO_OVER_PI = 2.0 / math.pi
#: A block is accepted when its error bound is at most this many machine epsilons.
BOUND_EPS = 8.0


#: Accuracy the arcsine variable must keep, relative to ``V``, by dtype.
ACCURACY = {torch.float64: 1e-11, torch.float32: 1e-6}


def arcsine_resolves(q1: Tensor, q2: Tensor) -> bool:
    """Whether the arcsine variable resolves every pair of these variances to :data:`ACCURACY`.

    The rounding of ``beta`` (``eps``) moves ``V`` by about ``(2/pi) eps / s``, and
    ``s = sqrt(1 - t^2) >= 1 / sqrt(2 q + 1)`` for the largest variance ``q``: large variances
    in float32 (``q`` above about 90) would lose digits that the correlation variable of the
    general solver keeps, and are left to it.
    """
    eps = torch.finfo(q1.dtype).eps
    largest = max(float(q.detach().max()) if q.numel() else 0.0 for q in (q1, q2))
    return _TWO_OVER_PI * eps * math.sqrt(2.0 * largest + 1.0) <= ACCURACY.get(q1.dtype, 1e-11)


def _newton_step(t: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(delta, s, theta)`` at ``t``: the Newton correction, ``sqrt(1 - t^2)`` and ``arcsin t``."""
    s = torch.sqrt((1.0 - t) * (1.0 + t))
    theta = torch.asin(t)
    return (t - alpha * theta - beta) * s / (s - alpha), s, theta


def solve_block(c: Tensor, r1: Tensor, r2: Tensor, params: Tensor, steps: int) -> tuple[Tensor, ...]:
    """``(t, theta, s, alpha, miss)`` at the root for ``beta = c``, ``miss`` the error bound.

    ``params = (w, t_max)``: ``|t|`` is kept below ``t_max = 1 - eps``. A root beyond it is
    one whose distance from +-1 the rounding of ``beta`` does not resolve (variances of order
    ``1/eps``); it is returned as ``+-t_max``, which is as accurate as the inputs allow.
    """
    root = r1 * r2
    alpha = (_TWO_OVER_PI * params[0]) / root
    t_max = params[1]
    t = c / (1.0 - alpha)
    t = (t + alpha * t * t * t / (6.0 * (1.0 - alpha))).clamp(-t_max, t_max)
    for _ in range(steps):
        t = (t - _newton_step(t, alpha, c)[0]).clamp(-t_max, t_max)
    delta, s, theta = _newton_step(t, alpha, c)
    delta = torch.where((t.abs() >= t_max) & (delta * t <= 0.0), 0.0, delta)  # saturated
    miss = (delta * delta / (2.0 * s * s * (s - alpha))).abs()
    t = t - delta
    # s at the corrected root, for the implicit derivatives (at t before the correction it is
    # off by about delta t / s, which would cost gradients digits).
    return t, theta - delta / s, torch.sqrt((1.0 - t) * (1.0 + t)), alpha, miss


def _output(t: Tensor, theta: Tensor, r1: Tensor, r2: Tensor, scale: Tensor, value: bool) -> Tensor:
    # (r1 r2) first: for a symmetric block with r1 = r2 the product is bitwise symmetric.
    return (_TWO_OVER_PI * theta if value else (r1 * r2) * t) * scale


def _forward_block(
    out: Tensor,
    c: Tensor,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    value: bool,
) -> Tensor:
    """Write the block's result into ``out``; return its largest error bound."""
    t, theta, _, _, miss = solve_block(c, r1, r2, params, NEWTON_STEPS)
    out.copy_(_output(t, theta, r1, r2, scale, value))
    return miss.amax()


def _backward_block(
    c: Tensor,
    grad: Tensor,
    grad_t: Tensor | None,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    value: bool,
    matrix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dL/dc, dL/dw, dL/dr1, dL/dr2, dL/dscale)``, reduced over the block where shared."""
    t, theta, s, alpha, _ = solve_block(c, r1, r2, params, NEWTON_STEPS)
    if grad_t is not None:
        grad = grad + grad_t
    root = r1 * r2
    g = grad * scale
    # dt = (dc + theta dalpha) s / (s - alpha); alpha = 2 w / (pi r1 r2).
    lam = g * (_TWO_OVER_PI if value else root) / (s - alpha)
    if not value:
        lam = lam * s
    g_alpha = lam * theta
    g_root = -g_alpha * alpha / root
    if not value:
        g_root = g_root + g * t
    g_w = (g_alpha * (_TWO_OVER_PI / root)).sum()
    dims = (-2, -1) if matrix else (-1,)
    g_scale = (grad * (_TWO_OVER_PI * theta if value else root * t)).sum(dims, keepdim=True)
    if matrix:
        return lam, g_w, (g_root * r2).sum(-1, keepdim=True), (g_root * r1).sum(-2, keepdim=True), g_scale
    return lam, g_w, g_root * r2, g_root * r1, g_scale


class ArcsineFamily:
    """The erf pair family of :mod:`.blocks` for one weight variance."""

    def __init__(self, w: float, dtype: torch.dtype, device: torch.device) -> None:
        self.w = w
        self.params = torch.tensor([w, 1.0 - torch.finfo(dtype).eps], dtype=dtype, device=device)
        self.coefs: tuple[Tensor, ...] = ()

    forward_block = staticmethod(_forward_block)
    backward_block = staticmethod(_backward_block)

    def check(
        self,
        miss: Tensor,
        out: Tensor,
        c: Tensor,
        r1: Tensor,
        r2: Tensor,
        scale: Tensor,
        value: bool,
    ) -> None:
        """Iterate a block further (eagerly) if its error bound exceeds eight machine epsilons."""
        tol = BOUND_EPS * torch.finfo(c.dtype).eps
        worst = float(miss)
        if worst <= tol:
            return
        max_iter = settings.max_iterations.value()
        for steps in range(NEWTON_STEPS + 1, max_iter + 1):
            t, theta, _, _, bound = solve_block(c, r1, r2, self.params, steps)
            worst = float(bound.amax())
            if worst <= tol:
                out.copy_(_output(t, theta, r1, r2, scale, value))
                return
        raise unconverged("erf pair", worst, tol, max_iter, measure="error bound")


def arcsine_kernel(lhs: Tensor, rhs: Tensor, w: Tensor, r1: Tensor, r2: Tensor, **options: Any) -> Tensor:
    """Pairs of the erf activation, from operands whose product is ``beta = s12 / (r1 r2)``.

    ``r_i = sqrt(q_i + 1/2)``; ``want="cov"`` gives ``K* = r1 r2 t``, ``want="value"`` gives
    ``E[erf(u) erf(v)] = (2/pi) arcsin t``. The arguments are those of
    :func:`deq_kernel.product.product_kernel`.
    """
    dtype, device = lhs.dtype, lhs.device
    return product_kernel(lambda value: ArcsineFamily(value, dtype, device), lhs, rhs, w, r1, r2, **options)
