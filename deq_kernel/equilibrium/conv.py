r"""Convolutional equilibrium kernels: the pixel fixed points of an infinitely wide convolutional DEQ.

Images have ``C`` channels on an ``H x W`` grid (``P = H W`` pixels). ``A`` is the ``k x k`` patch
average with zeros outside the grid, :math:`(A m)(p) = k^{-2} \sum_\delta m(p + \delta)` on a
vector of pixels. The equilibrium pre-activation covariance between pixel ``p`` of an image
``x`` and pixel ``p'`` of an image ``x'`` (:mod:`deq_kernel.convolutional` states the model)
satisfies

.. math:: \Sigma = w\,A[E\,\phi(u)\phi(v)] + \sigma_u^2 A[\langle x_p, x'_{p'}\rangle / C] + \sigma_b^2,

and ``A`` keeps the offset ``p' - p``. The entries at equal pixels (offset 0) therefore form a
closed system of ``P`` unknowns per pair of images, which is all the ``"flatten"`` readout reads:

* per image, its variances :math:`q(p) = \Sigma_{xx}(p, p)`:
  :math:`q = w A[D(q)] + s`, :math:`s = \sigma_u^2 A[|x_p|^2 / C] + \sigma_b^2`, solved by Newton's
  method with the ``P x P`` Jacobian :math:`I - w A\,\mathrm{diag}(D'(q))` (one small linear
  system per image and step) under the stopping rule of :mod:`.newton`;
* per pair of images, the covariances :math:`c(p) = \Sigma_{xx'}(p, p)`:
  :math:`c = w A[V(q_x, q_{x'}, c)] + s_{xx'}`. The map is a contraction: its Jacobian
  :math:`w A\,\mathrm{diag}(V_c)` has infinity norm at most
  :math:`w \sup |V_c| \le w / \text{bound} < 1`, because ``A``'s rows are non-negative and sum
  to at most 1 and :math:`|V_c| = |E\,\phi'(u)\phi'(v)| \le \sup_q E\,\phi'(\sqrt q Z)^2`
  (Cauchy-Schwarz). It is solved by the iteration of each unknown's own Newton step,
  accelerated by Anderson mixing per pair (:func:`_anderson`), which stops when a step is at
  the rounding level of the map's terms (:func:`.newton.tolerance`) or raises
  :class:`~.newton.ConvergenceError`.

The ``"gap"`` readout needs every pixel pair, :math:`\Sigma_{xx'}(p, p')`: the same equation
with ``A`` moving both pixels by the same offset (:func:`pair_average`), ``P^2`` unknowns per
pair of images, the variances again from the same-pixel system.

Pairs are solved in square tiles of images, whose size bounds the memory
(:data:`TILE_ELEMENTS`); a symmetric matrix is computed on and above its diagonal
and mirrored. Gradients are the implicit function theorem's: the adjoint of each pair tile,
:math:`\lambda = g + J^\top \lambda`, is solved by the same (contracting) iteration and the
adjoint of the variances by the transposed linear systems; one vector-Jacobian product of the
map then gives the gradients of the inputs and hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import settings
from .._autograd import first_derivatives_only
from ..activations import Activation, safe_divide, safe_sqrt
from .general import snap_correlation
from .newton import tolerance, unconverged

__all__ = ["conv_kernel", "pair_average", "patch_average"]


def patch_average(m: Tensor, kernel_size: int) -> Tensor:
    """``A m``: the ``k x k`` average of ``m`` (``(..., H, W)``) around each pixel, zeros outside the grid."""
    shape = m.shape
    flat = m.reshape(-1, 1, shape[-2], shape[-1])
    out = F.avg_pool2d(flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    return out.reshape(shape)


def _pair_value(act: Activation, q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
    """``V(q1, q2, c) = E[phi(u) phi(v)]`` at covariance ``c``, differentiable in ``q1``, ``q2`` and ``c``.

    The activations' duals take the correlation and are differentiable in the variances at a
    fixed correlation; the correlation's own derivative is ``V_c sqrt(q1 q2)`` (Price's theorem).
    """
    root = safe_sqrt(q1 * q2)
    rho = safe_divide(c, root)
    # Correlation 1 to rounding (a pixel with itself) is 1: the derivative activations' duals
    # (the tangent kernel's E') have an infinite slope there, which would turn eps into sqrt(eps).
    fixed = snap_correlation(rho.detach(), torch.finfo(rho.dtype).eps)
    st1, st2 = act.prepare(q1, q2)
    value, slope = act.pair_dual(st1, st2, fixed)
    return value + (slope * root).detach() * (rho - rho.detach())


def _pixel_solve(slope: Tensor, w: Tensor, rhs: Tensor, kernel_size: int, transpose: bool = False) -> Tensor:
    """``x`` of ``(I - w A diag(slope)) x = rhs`` per image (its transpose with ``transpose``).

    ``slope`` is ``(n, H, W)``; ``rhs`` is ``(n, H, W)`` or ``(n, H, W, k)`` (``k`` right-hand sides).
    The ``P x P`` system of an image's pixels: the Newton step of its variances, their
    tangents and adjoint, and the tangent kernel of an image with itself.
    """
    n, h, wd = slope.shape
    pixels = h * wd
    eye = torch.eye(pixels, dtype=slope.dtype, device=slope.device)
    average = patch_average(eye.reshape(pixels, h, wd), kernel_size).reshape(pixels, pixels).T  # A m = average @ m
    system = eye - w * average * slope.reshape(n, 1, pixels)
    if transpose:
        system = system.mT
    out = torch.linalg.solve(system, rhs.reshape(n, pixels, -1))
    return out.reshape(rhs.shape)


class _Equilibrium(torch.autograd.Function):
    """``z* = f(z*, *params)`` as a function of ``params``: ``solve`` finds it, the backward pass is implicit.

    ``adjoint(out, z, grad, *params)`` returns the solution ``lambda`` of
    ``lambda = grad + J^T lambda``, ``J`` the Jacobian of ``out = f(z, *params)`` in ``z`` (a
    graph built at the fixed point).
    """

    @staticmethod
    def forward(
        ctx: Any, f: Callable[..., Tensor], solve: Callable[..., Tensor], adjoint: Callable, *params: Tensor
    ) -> Tensor:
        z = solve(*params)
        ctx.f, ctx.adjoint = f, adjoint
        ctx.save_for_backward(z, *params)
        return z

    @staticmethod
    @first_derivatives_only
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        z, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            z_ = z.detach().requires_grad_(True)
            leaves = [p.detach().requires_grad_(bool(n)) for p, n in zip(params, needs, strict=True)]
            out = ctx.f(z_, *leaves)
            lam = ctx.adjoint(out, z_, grad, *leaves)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            found = torch.autograd.grad(out, wanted, lam, allow_unused=True) if wanted else ()
        it = iter(found)
        grads = [next(it) if leaf.requires_grad else None for leaf in leaves]
        return (None, None, None, *grads)


#: Mixing steps allowed per ``settings.max_iterations`` (a Newton iteration's count): the
#: convergence is linear, and near the weight-variance bound (contraction 0.99) it took 80.
MIXING_STEPS = 3
#: Steps combined for the linear equations of tangents and adjoints, where mixing acts as a
#: Krylov method and a longer memory pays (near the weight-variance bound, tens of steps
#: instead of hundreds).
LINEAR_MEMORY = 8
#: Within this many tolerances of convergence the mixing stops (plain steps finish).
_PLAIN_BELOW = 10.0
#: Past steps that Anderson mixing combines (see :func:`_anderson`): on the digits' pairs two
#: took as few iterations as three to twelve, each cheaper.
ANDERSON_MEMORY = 2


def _anderson(
    step: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
    z: Tensor,
    what: str,
    problems: int = 1,
    memory: int = ANDERSON_MEMORY,
) -> Tensor:
    """The fixed point of ``step`` by Jacobi-preconditioned Anderson mixing, problem by problem.

    ``step(z)`` returns the map's value ``F(z)``, the size of its terms (for the stopping rule)
    and the diagonal of its Jacobian ``d``. The iteration is that of the map
    ``G(z) = z + (F(z) - z) / (1 - d)``, each unknown's own Newton step, a contraction
    whenever ``F`` is one (its Jacobian is the off-diagonal part of ``F``'s over ``1 - d``),
    and exact when the unknowns decouple (``kernel_size=1``). Each problem (the entries of
    ``z`` that share its first ``problems`` indices: one pair of images) extrapolates from
    its last ``memory`` steps (:data:`ANDERSON_MEMORY` for the nonlinear pair equation, where a
    longer memory made the steps erratic near the bound; :data:`LINEAR_MEMORY` for tangents and
    adjoints): ``z <- G_k - dG gamma``, where ``gamma`` fits the latest step
    ``g_k = G_k - z_k`` by the differences of consecutive steps (least squares, with a small
    ridge). Where a problem's step grows past ten times its smallest, its extrapolation is
    replaced by the plain step of ``G``, and so are all steps once the largest is within
    :data:`_PLAIN_BELOW` tolerances (where the differences are rounding noise). It stops when
    every entry of ``F(z) - z`` is at the rounding level of the map's terms
    (:func:`.newton.tolerance`, relative to the size ``step`` gives) and returns ``F`` of the
    last iterate; else it raises :class:`~.newton.ConvergenceError` after :data:`MIXING_STEPS`
    times ``settings.max_iterations`` steps.
    """
    tol = tolerance(z.dtype)
    max_iter = MIXING_STEPS * settings.max_iterations.value()
    tiny = torch.finfo(z.dtype).tiny
    batch = math.prod(z.shape[:problems])
    flat = z.reshape(batch, -1)
    dfs: list[Tensor] = []
    dgs: list[Tensor] = []
    previous: tuple[Tensor, Tensor] | None = None
    best = None
    worst = math.inf
    for _ in range(max_iter):
        new, size, slope = step(flat.reshape(z.shape))
        residual = new.reshape(batch, -1) - flat
        worst = float((residual.abs() / size.reshape(batch, -1).clamp_min(tiny)).amax()) if flat.numel() else 0.0
        if worst <= tol:
            return new
        g = residual / (1.0 - slope.reshape(batch, -1))  # the Newton step of each unknown alone
        f = flat + g
        norm = g.norm(dim=-1)
        best = norm if best is None else torch.minimum(best, norm)
        if previous is not None:
            dfs.append(f - previous[0])
            dgs.append(g - previous[1])
            if len(dgs) > memory:
                dfs.pop(0)
                dgs.pop(0)
        previous = (f, g)
        if not dgs or worst <= _PLAIN_BELOW * tol:
            # Close to the solution the differences are rounding noise, which the least
            # squares fit would amplify: plain steps from there.
            flat = f
            continue
        gram = torch.stack([torch.stack([(u * v).sum(-1) for v in dgs], -1) for u in dgs], -2)
        ridge = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(tiny)
        gram = gram + ridge.reshape(-1, 1, 1) * torch.eye(len(dgs), dtype=z.dtype, device=z.device)
        rhs = torch.stack([(u * g).sum(-1) for u in dgs], -1)
        gamma = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
        mixed = f
        for k, df in enumerate(dfs):
            mixed = mixed - gamma[:, k : k + 1] * df
        keep = (norm <= 10.0 * best) & torch.isfinite(mixed).all(-1)
        flat = torch.where(keep.unsqueeze(-1), mixed, f)
    raise unconverged(what, worst, tol, max_iter, measure="relative step")


def _solve_variances(act: Activation, s: Tensor, w: Tensor, kernel_size: int) -> Tensor:
    """The images' variances ``q = w A[D(q)] + s`` (``s``: ``(n, H, W)``), by Newton's method, without a graph."""
    tol = tolerance(s.dtype)
    max_iter = settings.max_iterations.value()
    q = s.clone()
    worst = math.inf
    for _ in range(max_iter + 1):
        d, dd = act.diag_dual(q)
        mapped = w * patch_average(d, kernel_size)
        r = q - mapped - s
        size = q.abs() + mapped.abs() + s.abs()
        worst = float((r.abs() / size.clamp_min(torch.finfo(s.dtype).tiny)).amax()) if q.numel() else 0.0
        q = torch.maximum(q - _pixel_solve(dd, w, r, kernel_size), s)  # q >= s: D >= 0
        if worst <= tol:
            return q  # one more Newton step, as every solver takes
    raise unconverged("image variance", worst, tol, max_iter)


def image_variances(act: Activation, s: Tensor, w: Tensor, kernel_size: int) -> Tensor:
    """``q = w A[D(q)] + s`` per image, differentiable in ``s`` and ``w`` (implicit function theorem)."""

    def f(q: Tensor, s_: Tensor, w_: Tensor) -> Tensor:
        d, dd = act.diag_dual(q)
        d = d.detach() + dd.detach() * (q - q.detach())  # first derivatives, from D'
        return w_ * patch_average(d, kernel_size) + s_

    def adjoint(out: Tensor, q: Tensor, grad: Tensor, _s: Tensor, w_: Tensor) -> Tensor:
        # lambda = grad + J^T lambda with J = w A diag(D'): the transposed Newton systems.
        with torch.no_grad():
            return _pixel_solve(act.diag_dual(q)[1], w_, grad, kernel_size, transpose=True)

    return _Equilibrium.apply(f, lambda s_, w_: _solve_variances(act, s_, w_, kernel_size), adjoint, s, w)


def pair_average(m: Tensor, kernel_size: int) -> Tensor:
    """``A M`` on pixel pairs: ``(A M)(p, p') = k^-2 sum_delta M(p + delta, p' + delta)``, ``m``: ``(..., H, W, H, W)``.

    Both pixels move by the same offset; a pixel outside the grid contributes zero.
    """
    r = kernel_size // 2
    h, w = m.shape[-4], m.shape[-3]
    padded = F.pad(m, (r, r, r, r, r, r, r, r))
    out = torch.zeros_like(m)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ys, xs = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
            out += padded[..., ys, xs, ys, xs]
    return out / kernel_size**2


def _pair_covariances(
    act: Activation,
    q1: Tensor,
    q2: Tensor,
    s: Tensor,
    w: Tensor,
    kernel_size: int,
    average: Callable[[Tensor, int], Tensor],
    problems: int,
    start: Tensor | None = None,
) -> Tensor:
    """``c = w A[V(q1, q2, c)] + s`` for a tile of pairs, differentiable; ``A`` is ``average``.

    The first ``problems`` dimensions of ``s`` index the pairs (each its own problem for the
    mixing); ``start`` (default ``s``) is where the iteration starts.
    """

    def f(c: Tensor, q1_: Tensor, q2_: Tensor, s_: Tensor, w_: Tensor) -> Tensor:
        return w_ * average(_pair_value(act, q1_, q2_, c), kernel_size) + s_

    def solve(q1_: Tensor, q2_: Tensor, s_: Tensor, w_: Tensor) -> Tensor:
        # Without a graph: the states and 1 / sqrt(q1 q2) once, then the map alone.
        st1, st2 = act.prepare(q1_, q2_)
        root = safe_sqrt(q1_ * q2_)
        inv_root = safe_divide(1.0, root)
        scale = 1.0 + s_.abs()
        centre = w_ / kernel_size**2  # A's diagonal: the centre of every patch is on the grid

        def step(c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            value, slope = act.pair_dual(st1, st2, (c * inv_root).clamp_(-1.0, 1.0))
            mapped = average(value, kernel_size).mul_(w_)
            return mapped + s_, mapped.abs().add_(scale), slope.mul(centre)

        return _anderson(step, (s_ if start is None else start).clone(), "pair", problems=problems)

    def adjoint(out: Tensor, c: Tensor, grad: Tensor, q1_: Tensor, q2_: Tensor, *_: Tensor) -> Tensor:
        # The map's Jacobian has the same diagonal in either direction: w A_pp V_c.
        with torch.no_grad():
            st1, st2 = act.prepare(q1_, q2_)
            root = safe_sqrt(q1_ * q2_)
            rho = safe_divide(c, root).clamp(-1.0, 1.0)
            diagonal = act.pair_dual(st1, st2, rho)[1] * (w.detach() / kernel_size**2)
        return _solve_adjoint(out, c, grad, diagonal, problems)

    return _Equilibrium.apply(f, solve, adjoint, q1, q2, s, w)


def _solve_adjoint(out: Tensor, z: Tensor, grad: Tensor, diagonal: Tensor, problems: int) -> Tensor:
    """``lambda = grad + J^T lambda`` for the graph ``out = f(z)``, whose Jacobian has ``diagonal``, by mixing."""

    def step(lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        back = torch.autograd.grad(out, z, lam, retain_graph=True)[0]
        return grad + back, 1.0 + back.abs() + grad.abs(), diagonal

    return _anderson(step, grad.clone(), "adjoint pair", problems=problems, memory=LINEAR_MEMORY)


def _tangent_terms(
    derivative: Activation,
    qa: Tensor,
    qb: Tensor,
    c: Tensor,
    w: Tensor,
    kernel_size: int,
    average: Callable[[Tensor, int], Tensor],
    problems: int,
) -> Tensor:
    """``E' T`` of a tile of pairs, ``T = w A[E' T] + c``, ``E' = E[phi'(u) phi'(v)]`` at covariance ``c``.

    ``T`` is the covariance of the pre-activations' parameter gradients (see
    :func:`conv_kernel`); a linear fixed point with the pair map's contraction, differentiable.
    """
    slope = _pair_value(derivative, qa, qb, c)

    def f(t: Tensor, slope_: Tensor, c_: Tensor, w_: Tensor) -> Tensor:
        return w_ * average(slope_ * t, kernel_size) + c_

    def solve(slope_: Tensor, c_: Tensor, w_: Tensor) -> Tensor:
        diagonal = slope_ * (w_ / kernel_size**2)

        def step(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            mapped = w_ * average(slope_ * t, kernel_size)
            return mapped + c_, 1.0 + mapped.abs() + c_.abs(), diagonal

        return _anderson(step, c_.clone(), "tangent pair", problems=problems, memory=LINEAR_MEMORY)

    def adjoint(out: Tensor, t: Tensor, grad: Tensor, slope_: Tensor, *_: Tensor) -> Tensor:
        return _solve_adjoint(out, t, grad, slope_.detach() * (w.detach() / kernel_size**2), problems)

    return slope * _Equilibrium.apply(f, solve, adjoint, slope.expand_as(c), c, w)


#: Pixel pairs per tile (``settings.max_block_size`` overrides it): the iteration holds about
#: a dozen arrays of a tile, which should stay near the cache; the pooled readout's pairs
#: hold ``P^2`` entries each, and larger tiles keep their count (and overhead) down.
TILE_ELEMENTS = {"flatten": 1 << 16, "gap": 1 << 18}


class _Readout:
    """What a readout reads: the same-pixel entries (``"flatten"``) or all pixel pairs (``"gap"``)."""

    def __init__(self, name: str, height: int, width: int) -> None:
        self.name, self.h, self.w = name, height, width
        self.pooled = name == "gap"
        self.entries = (height * width) ** (2 if self.pooled else 1)
        self.average = pair_average if self.pooled else patch_average
        self.dims = 4 if self.pooled else 2  # trailing pixel dimensions of a pair's unknowns

    def gram(self, a: Tensor, b: Tensor, elementwise: bool) -> Tensor:
        """``<x_p, x'_p'> / C`` of the images ``a`` and ``b``: all pairs, or ``a_i`` with ``b_i``."""
        c = a.shape[1]
        if self.pooled:
            spec = "ncyx,ncuv->nyxuv" if elementwise else "icyx,jcuv->ijyxuv"
        else:
            spec = "ncyx,ncyx->nyx" if elementwise else "icyx,jcyx->ijyx"
        return torch.einsum(spec, a, b) / c

    def sides(self, q1: Tensor, q2: Tensor, elementwise: bool) -> tuple[Tensor, Tensor]:
        """The two images' variances, shaped to broadcast against a tile of pair unknowns."""
        lead1, lead2 = ((slice(None),), (slice(None),)) if elementwise else ((slice(None), None), (None, slice(None)))
        if self.pooled:
            return q1[(*lead1, ..., None, None)], q2[(*lead2, ..., None, None, slice(None), slice(None))]
        return q1[lead1], q2[lead2]

    def mean(self, value: Tensor) -> Tensor:
        return value.mean(tuple(range(-self.dims, 0)))


def conv_kernel(
    act: Activation,
    x1: Tensor,
    x2: Tensor | None,
    w: Tensor,
    iv: Tensor,
    b: Tensor,
    ov: Tensor,
    kernel_size: int,
    readout: str = "flatten",
    diag: bool = False,
    output: str = "nngp",
) -> Tensor:
    """The kernel of images ``(n, C, H, W)`` and ``(m, C, H, W)`` (``x2=None``: ``x1``) for ``readout``.

    ``diag``: only ``k(x1_i, x2_i)`` (``x2`` with as many images as ``x1``), in O(n).

    ``output="ntk"``: the neural tangent kernel, all of ``U, W, b, v`` trained (NTK
    parameterisation). The gradient of ``f`` in ``v`` gives the NNGP kernel. In ``U``, ``W``
    and ``b`` it runs through the fixed point, ``dz = (I - W \ast \\mathrm{diag}\\,\\phi'(z))^{-1}``
    applied to the direct terms; in the limit the covariance ``T`` of the pre-activations'
    gradients between two pixels obeys the unrolled series of that inverse,
    ``T = w A[E' T] + Sigma`` with ``E' = E[phi'(u) phi'(v)]`` (the direct terms' covariance is
    ``Sigma`` itself: ``w A[E phi phi]``, ``iv A[G]`` and ``b`` from ``W``, ``U`` and ``b``), and
    the readout adds ``ov E' T`` at the pixel pairs it reads. With ``kernel_size=1`` this is the
    fully connected DEQ's ``k + ov E' K* / (1 - w E')`` of each pixel, averaged.
    """
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    read = _Readout(readout, x1.shape[-2], x1.shape[-1])
    channels = x1.shape[1]
    s1 = iv * patch_average((x1 * x1).sum(1) / channels, kernel_size) + b
    q1 = image_variances(act, s1, w, kernel_size)
    if symmetric:
        q2 = q1
    else:
        s2 = iv * patch_average((x2 * x2).sum(1) / channels, kernel_size) + b
        q2 = image_variances(act, s2, w, kernel_size)
    ntk = output == "ntk"
    derivative = act.derivative_activation() if ntk else None

    def readout_of(qa: Tensor, qb: Tensor, c: Tensor, problems: int) -> Tensor:
        out = _pair_value(act, qa, qb, c)
        if ntk:
            out = out + _tangent_terms(derivative, qa, qb, c, w, kernel_size, read.average, problems)
        return ov * read.mean(out)

    if diag and symmetric and not read.pooled and not ntk:
        # The pair of an image with itself is its own variance: V = D(q) exactly.
        return ov * act.diag_dual(q1)[0].mean((-2, -1))
    if diag:
        s12 = iv * read.average(read.gram(x1, x2, True), kernel_size) + b
        qa, qb = read.sides(q1, q2, True)
        c = _pair_covariances(act, qa, qb, s12, w, kernel_size, read.average, 1)
        return readout_of(qa, qb, c, 1)
    n, m = x1.shape[0], x2.shape[0]
    budget = settings.max_block_size.value() or TILE_ELEMENTS[readout]
    side = max(1, math.isqrt(max(1, budget // read.entries)))
    starts1, starts2 = range(0, n, side), range(0, m, side)
    tiles: dict[tuple[int, int], Tensor] = {}
    for i in starts1:
        for j in starts2:
            if symmetric and j < i:
                continue
            s12 = iv * read.average(read.gram(x1[i : i + side], x2[j : j + side], False), kernel_size) + b
            qa, qb = read.sides(q1[i : i + side], q2[j : j + side], False)
            start = None if read.pooled else _identical_start(x1[i : i + side], x2[j : j + side], s12, q1[i : i + side])
            c = _pair_covariances(act, qa, qb, s12, w, kernel_size, read.average, 2, start)
            tiles[i, j] = readout_of(qa, qb, c, 2)
    rows = []
    for i in starts1:
        row = []
        for j in starts2:
            if symmetric and j < i:
                row.append(tiles[j, i].mT)
            elif symmetric and j == i:
                t = tiles[i, j]
                row.append(t.triu() + t.triu(1).mT)
            else:
                row.append(tiles[i, j])
        rows.append(torch.cat(row, dim=1))
    out = torch.cat(rows, dim=0)
    if symmetric and not read.pooled:
        # The pair of an image with itself is its own variance: V = D(q) exactly (and E' is
        # the derivative's diagonal dual: at correlation 1 the pair dual loses half the digits).
        diagonal = act.diag_dual(q1)[0]
        if ntk:
            diagonal = diagonal + _own_tangent_terms(derivative, q1, w, kernel_size)
        diagonal = ov * diagonal.mean((-2, -1))
        out = out - torch.diag_embed(out.diagonal()) + torch.diag_embed(diagonal)
    return out


def _identical_start(a: Tensor, b: Tensor, s12: Tensor, q: Tensor) -> Tensor | None:
    """Where the same-pixel iteration of a tile starts: ``c = q`` for pairs of identical images, else ``None``.

    The pair of an image with itself (or with an exact copy) has the solution ``c = q``, at
    correlation 1, where the duals are least smooth (the derivative activations' ``E'``, which
    the tangent kernel reads, has an infinite slope there): started anywhere else, the
    iteration stops within rounding of it and ``E'`` loses half its digits. ``q`` holds the
    variances of ``a``'s images (those of ``b``'s copies are the same numbers).
    """
    same = (a.unsqueeze(1) == b.unsqueeze(0)).flatten(2).all(-1)
    if not bool(same.any()):
        return None
    start = s12.detach().clone()
    i, j = same.nonzero(as_tuple=True)
    start[i, j] = q.detach()[i]
    return start


def _own_tangent_terms(derivative: Activation, q: Tensor, w: Tensor, kernel_size: int) -> Tensor:
    """``E' T`` of each image with itself: ``(I - w A diag(E')) T = q``, solved exactly (``P x P``)."""
    slope = derivative.diag_dual(q)[0]
    return slope * _pixel_solve(slope, w, q, kernel_size)


def _partials(act: Activation, qa: Tensor, qb: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    """``(V, V_c, V_q1, V_q2)`` of each pair entry at covariance ``c``, elementwise (no graph kept)."""
    shape = c.shape
    with torch.enable_grad():
        leaves = [t.detach().expand(shape).clone().requires_grad_(True) for t in (qa, qb, c)]
        value = _pair_value(act, *leaves)
        d_q1, d_q2, d_c = torch.autograd.grad(value.sum(), leaves)
    return value.detach(), d_c, d_q1, d_q2


def conv_kernel_tangents(
    act: Activation,
    x: Tensor,
    w: Tensor,
    iv: Tensor,
    b: Tensor,
    kernel_size: int,
    readout: str = "flatten",
    output: str = "nngp",
) -> tuple[Tensor, Tensor]:
    """``K(x, x)`` with output variance 1 and ``dK / d(w, iv, b)``, shape ``(n, n, 3)``, without a graph.

    Forward sensitivities: each fixed point's tangent solves the linear equation of its map's
    Jacobian, ``dq = (I - w A diag(D'))^-1 (dw A[D] + ds)`` per image and
    ``dc = w A[V_c dc + V_q1 dq1 + V_q2 dq2] + dw A[V] + ds12`` per pair (the same contraction
    as the pair equation, solved by the same mixing), three hyperparameters at once. What the
    scikit-learn kernel's ``eval_gradient`` needs, in the time of a few kernel evaluations.

    ``output="ntk"`` (see :func:`conv_kernel`): the entries are ``V + E' T`` with
    ``T = w A[E' T] + c``, whose tangent solves the same linear contraction,
    ``dT = w A[E' dT] + w A[dE' T] + dw A[E' T] + dc``, ``dE'`` from the derivative
    activation's partials. Where a pixel meets itself (an image with itself, at equal pixels)
    the correlation is 1 and ``E'`` is not differentiable in ``c`` alone (the relu family's
    ``E'_c`` is infinite there); along that diagonal ``E' = D'_{phi'}(q)``, whose derivative
    ``dD'_{phi'}/dq dq`` is used instead.
    """
    read = _Readout(readout, x.shape[-2], x.shape[-1])
    ntk = output == "ntk"
    derivative = act.derivative_activation() if ntk else None
    n, channels = x.shape[:2]
    with torch.no_grad():
        g1 = patch_average((x * x).sum(1) / channels, kernel_size)
        s1 = iv * g1 + b
        q = _solve_variances(act, s1, w, kernel_size)
        d, dd = act.diag_dual(q)
        rhs = torch.stack([patch_average(d, kernel_size), g1, torch.ones_like(g1)], -1)
        dq = _pixel_solve(dd, w, rhs, kernel_size).movedim(-1, 0)  # (3, n, H, W)
        if ntk:
            e_own, de_own = derivative.diag_dual(q)  # E' of a pixel with itself and its slope in q
        budget = settings.max_block_size.value() or TILE_ELEMENTS[readout]
        side = max(1, math.isqrt(max(1, budget // (3 * read.entries))))
        value = x.new_empty(n, n)
        tangent = x.new_empty(3, n, n)
        centre = w / kernel_size**2
        for i in range(0, n, side):
            for j in range(i, n, side):
                a, bb = x[i : i + side], x[j : j + side]
                gram = read.average(read.gram(a, bb, False), kernel_size)
                s12 = iv * gram + b
                qa, qb = read.sides(q[i : i + side], q[j : j + side], False)
                start = None if read.pooled else _identical_start(a, bb, s12, q[i : i + side])
                c = _pair_covariances(act, qa, qb, s12, w, kernel_size, read.average, 2, start)
                v, v_c, v_q1, v_q2 = _partials(act, qa, qb, c)
                dqa = torch.stack([read.sides(t[i : i + side], t[j : j + side], False)[0] for t in dq])
                dqb = torch.stack([read.sides(t[i : i + side], t[j : j + side], False)[1] for t in dq])
                direct = v_q1 * dqa + v_q2 * dqb  # (3, ...)
                drive = w * read.average(direct, kernel_size)
                drive[0] += read.average(v, kernel_size)
                drive[1] += gram
                drive[2] += 1.0
                dc = _linear_tangent(v_c, drive, w, centre, kernel_size, read.average, "pair tangent")
                entry = v
                entry_t = v_c * dc + direct
                if ntk:
                    e, e_c, e_q1, e_q2 = _partials(derivative, qa, qb, c)
                    de = e_c * dc + e_q1 * dqa + e_q2 * dqb
                    if i == j:
                        _own_entries(de, read.pooled).copy_(de_own[i : i + side] * dq[:, i : i + side])
                    t = _linear_tangent(e, c.unsqueeze(0), w, centre, kernel_size, read.average, "tangent pair")[0]
                    t_drive = w * read.average(de * t, kernel_size)
                    t_drive[0] += read.average(e * t, kernel_size)
                    t_drive += dc
                    dt = _linear_tangent(e, t_drive, w, centre, kernel_size, read.average, "tangent pair tangent")
                    entry = v + e * t
                    entry_t = entry_t + de * t + e * dt
                block = read.mean(entry)
                block_t = read.mean(entry_t)
                rows, cols = slice(i, i + side), slice(j, j + side)
                value[rows, cols] = block
                tangent[:, rows, cols] = block_t
                if j != i:
                    value[cols, rows] = block.mT
                    tangent[:, cols, rows] = block_t.mT
                else:
                    value[rows, rows] = block.triu() + block.triu(1).mT
                    tangent[:, rows, rows] = block_t.triu() + block_t.triu(1).mT
        if not read.pooled:
            own_value, own_tangent = d, dd * dq
            if ntk:
                # T of an image with itself: (I - w A diag(E')) T = q, and its tangent
                # (I - w A diag(E')) dT = w A[dE' T] + dw A[E' T] + dq, dE' = dD'_{phi'}/dq dq.
                t_own = _pixel_solve(e_own, w, q, kernel_size)
                de = de_own * dq
                t_rhs = w * patch_average(de * t_own, kernel_size) + dq
                t_rhs[0] += patch_average(e_own * t_own, kernel_size)
                dt_own = _pixel_solve(e_own, w, t_rhs.movedim(0, -1), kernel_size).movedim(-1, 0)
                own_value = d + e_own * t_own
                own_tangent = own_tangent + de * t_own + e_own * dt_own
            value.diagonal().copy_(own_value.mean((-2, -1)))
            tangent.diagonal(dim1=1, dim2=2).copy_(own_tangent.mean((-2, -1)))
    return value, tangent.movedim(0, -1)


def _own_entries(tile: Tensor, pooled: bool) -> Tensor:
    """A view ``(k, s, H, W)`` of a diagonal tile ``(k, s, s, pixels...)``: each image with itself, equal pixels."""
    if not pooled:  # (k, s, s, H, W): the diagonal of the two image dimensions
        return tile.diagonal(dim1=1, dim2=2).movedim(-1, 1)
    # (k, s, s, y, x, y', x'): image with itself, y = y', x = x'.
    own = tile.diagonal(dim1=1, dim2=2)  # (k, y, x, y', x', s)
    own = own.diagonal(dim1=1, dim2=3)  # (k, x, x', s, y)
    return own.diagonal(dim1=1, dim2=2)  # (k, s, y, x)


def _linear_tangent(
    slope: Tensor,
    drive: Tensor,
    w: Tensor,
    centre: Tensor,
    kernel_size: int,
    average: Callable[[Tensor, int], Tensor],
    what: str,
) -> Tensor:
    """``t = w A[slope t] + drive`` by mixing, ``drive`` the tile's right-hand sides ``(k, pairs..., pixels...)``."""
    diagonal = (slope * centre).expand_as(drive)

    def step(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mapped = w * average(slope * t, kernel_size)
        return mapped + drive, 1.0 + mapped.abs() + drive.abs(), diagonal

    return _anderson(step, drive.clone(), what, problems=3, memory=LINEAR_MEMORY)
