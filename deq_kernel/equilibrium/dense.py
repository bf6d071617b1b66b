r"""Small pair arrays, solved whole: the relu family and erf, eagerly, with gradients by autograd.

Most Gaussian-process and Bayesian-optimisation problems have a few dozen to a few hundred
points, and their hyperparameters change at every optimiser step. There the fused solvers'
per-call set-up (a correlation table per weight variance, row blocks, compiled kernels)
costs more than the pairs themselves. This solver takes the whole pair array at once:

1. the normalised covariance :math:`\tilde c` comes out of one matrix product, as for the
   fused solvers (:func:`.pairs.operands`);
2. the pair equation is solved without a graph, by Newton's method from a start on the
   side of the root where the iteration is monotone (see below), under the stopping rule
   of :mod:`.newton`;
3. the root re-enters the graph through a small autograd function whose derivative is the
   implicit function theorem's, :math:`-(\partial r/\partial\vartheta)/(\partial r/\partial\rho)`,
   in reverse and forward mode; autograd carries it to the inputs and hyperparameters
   through the product and the diagonal (written in plain torch operations).

The relu family solves :math:`G(\rho) = \rho - w\kappa(\rho) = \tilde c`. ``kappa`` is convex
(:math:`\kappa'' = (1-a)^2/(2\pi\sin\theta) \ge 0`), so ``G`` is concave and increasing, and
``kappa`` lies above its quadratic Taylor polynomial at 0 (``kappa''`` is smallest there):
the root of the quadratic truncation lies left of the root, and Newton's method on a
concave increasing function started left of its root increases monotonically to it.
erf solves :math:`t - \alpha\arcsin t = \beta` in the arcsine variable by the monotone
steps of :mod:`.arcsine`, with the same a-posteriori bound.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from .. import settings
from .._autograd import first_derivatives_only
from ..activations import Activation
from .arcsine import BOUND_EPS, NEWTON_STEPS, arcsine_resolves, solve_block
from .newton import unconverged
from .pairs import Pairs, broadcast_shapes, operands, product, root_and_inverse, with_exact_diagonal
from .table import correlation_root

__all__ = ["DENSE_PAIRS", "dense", "dense_both", "dense_refuses", "dense_suits"]

#: Largest pair array (batch included) the dense solver takes: beyond it the fused
#: solvers' set-up pays for itself and their row blocks bound the memory.
DENSE_PAIRS = 1 << 17

_TWO_OVER_PI = 2.0 / math.pi


def dense_refuses(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> str | None:
    """Why the dense solver cannot serve these pairs, or ``None`` if it can (at any size)."""
    kind = act.offers.pair_equation
    if kind is None:
        return f"activation {act.name!r} has no one-product pair equation (relu family, erf)"
    if kind == "arcsine" and not arcsine_resolves(p.q1, p.q2):
        return "the variances are too large for the arcsine variable in this dtype"
    return None


def dense_suits(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> bool:
    """Whether the pair array is small enough for the dense solver to be the fastest."""
    return math.prod(broadcast_shapes(p.rows(p.q1).shape, p.cols(p.q2).shape, w.shape)) <= DENSE_PAIRS


def dense(act: Activation, p: Pairs, w: Tensor, ov: Tensor, nngp: bool) -> Tensor:
    """``ov * E[phi(u) phi(v)]`` (``nngp``) or ``K*`` of the pairs; see the module docstring."""
    value, cov = _solve(act, p, w)
    return with_exact_diagonal(p, value * ov, ov, True) if nngp else with_exact_diagonal(p, cov, ov, False)


def dense_both(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> tuple[Tensor, Tensor]:
    """``ov * E[phi(u) phi(v)]`` and ``K*`` of the pairs from one solve (what the NTK needs)."""
    value, cov = _solve(act, p, w)
    return with_exact_diagonal(p, value * ov, ov, True), with_exact_diagonal(p, cov, ov, False)


def _solve(act: Activation, p: Pairs, w: Tensor) -> tuple[Tensor, Tensor]:
    """``E[phi(u) phi(v)]`` and ``K*`` at the pairs' fixed points, differentiable.

    A symmetric matrix is solved on its upper triangle only (half the pairs; the matrix is
    then bitwise symmetric by construction) and unpacked by one gather per output.
    """
    if p.outer and p.symmetric:
        n = p.q1.shape[-1]
        i, j, flat, flat_t, back = _triangle(n, p.q1.device)

        def rows(t: Tensor) -> Tensor:
            return t.index_select(-1, i)

        def cols(t: Tensor) -> Tensor:
            return t.index_select(-1, j)

        def pair_product(left: Tensor, right: Tensor) -> Tensor:
            lhs, rhs, two_sided = operands(p, left, right)
            c = (lhs @ rhs.mT).flatten(-2)
            upper = c.index_select(-1, flat)
            return 0.5 * (upper + c.index_select(-1, flat_t)) if two_sided else upper

        def unpack(t: Tensor) -> Tensor:
            return t.index_select(-1, back).unflatten(-1, (n, n))

        w = w.squeeze(-1)  # (..., 1, 1) -> (..., 1), against the triangle's one dimension
    else:
        rows, cols = p.rows, p.cols

        def pair_product(left: Tensor, right: Tensor) -> Tensor:
            return product(p, left, right)

        def unpack(t: Tensor) -> Tensor:
            return t

    if act.offers.pair_equation == "correlation_table":
        r1, inv1 = root_and_inverse(p.q1)
        r2, inv2 = (r1, inv1) if p.q2 is p.q1 else root_and_inverse(p.q2)
        rho, kappa = _relu_family(act.negative_slope, pair_product(inv1, inv2), w)
        root = rows(r1) * cols(r2)
        return unpack(root * kappa), unpack(root * rho)
    # erf: r = sqrt(q + 1/2), so that the arcsine's argument is t = K* / (r1 r2).
    r1 = torch.sqrt(p.q1 + 0.5)
    r2 = r1 if p.q2 is p.q1 else torch.sqrt(p.q2 + 0.5)
    c = pair_product(1.0 / r1, 1.0 / r2)
    r1, r2 = rows(r1), cols(r2)
    t, theta = _erf(c, r1, r2, w)
    return unpack(_TWO_OVER_PI * theta), unpack((r1 * r2) * t)


@functools.lru_cache(maxsize=8)
def _triangle(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The upper triangle of an ``n x n`` matrix: its rows and columns, its flat positions and
    those of its mirror image, and for each flat position of the matrix its pair in the triangle."""
    i, j = torch.triu_indices(n, n, device=device)
    flat, flat_t = i * n + j, j * n + i
    back = torch.empty(n * n, dtype=torch.long, device=device)
    position = torch.arange(i.numel(), device=device)
    back[flat] = position
    back[flat_t] = position
    return i, j, flat, flat_t, back


class _Root(torch.autograd.Function):
    """A solved root ``x*`` of ``x - b g(x) - c = 0`` as a function of ``(c, b)``: ``dx = (dc + g db) / r'``.

    ``slope`` is ``r' = 1 - b g'(x*)`` and ``gain`` is ``g(x*)``, both at the root. The
    derivatives are the implicit function theorem's, in reverse and forward mode; they are
    first derivatives only, so a backward pass that would build a graph for a second one
    (``create_graph=True``) raises instead of returning a wrong one (:mod:`deq_kernel._autograd`).
    """

    @staticmethod
    def forward(ctx: Any, root: Tensor, c: Tensor, b: Tensor, gain: Tensor, slope: Tensor) -> Tensor:
        ctx.save_for_backward(gain, slope)
        ctx.save_for_forward(gain, slope)
        ctx.shapes = (c.shape, b.shape)
        return root.clone()

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        gain, slope = ctx.saved_tensors
        c_shape, b_shape = ctx.shapes
        lam = grad / slope
        grad_c = lam.sum_to_size(c_shape) if ctx.needs_input_grad[1] else None
        grad_b = (lam * gain).sum_to_size(b_shape) if ctx.needs_input_grad[2] else None
        return None, grad_c, grad_b, None, None

    @staticmethod
    def jvp(ctx: Any, _root: None, tangent_c: Tensor | None, tangent_b: Tensor | None, *_: None) -> Tensor:
        gain, slope = ctx.saved_tensors
        change = torch.zeros_like(slope) if tangent_c is None else tangent_c.expand_as(slope)
        if tangent_b is not None:
            change = change + gain * tangent_b
        return change / slope


def _relu_family(a: float, c: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``rho`` and ``kappa(rho)`` at the root of ``rho - w kappa(rho) = c``, differentiable."""
    with torch.no_grad():
        rho, kappa, kappa_prime = correlation_root(a, c.detach(), w.detach())
        slope = 1.0 - w.detach() * kappa_prime
    root = _Root.apply(rho, c, w, kappa, slope)
    return root, kappa + kappa_prime * (root - rho)  # d kappa = kappa' d rho


def _erf(c: Tensor, r1: Tensor, r2: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` and ``asin t`` at the root of ``t - alpha asin t = c``, ``alpha = 2 w / (pi r1 r2)``, differentiable."""
    with torch.no_grad():
        t, theta, s, alpha = _erf_root(c.detach(), r1.detach(), r2.detach(), w.detach())
        slope = 1.0 - alpha / s  # d/dt (t - alpha asin t), asin' = 1 / s
    root = _Root.apply(t, c, (_TWO_OVER_PI * w) / (r1 * r2), theta, slope)
    return root, theta + (root - t) / s


def _erf_root(c: Tensor, r1: Tensor, r2: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The arcsine solver's steps, continued until its error bound holds (without a graph)."""
    eps = torch.finfo(c.dtype).eps
    tol = BOUND_EPS * eps
    # alpha = 2 w / (pi r1 r2) for any broadcast w, formed as (r1 r2) (1 / w) so that a symmetric
    # matrix stays bitwise symmetric (w = 0: alpha = 0).
    params = torch.tensor([1.0, 1.0 - eps], dtype=c.dtype, device=c.device)
    root, inv_w = r1 * r2, 1.0 / w
    max_iter = settings.max_iterations.value()
    for steps in range(min(NEWTON_STEPS, max_iter), max_iter + 1):
        t, theta, s, alpha, miss = solve_block(c, root, inv_w, params, steps)
        worst = float(miss.abs().amax()) if c.numel() else 0.0
        if worst <= tol:
            return t, theta, s, alpha
    raise unconverged("erf pair", worst, tol, max_iter, measure="error bound")
