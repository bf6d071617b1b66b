r"""From validated tensors to the kernel: the diagonal, the pairs, and the output the caller asked for.

:func:`solve` is the engine's one entry point. It forms :math:`s(x, x')`, solves the diagonal
fixed points (:mod:`.diagonal`), hands the pairs to the solver the plan chooses
(:mod:`.plan`), and assembles the NNGP kernel, the equilibrium covariance or the neural
tangent kernel (:mod:`.ntk`) from what the solvers return.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..activations import Activation
from . import plan
from .complement import arcsine_near_possible, near_one
from .diagonal import solve_diagonal
from .general import snap_correlation
from .ntk import tangent_kernel
from .pairs import Pairs, inner, scatter_diagonal

__all__ = ["solve"]


def solve(
    act: Activation,
    x1: Tensor,
    x2: Tensor,
    symmetric: bool,
    w: Tensor,
    iv: Tensor,
    b: Tensor,
    ov: Tensor,
    *,
    diag: bool,
    output: str,
    batch: torch.Size,
) -> Tensor:
    """The kernel of validated inputs ``(..., n, d)``, ``(..., m, d)`` and hyperparameter tensors."""
    d = x1.shape[-1]
    # s(x, x') = <x * input_variance / d, x'> + bias_variance
    scale = (iv / d).unsqueeze(-2) if iv.dim() >= 2 else iv / d
    x1s = x1 * scale
    s11 = (x1s * x1).sum(-1) + b.unsqueeze(-1)
    w_point, ov_point = w.unsqueeze(-1), ov.unsqueeze(-1)
    q1, d1 = solve_diagonal(act, s11, w_point)

    if output == "ntk":
        derivative = act.derivative_activation()  # raises for the step activation
    if diag and symmetric:
        if output == "ntk":
            out = tangent_kernel(d1, q1, derivative.diag_dual(q1)[0], w_point, ov_point)
        else:
            out = ov_point * d1 if output == "nngp" else q1
        return out.expand(*batch, x1.shape[-2])

    if symmetric:
        s22, q2, d2 = s11, q1, d1
    else:
        s22 = (x2 * scale * x2).sum(-1) + b.unsqueeze(-1)
        q2, d2 = solve_diagonal(act, s22, w_point)
    outer = not diag
    pairs = Pairs(x1, x1s, x2, scale, b, q1, q2, d1, d2, s11, s22, symmetric, outer)
    w_b, ov_b = (w_point.unsqueeze(-1), ov_point.unsqueeze(-1)) if outer else (w_point, ov_point)
    if output == "ntk":
        out = _ntk(act, derivative, pairs, w_b, ov_b)
    elif act.offers.near_one in ("step", "distance"):
        # One solve of the requested output; the correlation for the pairs near +-1 from it.
        out = _pair_output(act, pairs, w_b, ov_b, output == "nngp")
        with torch.no_grad():
            if output == "nngp":
                rho = _value_correlation(act, pairs, out / torch.where(ov_b > 0, ov_b, 1.0), w_b)
            else:
                rho = pairs.correlation(out)
        out = near_one(act, pairs, rho, None, out, w_b, ov_b, output)
    elif act.offers.near_one == "arcsine" and arcsine_near_possible(pairs):
        # Both outputs from one solve, for the correlation of the pairs near one (re-solved)
        value, cov = plan.choose(act, pairs, w_b, ov_b).both(act, pairs, w_b, ov_b)
        with torch.no_grad():
            rho = pairs.correlation(cov)
        out = near_one(act, pairs, rho, None, value if output == "nngp" else cov, w_b, ov_b, output)
    else:
        out = _pair_output(act, pairs, w_b, ov_b, output == "nngp")
    if output != "ntk" and outer:
        same = _repeated_points(x1, x2, symmetric)
        if same is not None:
            # A pair of equal inputs is the diagonal's pair: its exact value (the pair solvers
            # reach it only to the conditioning of the dual at correlation 1, which for erf at
            # large variance left a 2x2 matrix of duplicates with an eigenvalue of -2e-12 of
            # its entries). The gradient stays the pair solver's.
            exact = (ov_b * d1.unsqueeze(-1)) if output == "nngp" else q1.unsqueeze(-1)
            out, exact = torch.broadcast_tensors(out, exact)
            out = torch.where(same, out + (exact - out).detach(), out)
    return out.expand(*batch, x1.shape[-2], *((x2.shape[-2],) if outer else ()))


@functools.lru_cache(maxsize=16)
def _direction(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed direction in ``R^d`` with distinct, irregular components (for :func:`_repeated_points`)."""
    direction = torch.linspace(1.0, 2.0, d, dtype=dtype, device=device)
    return direction * torch.linspace(-1.0, 1.0, d, dtype=dtype, device=device).exp()


def _repeated_points(x1: Tensor, x2: Tensor, symmetric: bool) -> Tensor | None:
    """``(n, m)`` mask of the pairs of equal rows, off the diagonal of a symmetric matrix; ``None`` if there are none.

    For unbatched inputs only. A projection on a fixed direction, sorted, finds candidate
    repeats in O(n log n); only then are the rows compared exactly.
    """
    if x1.dim() != 2 or x2.dim() != 2 or x1.shape[0] * x2.shape[0] == 0:
        return None
    direction = _direction(x1.shape[-1], x1.dtype, x1.device)
    points = x1.detach() if symmetric else torch.cat([x1.detach(), x2.detach()])
    keys = (points @ direction).sort().values
    if not bool((keys[1:] == keys[:-1]).any()):
        return None
    _, group = torch.unique(points, dim=0, return_inverse=True)
    g1, g2 = (group, group) if symmetric else (group[: x1.shape[0]], group[x1.shape[0] :])
    same = g1.unsqueeze(-1) == g2.unsqueeze(-2)
    if symmetric:
        same.fill_diagonal_(False)  # the diagonal is exact already
    return same if bool(same.any()) else None


def _value_correlation(act: Activation, p: Pairs, value: Tensor, w: Tensor) -> Tensor:
    """The correlation of pairs from their dual ``E[phi(u) phi(v)]``, for the step and cos (to find those near +-1).

    The step's dual is ``(pi - theta) / (2 pi)``, so ``rho = -cos(2 pi V)``. cos's dual
    ``e^{-Q/2} cosh(K*)`` is even in ``K*`` and does not give its sign (reading it back as the
    larger root took antipodal points for near-duplicates, and their re-solve overflowed to an
    infinite kernel); the pair equation does: ``K* = s12 + w V``.
    """
    if act.offers.near_one == "step":
        return -torch.cos((2.0 * math.pi) * value)
    cov = inner(p) + w * value
    tiny = torch.finfo(value.dtype).tiny
    return (cov / torch.sqrt(p.rows(p.q1) * p.cols(p.q2)).clamp_min(tiny)).clamp(-1.0, 1.0)


def _pair_output(act: Activation, p: Pairs, w: Tensor, ov: Tensor, nngp: bool) -> Tensor:
    """``ov * E[phi(u) phi(v)]`` (``nngp``) or ``K*`` of the pairs, by the solver the plan chooses."""
    return plan.choose(act, p, w, ov).run(act, p, w, ov, nngp)


def _ntk(act: Activation, derivative: Activation, p: Pairs, w: Tensor, ov: Tensor) -> Tensor:
    """The neural tangent kernel (see :mod:`.ntk`) from the equilibrium quantities."""
    one = torch.ones_like(ov)
    value, cov = plan.choose(act, p, w, one).both(act, p, w, one)
    rho = snap_correlation(p.correlation(cov), torch.finfo(cov.dtype).eps)
    # Identical points (correlation 1, where some derivative duals have infinite slope)
    # and zero-variance points take the diagonal's value; the others the pair dual.
    s12 = inner(p)
    s11r, s22c = p.rows(p.s11), p.cols(p.s22)
    eps = torch.finfo(s12.dtype).eps
    identical = (s11r + s22c - 2.0 * s12).detach() <= 8.0 * eps * (s11r + s22c).detach()
    square = p.outer and p.symmetric
    if square:
        identical = identical | identical.mT  # the product s12 need not be bitwise symmetric
    zero = (p.rows(p.q1) * p.cols(p.q2)).detach() == 0
    special = identical | zero
    state1, state2 = derivative.prepare(p.q1, None if p.symmetric else p.q2)
    state2 = state1 if state2 is None else state2
    slope = derivative.pair_dual(
        tuple(p.rows(t) for t in state1), tuple(p.cols(t) for t in state2), torch.where(special, 0.0, rho)
    )[0]
    e1 = derivative.diag_dual(p.q1)[0]
    e2 = e1 if p.q2 is p.q1 else derivative.diag_dual(p.q2)[0]
    slope = torch.where(identical, 0.5 * (p.rows(e1) + p.cols(e2)), slope)  # symmetric in the two points
    if square:
        slope = 0.5 * (slope + slope.mT)  # a quadrature fallback may integrate in one order of the pair
    out = tangent_kernel(value, cov, slope, w, ov)
    if act.offers.near_one is not None:
        # "identical" above is judged on s, to its rounding: points a few ulps apart are re-solved too
        out = near_one(act, p, rho, zero, out, w, ov)
    if square:
        diagonal = tangent_kernel(p.d1, p.q1, derivative.diag_dual(p.q1)[0], w.squeeze(-1), ov.squeeze(-1))
        out = scatter_diagonal(out, diagonal)
    return out
