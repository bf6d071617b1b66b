r"""The pairs of a call: per-point quantities, the operands of the one matrix product, and the solvers' adapters.

Every pair solver starts from the same per-point data (:class:`Pairs`: the inputs, the
diagonal fixed points and the inputs' own covariances). The fused solvers read their pair
equation off one matrix product whose operands fold each point's normalisation in
(:func:`operands`); each adapter below turns the pairs into one solver's arguments and
returns the requested output, ``E[phi(u) phi(v)]`` scaled by the output variance
(``nngp``) or ``K*`` (``cov``). Which adapter runs is decided by :mod:`.plan` alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..activations import Activation, safe_divide, safe_sqrt
from .arcsine import arcsine_kernel
from .general import solve_pairs
from .series import series_kernel, series_plan
from .table import homogeneous_kernel

__all__ = [
    "COVERAGE_SAMPLE",
    "Pairs",
    "broadcast_shapes",
    "inner",
    "inverse",
    "one_product_both",
    "operands",
    "product",
    "sampled_coverage",
    "scatter_diagonal",
    "unbatched",
    "with_exact_diagonal",
]


class Pairs(NamedTuple):
    """Per-point quantities the pair computation needs.

    ``outer``: all pairs ``(x1_i, x2_j)`` (a matrix), else the elementwise pairs ``(x1_i, x2_i)``.
    """

    x1: Tensor
    x1s: Tensor  # x1 * input_variance / d
    x2: Tensor
    scale: Tensor  # input_variance / d, broadcasting against x
    bias: Tensor
    q1: Tensor
    q2: Tensor
    d1: Tensor
    d2: Tensor
    s11: Tensor
    s22: Tensor
    symmetric: bool
    outer: bool

    def rows(self, t: Tensor) -> Tensor:
        """A per-point tensor of ``x1`` broadcast against the pair array."""
        return t.unsqueeze(-1) if self.outer else t

    def cols(self, t: Tensor) -> Tensor:
        """A per-point tensor of ``x2`` broadcast against the pair array."""
        return t.unsqueeze(-2) if self.outer else t

    def correlation(self, cov: Tensor) -> Tensor:
        """``cov / sqrt(q1 q2)`` of the pairs, 0 where a variance is 0."""
        return cov * (self.rows(inverse(safe_sqrt(self.q1))) * self.cols(inverse(safe_sqrt(self.q2))))


def broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` of a few short shapes, without its per-call overhead (a hot path)."""
    size = max(len(s) for s in shapes)
    out = [1] * size
    for shape in shapes:
        offset = size - len(shape)
        for i, n in enumerate(shape):
            m = out[offset + i]
            if m == 1:
                out[offset + i] = n
            elif n != 1 and n != m:
                raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
    return torch.Size(out)


def _cat_features(*parts: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], dim=-1)


def operands(p: Pairs, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(lhs, rhs, two_sided)`` with ``lhs @ rhs^T = left_i right_j s(x1_i, x2_j)``.

    Per-point factors are folded into the operands, so that the normalised matrix
    ``s12 / sqrt(q1 q2)`` comes out of a single product. For a symmetric matrix one
    operand serves both sides, which makes the product bitwise symmetric; splitting the
    variances into square roots is exact for the gradient unless a variance that requires
    a gradient is exactly 0, and then the two-operand product is symmetrised instead
    (``two_sided``). For elementwise pairs, ``(lhs * rhs).sum(-1)`` is the product.
    """
    if p.outer and p.symmetric and not any(h.requires_grad and bool((h == 0).any()) for h in (p.scale, p.bias)):
        scale, bias = variance_root(p.scale), variance_root(p.bias)
        a = _cat_features(p.x1 * scale * left.unsqueeze(-1), (bias.unsqueeze(-1) * left).unsqueeze(-1))
        return _aligned(a), _aligned(a), False
    lhs = _cat_features(p.x1s * left.unsqueeze(-1), (p.bias.unsqueeze(-1) * left).unsqueeze(-1))
    rhs = _cat_features(p.x2 * right.unsqueeze(-1), right.unsqueeze(-1))
    if not p.outer:
        return lhs, rhs, False
    return _aligned(lhs), _aligned(rhs), p.symmetric


def _aligned(t: Tensor) -> Tensor:
    """On a GPU, pad the inner dimension of a product operand to a multiple of 8 (aligned rows)."""
    pad = -t.shape[-1] % 8
    return torch.nn.functional.pad(t, (0, pad)) if t.is_cuda and pad else t


def product(p: Pairs, left: Tensor, right: Tensor) -> Tensor:
    """``left_i right_j s(x1_i, x2_j)`` for all pairs (``outer``) or elementwise pairs, differentiable.

    A symmetric matrix comes out bitwise symmetric: a product with itself need not be (BLAS
    blocks it by position), so its upper triangle is mirrored, and every elementwise step after
    it stays symmetric.
    """
    lhs, rhs, two_sided = operands(p, left, right)
    if not p.outer:
        return (lhs * rhs).sum(-1)
    c = lhs @ rhs.mT
    if two_sided:
        return 0.5 * (c + c.mT)
    return c.triu() + c.triu(1).mT if p.symmetric else c


def inner(p: Pairs) -> Tensor:
    """``s(x1_i, x2_j)`` for all pairs (``outer``) or elementwise pairs."""
    return product(p, torch.ones_like(p.q1), torch.ones_like(p.q2))


def inverse(r: Tensor) -> Tensor:
    """``1 / r``, and 0 where ``r`` is 0 (a zero-variance point has covariance 0 with everything)."""
    return safe_divide(1.0, r)


def variance_root(h: Tensor) -> Tensor:
    """:func:`~deq_kernel.activations.safe_sqrt` of a variance, as a plain square root where none is 0.

    The same values and gradients; without the guard's two ``where`` it adds one operation to
    the graph instead of three, which at a few dozen points is much of a call's time. One
    synchronisation says which applies.
    """
    return torch.sqrt(h) if bool((h > 0).all()) else safe_sqrt(h)


def root_and_inverse(q: Tensor) -> tuple[Tensor, Tensor]:
    """``(sqrt(q), 1 / sqrt(q))``, both 0 where ``q`` is (:func:`variance_root`, :func:`inverse`)."""
    if bool((q > 0).all()):
        r = torch.sqrt(q)
        return r, 1.0 / r
    r = safe_sqrt(q)
    return r, inverse(r)


def diagonal_output(p: Pairs, ov: Tensor, nngp: bool) -> Tensor | None:
    """The exact diagonal of a symmetric matrix, from the O(n) diagonal path (else ``None``)."""
    if not (p.outer and p.symmetric):
        return None
    return ov.squeeze(-1) * p.d1 if nngp else p.q1


def with_exact_diagonal(p: Pairs, out: Tensor, ov: Tensor, nngp: bool) -> Tensor:
    """``out`` with a symmetric matrix's diagonal replaced by :func:`diagonal_output`'s exact one."""
    diagonal = diagonal_output(p, ov, nngp)
    return out if diagonal is None else scatter_diagonal(out, diagonal)


def scatter_diagonal(out: Tensor, diagonal: Tensor) -> Tensor:
    """``out`` (a square matrix, batched) with its diagonal replaced by ``diagonal``, broadcast."""
    full = broadcast_shapes(out.shape[:-1], diagonal.shape)
    return torch.diagonal_scatter(out.expand(*full, full[-1]), diagonal.expand(full), dim1=-2, dim2=-1)


def one_product(act: Activation, p: Pairs, w: Tensor, ov: Tensor, nngp: bool) -> Tensor:
    """The relu family's correlation table (:mod:`.table`) or erf's arcsine variable (:mod:`.arcsine`)."""
    table = act.offers.pair_equation == "correlation_table"
    # The relu family: r = sqrt(q); erf: r = sqrt(q + 1/2), never 0.
    if table:
        (r1, inv1), (r2, inv2) = root_and_inverse(p.q1), root_and_inverse(p.q2)
    else:
        r1, r2 = torch.sqrt(p.q1 + 0.5), torch.sqrt(p.q2 + 0.5)
        inv1, inv2 = 1.0 / r1, 1.0 / r2
    lhs, rhs, two_sided = operands(p, inv1, inv2)
    options = dict(
        want="value" if nngp else "cov",
        matrix=p.outer,
        two_sided=two_sided,
        symmetric=p.outer and p.symmetric,
        scale=ov if nngp else None,
        diagonal=diagonal_output(p, ov, nngp),
    )
    if table:
        return homogeneous_kernel(act, lhs, rhs, w, p.rows(r1), p.cols(r2), **options)
    return arcsine_kernel(lhs, rhs, w, p.rows(r1), p.cols(r2), **options)


def one_product_both(act: Activation, p: Pairs, w: Tensor, ov: Tensor) -> tuple[Tensor, Tensor]:
    """``(ov * E[phi(u) phi(v)], K*)`` (what the NTK needs) from one fused solve of ``K*``.

    The value is a closed form of the solved correlation: ``sqrt(q1 q2) kappa(rho)`` for the relu
    family, ``(2/pi) asin(t)`` for erf. Its gradient is the closed form's first derivative
    (``kappa'``, finite at ``rho = +-1`` where autograd through ``arccos`` is not).
    """
    cov = one_product(act, p, w, ov, False)
    if act.offers.pair_equation == "correlation_table":
        rho = p.correlation(cov).clamp(-1.0, 1.0)
        with torch.no_grad():
            kappa, kappa_prime = act.kappa(rho.detach())
        value = (p.rows(safe_sqrt(p.q1)) * p.cols(safe_sqrt(p.q2))) * (kappa + kappa_prime * (rho - rho.detach()))
    else:
        t = cov / (p.rows(torch.sqrt(p.q1 + 0.5)) * p.cols(torch.sqrt(p.q2 + 0.5)))  # |t| < 1
        value = (2.0 / math.pi) * torch.asin(t)
    return with_exact_diagonal(p, value * ov, ov, True), cov


def series(act: Activation, p: Pairs, w: Tensor, ov: Tensor, nngp: bool) -> Tensor:
    """Mehler's series in one fused pass (:mod:`.series`), for one unbatched matrix; see :func:`series_applies`."""
    diagonal = diagonal_output(p, ov, nngp)
    p = unbatched(p)
    if diagonal is not None:
        diagonal = diagonal.reshape(-1)
    inv1, inv2 = torch.rsqrt(p.q1), torch.rsqrt(p.q2)
    lhs, rhs, two_sided = operands(p, inv1, inv2)
    w0 = w.reshape(())

    def exact(i: Tensor, j: Tensor, c: Tensor, q1: Tensor, q2: Tensor, wv: Tensor, value: bool) -> Tensor:
        # The general solver on the pairs (i, j): s12 exactly (its identical-point test needs
        # it), with the gradient of c sqrt(q1 q2).
        root = torch.sqrt(q1 * q2)
        s12 = ((p.x1s[i] * p.x2[j]).sum(-1) + p.bias).detach()
        s12 = s12 + (c * root - (c * root).detach())
        st1, st2 = act.prepare(q1, q2)
        rho, v = solve_pairs(
            act,
            st1,
            st2,
            s12,
            p.s11.detach()[i],
            p.s22.detach()[j],
            wv,
            act.diag_dual(q1)[0],
            act.diag_dual(q2)[0],
            matrix=False,
        )
        return v if value else root * rho

    plan = series_plan(act, p.q1, p.q2, lhs, rhs, float(w0.detach()), two_sided, p.symmetric, exact)
    return series_kernel(
        plan,
        lhs,
        rhs,
        w0,
        p.q1,
        p.q2,
        want="value" if nngp else "cov",
        two_sided=two_sided,
        symmetric=p.symmetric,
        scale=ov.reshape(()) if nngp else None,
        diagonal=diagonal,
    )


def series_applies(p: Pairs, w: Tensor, ov: Tensor) -> str | None:
    """Why :func:`series` cannot serve these pairs, or ``None`` if it can."""
    if not p.outer:
        return "it computes matrices only"
    if w.numel() != 1 or ov.numel() != 1:
        return "it needs scalar hyperparameters"
    if unbatched(p) is None:
        return "it computes one unbatched matrix"
    if not (bool((p.q1 > 0).all()) and bool((p.q2 > 0).all())):
        return "a zero-variance point (zero input without bias) is left to the general solver"
    return None


def general(act: Activation, p: Pairs, w: Tensor, ov: Tensor, nngp: bool) -> Tensor:
    """The general solver (:mod:`.general`): any activation, batch and broadcast pattern."""
    s12 = inner(p)
    state1, state2 = act.prepare(p.q1, None if p.symmetric else p.q2)
    if act.offers.series_states and s12.dtype == torch.float64:
        coverage = sampled_coverage(act, state1, state1 if state2 is None else state2, s12, p, w)
        if coverage is not None:
            state1, state2 = act.narrow(state1, state2, coverage)
    state2 = state1 if state2 is None else state2
    rho, value = solve_pairs(
        act,
        tuple(p.rows(t) for t in state1),
        tuple(p.cols(t) for t in state2),
        s12,
        p.rows(p.s11),
        p.cols(p.s22),
        w,
        p.rows(p.d1),
        p.cols(p.d2),
        matrix=p.outer,
        symmetric=p.symmetric and p.outer,
    )
    out = ov * value if nngp else p.rows(safe_sqrt(p.q1)) * p.cols(safe_sqrt(p.q2)) * rho
    return with_exact_diagonal(p, out, ov, nngp)


def unbatched(p: Pairs) -> Pairs | None:
    """``p`` without its batch dimensions if they are all of size 1, else ``None``."""

    def trailing(t: Tensor, dims: int) -> Tensor | None:
        keep = t.shape[max(t.dim() - dims, 0) :]
        return t.reshape(keep) if t.numel() == math.prod(keep) else None

    matrices = [trailing(t, 2) for t in (p.x1, p.x1s, p.x2)]
    vectors = [trailing(t, 1) for t in (p.q1, p.q2, p.d1, p.d2, p.s11, p.s22)]
    scale = trailing(p.scale, 1)
    bias = trailing(p.bias, 0)
    if any(t is None for t in (*matrices, *vectors, scale, bias)) or p.x1.dim() < 2:
        return None
    x1, x1s, x2 = matrices
    q1, q2, d1, d2, s11, s22 = vectors
    return Pairs(x1, x1s, x2, scale, bias, q1, q2, d1, d2, s11, s22, p.symmetric, p.outer)


#: Pairs sampled to choose the series order of a quadrature activation.
COVERAGE_SAMPLE = 2048


def sampled_coverage(act: Activation, state1: tuple, state2: tuple, s12: Tensor, p: Pairs, w: Tensor) -> float | None:
    """A correlation that all but about 0.1% of the pairs stay below, from a sample of pairs.

    The sample's pairs are solved exactly; a margin of 0.05 is added. Pairs beyond it are
    still exact (the series' bound flags them for the exact dual), only slower. ``None``
    (keep the default) for batched or small problems.
    """
    if not p.outer or s12.dim() != 2 or w.numel() != 1 or s12.numel() < 16 * COVERAGE_SAMPLE:
        return None
    n, m = s12.shape
    # A fixed generator: the same pairs (and so the same result) on every call.
    flat = torch.randint(0, n * m, (COVERAGE_SAMPLE,), generator=torch.Generator().manual_seed(0))
    i, j = (flat // m).to(s12.device), (flat % m).to(s12.device)
    if p.symmetric:
        i, j = i[i != j], j[i != j]
    if i.numel() == 0:
        return None
    with torch.no_grad():
        rho, _ = solve_pairs(
            act,
            tuple(t.detach()[..., i] for t in state1),
            tuple(t.detach()[..., j] for t in state2),
            s12.detach()[i, j],
            p.s11.detach()[i],
            p.s22.detach()[j],
            w.detach().reshape(()),
            p.d1.detach()[i],
            p.d2.detach()[j],
            matrix=False,
        )
    return float(torch.quantile(rho.abs(), 0.999)) + 0.05
