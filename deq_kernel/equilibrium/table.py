r"""The relu family: the pair equation has one input, so its solution is a table.

For a positively homogeneous activation of degree 1 (relu, leaky_relu, abs, identity)
:math:`V = \sqrt{q_1 q_2}\,\kappa(\rho)`, and the pair equation becomes
:math:`G(\rho) = \rho - w\kappa(\rho) = \tilde c` with :math:`\tilde c = s_{12}/\sqrt{q_1 q_2}`.
Its root :math:`\rho^*(\tilde c)` is tabulated once per weight variance (by the solver's
Newton method, 2048 intervals) and read back by cubic Hermite interpolation, then
polished by one Newton step. The table's abscissa is :math:`\varphi = \arccos(1 - 2t)`,
``t`` the position of :math:`\tilde c` in the range of ``G``, and its ordinate is
:math:`\theta = \arccos\rho`: both ends of ``G`` have square-root behaviour, which this
change of variables makes analytic, so the interpolation error is uniformly
:math:`O(h^4)` (about 1e-12 before polishing, rounding level after).

:math:`\tilde c` itself comes out of one matrix product, with :math:`1/\sqrt{q}` folded into
the operands. Everything after the product is one elementwise pass, run in row blocks by
:mod:`.blocks`. The backward pass recomputes each block and applies the
implicit function theorem, :math:`d\rho = (d\tilde c + \kappa\,dw)/(1 - w\kappa'(\rho))`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from .. import settings
from ..activations import PiecewiseLinear, kappa_from_angle
from .blocks import product_kernel
from .newton import ConvergenceError, tolerance, unconverged

__all__ = ["TABLE_SIZE", "CorrelationTable", "correlation_root", "homogeneous_kernel"]

#: Intervals of the correlation table.
TABLE_SIZE = 2048


class CorrelationTable:
    """``rho*(c_tilde)`` for one weight variance of a relu-family activation.

    Holds the cubic pieces of ``theta(phi)`` on the uniform grid of ``phi`` in [0, pi] in
    the working dtype and device, and ``params = (scale, shift, w, negative_slope)``, where
    ``cos(phi) = scale * c_tilde + shift``, as a tensor so that compiled kernels do not
    specialise on their values. Tables are built and verified in float64 on the CPU
    (a few hundred small operations: cheaper there than as GPU launches) and the most
    recent ones are kept.
    """

    def __init__(self, act: PiecewiseLinear, w: float, dtype: torch.dtype, device: torch.device) -> None:
        self.act = act
        self.w = w
        coefs, params = _build_table(act.negative_slope, act.name, w)
        self.coefs = tuple(c.to(device=device, dtype=dtype) for c in coefs)
        self.params = params.to(device=device, dtype=dtype)

    def solve(self, c_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(rho, kappa(rho), kappa'(rho), residual of the interpolated value)``, elementwise."""
        return _solve(c_tilde, self.params, *self.coefs)

    @staticmethod
    def forward_block(*args: Any) -> None:
        """The block function of :mod:`.blocks`."""
        _forward_block(*args)

    @staticmethod
    def backward_block(*args: Any) -> tuple[Tensor, ...]:
        """The block function of :mod:`.blocks`."""
        return _backward_block(*args)

    @staticmethod
    def forward_saving(*args: Any) -> tuple[Tensor, ...]:
        """:meth:`forward_block` that also returns what the backward pass needs (see :mod:`.blocks`)."""
        return _forward_saving(*args)

    @staticmethod
    def backward_saved(*args: Any) -> tuple[Tensor, ...]:
        """:meth:`backward_block` from the arrays :meth:`forward_saving` returned."""
        return _backward_saved(*args)


@functools.lru_cache(maxsize=64)
def _build_table(negative_slope: float, name: str, w: float) -> tuple[tuple[Tensor, ...], Tensor]:
    act = PiecewiseLinear(negative_slope, name=name)
    a, m = act.negative_slope, act.variance_gain
    g_minus = -1.0 + w * a  # G(-1)
    g_range = (1.0 - w * m) - g_minus  # G(1) - G(-1)
    theta, slope = _tabulate(act, w, g_minus, g_range, torch.device("cpu"))
    h = math.pi / TABLE_SIZE
    t0, t1, d0, d1 = theta[:-1], theta[1:], h * slope[:-1], h * slope[1:]
    coefs = tuple(c.contiguous() for c in (t0, d0, 3.0 * (t1 - t0) - 2.0 * d0 - d1, 2.0 * (t0 - t1) + d0 + d1))
    params = (-2.0 / g_range, 1.0 + 2.0 * g_minus / g_range, w, a)
    _verify(act, params, coefs, g_minus, g_range)
    return coefs, torch.tensor(params, dtype=torch.float64)


def _tabulate(
    act: PiecewiseLinear, w: float, g_minus: float, g_range: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``theta`` and ``dtheta/dphi`` on the grid, in float64, solved by Newton's method."""
    a, m = act.negative_slope, act.variance_gain
    phi = torch.linspace(0.0, math.pi, TABLE_SIZE + 1, dtype=torch.float64, device=device)
    target = g_minus + g_range * (1.0 - torch.cos(phi)) / 2.0

    ends = torch.zeros_like(target, dtype=torch.bool)
    ends[0] = ends[-1] = True
    end_values = torch.sign(phi - 1.0)  # rho = -1 at phi = 0, rho = 1 at phi = pi
    rho, _, _ = correlation_root(a, target, torch.tensor(w, dtype=torch.float64))
    rho = torch.where(ends, end_values, rho)
    theta = torch.arccos(rho)
    _, kappa_prime = act.kappa(rho)
    sin_theta = torch.where(ends, 1.0, torch.sin(theta))
    slope = -(g_range * torch.sin(phi) / 2.0) / (sin_theta * (1.0 - w * kappa_prime))
    # At the ends both sines vanish; the limits follow from G(cos theta) near theta = pi, 0.
    slope[0] = -math.sqrt(g_range / (2.0 * (1.0 - w * a)))
    slope[-1] = -math.sqrt(g_range / (2.0 * (1.0 - w * m)))
    return theta, slope


def correlation_root(a: float, c: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(rho, kappa(rho), kappa'(rho))`` at the root of ``G(rho) = rho - w kappa(rho) = c``, without a graph.

    ``kappa`` is convex (:math:`\kappa'' = (1-a)^2/(2\pi\sin\theta) \ge 0`), so ``G`` is concave and
    increasing, and every tangent line of ``G`` lies above it. Three starts are therefore left of
    the root: the roots of the tangents at -1 and at 1, and the root of the quadratic truncation
    of ``kappa`` at 0 (``kappa''`` is smallest at 0, so ``kappa`` lies above its quadratic Taylor
    polynomial there). Newton's method on a concave increasing function started left of its
    root increases monotonically to it; it starts from the best of the three and stops under
    the rule of :mod:`.newton`. ``c`` past the ends of the range of ``G`` by rounding (identical
    or collinear points) gives ``rho = +-1``.
    """
    k1 = (1.0 - a) ** 2
    g = k1 / (2.0 * math.pi)
    m = (1.0 + a * a) / 2.0
    quad = w * (g / 2.0)
    lin = 1.0 - w * (k1 / 4.0 + a)
    const = c + w * g
    disc = torch.sqrt((lin * lin - 4.0 * quad * const).clamp_min_(0.0))
    rho = (2.0 * const).div_(disc.add_(lin))  # cancellation-free root of the quadratic
    rho = torch.maximum(rho, 1.0 - (1.0 - w * m - c) / (1.0 - w * m))  # tangent at 1: slope 1 - w m
    rho = torch.maximum(rho, -1.0 + (c + 1.0 - w * a) / (1.0 - w * a)).clamp_(-1.0, 1.0)  # tangent at -1
    tol = tolerance(c.dtype)
    max_iter = settings.max_iterations.value()
    one = torch.ones((), dtype=rho.dtype, device=rho.device)
    for iteration in range(max_iter + 1):
        theta = torch.arccos(rho)
        kappa_prime = (math.pi - theta).mul_(g)  # g (pi - theta) + a
        if a:
            kappa_prime.add_(a)
        sin = torch.sin(theta)
        kappa = torch.mul(sin, g).addcmul_(rho, kappa_prime)  # kappa = rho kappa' + g sin(theta)
        r = torch.sub(rho, c).addcmul_(w, kappa, value=-1.0)  # r = rho - c - w kappa
        worst = float(r.abs().amax()) if r.numel() else 0.0
        # The exact rule, |r| <= tol (1 + |w kappa + c|), only where the quick one fails and the
        # exact one can hold: |w kappa + c| = |rho - r| <= 1 + |r|, so not once |r| > 3 tol.
        if tol < worst <= 3.0 * tol:
            worst = float(r.abs().div_((rho - r).abs_().add_(1.0)).amax())
        step = r.div_(torch.addcmul(one, kappa_prime, w, value=-1.0))  # r / (1 - w kappa')
        if worst <= tol:
            # One more Newton step takes the root from the tolerance to rounding level; kappa and
            # kappa' follow to first order (kappa'' = g / sin(theta)), which is exact to rounding.
            curvature = torch.reciprocal(sin).mul_(g).masked_fill_(sin <= 0, 0.0)  # sin(theta) >= 0
            polished = torch.sub(rho, step).clamp_(-1.0, 1.0)
            delta = polished - rho
            return polished, kappa.addcmul_(kappa_prime, delta), kappa_prime.addcmul_(curvature, delta)
        if iteration == max_iter:
            raise unconverged("pair", worst, tol, max_iter)
        rho = rho.sub_(step).clamp_(-1.0, 1.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _verify(act: PiecewiseLinear, params: tuple, coefs: tuple[Tensor, ...], g_minus: float, g_range: float) -> None:
    """Check the interpolated table (before polishing) at four points per interval and both ends.

    The interpolation error of a cubic piece varies smoothly inside its interval, so this
    bounds it everywhere; one Newton step then squares it. A table that misses raises
    instead of producing a wrong matrix.
    """
    probes = torch.linspace(0.0, 1.0, 4 * TABLE_SIZE + 1, dtype=torch.float64, device=coefs[0].device)
    c_tilde = g_minus + g_range * probes
    residual = _solve(c_tilde, torch.tensor(params, dtype=torch.float64, device=c_tilde.device), *coefs)[3]
    worst = float(residual.abs().max())
    if not worst <= 1e-8:
        raise ConvergenceError(
            f"the correlation table of {act.name} at weight_variance={params[2]:.6g} misses the fixed point "
            f"by {worst:.3g}",
            residual=worst,
            iterations=1,
        )


# --------------------------------------------------------------------------- kernels
# Pure elementwise functions of a block: run eagerly or fused by torch.compile.


def _solve(
    c_tilde: Tensor, params: Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Table look-up, cubic interpolation of theta and one Newton polish of rho."""
    scale, shift, w, a = params[0], params[1], params[2], params[3]
    n = c0.shape[0]
    cos_phi = (c_tilde * scale + shift).clamp(-1.0, 1.0)
    pos = torch.arccos(cos_phi) * (n / math.pi)
    idx = pos.long().clamp(max=n - 1)
    u = pos - idx
    flat = idx.reshape(-1)  # index_select of a flat index: about half the time of c[idx]

    def piece(c: Tensor) -> Tensor:
        return c.index_select(0, flat).view(idx.shape)

    theta = piece(c0) + u * (piece(c1) + u * (piece(c2) + u * piece(c3)))
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    kappa, kappa_prime = kappa_from_angle(a, cos_t, sin_t, theta)
    r = cos_t - w * kappa - c_tilde
    delta = r / (w * kappa_prime - 1.0)
    return (cos_t + delta).clamp(-1.0, 1.0), kappa + kappa_prime * delta, kappa_prime, r


def _forward_block(
    out: Tensor,
    c_tilde: Tensor,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    c0: Tensor,
    c1: Tensor,
    c2: Tensor,
    c3: Tensor,
    value: bool,
) -> None:
    """Write the block's result into ``out`` (compiled, one fused loop that stores in place)."""
    rho, kappa, _, _ = _solve(c_tilde, params, c0, c1, c2, c3)
    # (r1 r2) first: for a symmetric block with r1 = r2 the product is bitwise symmetric.
    out.copy_((r1 * r2) * (kappa if value else rho) * scale)


def _derivative(kappa_prime: Tensor, w: Tensor, value: bool) -> Tensor:
    """``d out / d c_tilde`` at the root.

    ``d rho = (d c_tilde + kappa dw) / (1 - w kappa')`` and ``d kappa = kappa' d rho``.
    """
    slope = 1.0 / (1.0 - w * kappa_prime)
    return slope * kappa_prime if value else slope


def _forward_saving(
    out: Tensor,
    c_tilde: Tensor,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    c0: Tensor,
    c1: Tensor,
    c2: Tensor,
    c3: Tensor,
    value: bool,
) -> tuple[Tensor, ...]:
    """:func:`_forward_block`, returning ``(d out / d c_tilde, kappa[, rho])`` for the backward pass."""
    rho, kappa, kappa_prime, _ = _solve(c_tilde, params, c0, c1, c2, c3)
    out.copy_((r1 * r2) * (kappa if value else rho) * scale)
    derivative = _derivative(kappa_prime, params[2], value)
    return (derivative, kappa) if value else (derivative, kappa, rho)


def _gradients(
    grad: Tensor,
    grad_t: Tensor | None,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    derivative: Tensor,
    kappa: Tensor,
    out: Tensor,
    matrix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dL/dc_tilde, dL/dw, dL/dr1, dL/dr2, dL/dscale)`` of a block, reduced over it where shared."""
    if grad_t is not None:
        grad = grad + grad_t
    root = r1 * r2
    g = grad * scale
    lam = root * g * derivative
    g_root = g * out
    dims = (-2, -1) if matrix else (-1,)
    g_scale = (grad * root * out).sum(dims, keepdim=True)
    if matrix:
        g1, g2 = (g_root * r2).sum(-1, keepdim=True), (g_root * r1).sum(-2, keepdim=True)
        return lam, (lam * kappa).sum(), g1, g2, g_scale
    return lam, (lam * kappa).sum(), g_root * r2, g_root * r1, g_scale


def _backward_saved(
    saved: tuple[Tensor, ...],
    grad: Tensor,
    grad_t: Tensor | None,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    value: bool,
    matrix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_backward_block` from :func:`_forward_saving`'s arrays: no second solve."""
    derivative, kappa = saved[0], saved[1]
    return _gradients(grad, grad_t, r1, r2, scale, derivative, kappa, kappa if value else saved[2], matrix)


def _backward_block(
    c_tilde: Tensor,
    grad: Tensor,
    grad_t: Tensor | None,
    r1: Tensor,
    r2: Tensor,
    scale: Tensor,
    params: Tensor,
    c0: Tensor,
    c1: Tensor,
    c2: Tensor,
    c3: Tensor,
    value: bool,
    matrix: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dL/dc_tilde, dL/dw, dL/dr1, dL/dr2, dL/dscale)``, reduced over the block where shared."""
    rho, kappa, kappa_prime, _ = _solve(c_tilde, params, c0, c1, c2, c3)
    derivative = _derivative(kappa_prime, params[2], value)
    return _gradients(grad, grad_t, r1, r2, scale, derivative, kappa, kappa if value else rho, matrix)


def homogeneous_kernel(
    act: PiecewiseLinear, lhs: Tensor, rhs: Tensor, w: Tensor, r1: Tensor, r2: Tensor, **options: Any
) -> Tensor:
    """Pairs of the relu family, from operands whose product is ``c_tilde = s12 / sqrt(q1 q2)``.

    ``r1 r2 = sqrt(q1 q2)``; ``want="cov"`` gives ``r1 r2 rho*`` (``K*``), ``want="value"``
    gives ``r1 r2 kappa(rho*)`` (``E[phi(u) phi(v)]``). One table is built per distinct weight
    variance. The arguments are those of :func:`deq_kernel.product.product_kernel`.
    """
    dtype, device = lhs.dtype, lhs.device
    return product_kernel(lambda value: CorrelationTable(act, value, dtype, device), lhs, rhs, w, r1, r2, **options)
