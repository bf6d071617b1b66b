r"""``equilibrium_covariance``: validation, shapes and dispatch to the solver.

For inputs :math:`x, x' \in \mathbb{R}^d` the infinitely wide deep equilibrium model
:math:`h^* = \phi(W h^* + U x + b)`, :math:`f = v \cdot h^*` (Gao et al., NeurIPS 2023) has

.. math::
    s(x, x') &= \sum_i \sigma_{u,i}^2 x_i x'_i / d + \sigma_b^2, \\
    K^*(x, x') &= \sigma_w^2\, E[\phi(u)\phi(v)] + s(x, x'), \\
    k(x, x') &= \sigma_v^2\, E[\phi(u)\phi(v)],

with :math:`(u, v)` centred Gaussian with covariance
:math:`[[K^*(x,x), K^*(x,x')], [K^*(x,x'), K^*(x',x')]]`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .activations import Activation, Erf, PiecewiseLinear, QuadratureActivation, get_activation, safe_sqrt
from .arcsine import arcsine_kernel, arcsine_resolves
from .backend import check_output_fits
from .homogeneous import homogeneous_kernel
from .mehler import series_kernel, series_plan
from .ntk import tangent_kernel
from .solver import snap_correlation, solve_diagonal, solve_pairs

__all__ = ["OUTPUTS", "equilibrium_covariance"]

#: Values accepted for ``output``.
OUTPUTS = ("nngp", "preactivation", "ntk")

ArrayLike = Any


def equilibrium_covariance(
    x1: ArrayLike,
    x2: ArrayLike | None = None,
    *,
    activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
    weight_variance: float | Tensor = 1.0,
    input_variance: float | Tensor = 1.0,
    bias_variance: float | Tensor = 0.0,
    output_variance: float | Tensor = 1.0,
    diag: bool = False,
    output: str = "nngp",
    **activation_kwargs: Any,
) -> Tensor:
    r"""Covariance of an infinitely wide deep equilibrium model.

    Parameters
    ----------
    x1 : tensor or array-like, shape ``(..., n, d)``
        Inputs. Array-likes become float64 tensors; tensors keep their dtype
        (float32 or float64) and device.
    x2 : tensor or array-like, shape ``(..., m, d)``, optional
        Second inputs; ``None`` means ``x1`` (a symmetric matrix whose diagonal is
        computed by the O(n) diagonal path).
    activation : str, Activation or callable
        One of :data:`deq_kernel.activations.ACTIVATIONS` or any smooth elementwise torch
        function.
    weight_variance, input_variance, bias_variance, output_variance : float or tensor
        :math:`\sigma_w^2, \sigma_u^2, \sigma_b^2, \sigma_v^2`, non-negative; tensors broadcast
        against the batch shape. ``input_variance`` may have a last dimension of size ``d``
        (one variance per input dimension, ARD): its last dimension is always the feature
        dimension, so a per-batch scalar has shape ``(*batch, 1)``. ``weight_variance`` must
        be below the activation's bound (``activation.weight_variance_bound``; relu: 2).
    diag : bool
        Return only the diagonal ``k(x1_i, x2_i)``, shape ``(..., n)``, in O(n).
    output : {"nngp", "preactivation", "ntk"}
        ``"nngp"``: the output kernel :math:`k`; ``"preactivation"``: the equilibrium
        pre-activation covariance :math:`K^*` (``output_variance`` is then unused);
        ``"ntk"``: the neural tangent kernel of the weight-tied DEQ with all parameters
        trained, :math:`k + \sigma_v^2 \dot E K^* / (1 - \sigma_w^2 \dot E)`, where
        :math:`\dot E = E[\phi'(u)\phi'(v)]` (see :mod:`deq_kernel.ntk`; not defined for
        the step activation).
    **activation_kwargs
        Activation options, e.g. ``negative_slope`` for ``leaky_relu``.

    Returns
    -------
    Tensor
        Shape ``(..., n, m)``, or ``(..., n)`` with ``diag=True``. Differentiable in the
        inputs and every hyperparameter (implicit function theorem).

    Raises
    ------
    ValueError, TypeError
        For malformed inputs or hyperparameters, naming the argument.
    deq_kernel.ConvergenceError
        If a fixed point is not found to tolerance (never returns unconverged values).

    Examples
    --------
    >>> import torch, deq_kernel
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> deq_kernel.equilibrium_covariance(x, weight_variance=1.0)  # relu
    tensor([[0.5000, 0.2172],
            [0.2172, 0.5000]], dtype=torch.float64)
    >>> deq_kernel.equilibrium_covariance(x, weight_variance=1.0, output="preactivation")
    tensor([[1.0000, 0.2172],
            [0.2172, 1.0000]], dtype=torch.float64)
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    if not isinstance(diag, bool):
        raise TypeError(f"diag must be a bool, got {diag!r}")
    act = get_activation(activation, **activation_kwargs)

    x1 = _as_input(x1, "x1")
    symmetric = x2 is None or x2 is x1
    x2 = x1 if symmetric else _as_input(x2, "x2", like=x1)
    if x1.dtype != x2.dtype:
        dtype = torch.promote_types(x1.dtype, x2.dtype)
        x1, x2 = x1.to(dtype), x2.to(dtype)
    d = x1.shape[-1]
    if x2.shape[-1] != d:
        raise ValueError(f"x2 must have the same number of features as x1 (d={d}), got x2 of shape {tuple(x2.shape)}")
    if diag and not symmetric and x2.shape[-2] != x1.shape[-2]:
        raise ValueError(f"with diag=True, x2 must have as many points as x1 ({x1.shape[-2]}), got {x2.shape[-2]}")

    w = _as_hyper(weight_variance, "weight_variance", x1)
    iv = _as_hyper(input_variance, "input_variance", x1)
    b = _as_hyper(bias_variance, "bias_variance", x1)
    ov = _as_hyper(output_variance, "output_variance", x1)
    if iv.dim() >= 1 and iv.shape[-1] not in (1, d):
        raise ValueError(
            f"input_variance must be a scalar or have last dimension 1 or d={d} "
            f"(one variance per input dimension), got shape {tuple(iv.shape)}"
        )
    act.check_weight_variance(w)
    batch = _batch_shape(x1, x2, w=w, iv=iv, b=b, ov=ov)
    if not diag:
        check_output_fits((*batch, x1.shape[-2], x2.shape[-2]), x1.dtype, x1.device)
    if output == "ntk" and x1.dtype == torch.float32:
        # The derivative dual depends on 1 - rho^2, which float32 resolves only to about
        # eps32 * q: evaluate the tangent kernel in float64 and round the result.
        wide = [t.double() for t in (x1, x2, w, iv, b, ov)]
        out = equilibrium_covariance(
            wide[0],
            None if symmetric else wide[1],
            activation=act,
            weight_variance=wide[2],
            input_variance=wide[3],
            bias_variance=wide[4],
            output_variance=wide[5],
            diag=diag,
            output="ntk",
        )
        return out.to(torch.float32)

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
    pairs = _Pairs(x1, x1s, x2, scale, b, q1, q2, d1, d2, s11, s22, symmetric)
    outer = not diag
    w_b, ov_b = (w_point.unsqueeze(-1), ov_point.unsqueeze(-1)) if outer else (w_point, ov_point)
    if output == "ntk":
        out = _ntk_output(act, derivative, pairs, w_b, ov_b, outer=outer)
    else:
        out = _pair_output(act, pairs, w_b, ov_b, output, outer=outer)
    return out.expand(*batch, x1.shape[-2], *((x2.shape[-2],) if outer else ()))


#: Activations whose pair equation is read off one matrix product (:mod:`deq_kernel.product`).
_ONE_PRODUCT = {PiecewiseLinear: "homogeneous", Erf: "arcsine"}


class _Pairs(NamedTuple):
    """Per-point quantities the pair computation needs."""

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


def _cat_features(*parts: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], dim=-1)


def _operands(p: _Pairs, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(lhs, rhs, two_sided)`` with ``lhs @ rhs^T = left_i right_j s(x1_i, x2_j)``.

    Per-point factors are folded into the operands, so that the normalised matrix
    ``s12 / sqrt(q1 q2)`` comes out of a single product. For a symmetric matrix one
    operand serves both sides, which makes the product bitwise symmetric; splitting the
    variances into square roots is exact for the gradient unless a variance that requires
    a gradient is exactly 0, and then the two-operand product is symmetrised instead
    (``two_sided``).
    """
    if p.symmetric and not any(h.requires_grad and bool((h == 0).any()) for h in (p.scale, p.bias)):
        a = _cat_features(
            p.x1 * safe_sqrt(p.scale) * left.unsqueeze(-1), (safe_sqrt(p.bias).unsqueeze(-1) * left).unsqueeze(-1)
        )
        return _aligned(a), _aligned(a), False
    lhs = _cat_features(p.x1s * left.unsqueeze(-1), (p.bias.unsqueeze(-1) * left).unsqueeze(-1))
    rhs = _cat_features(p.x2 * right.unsqueeze(-1), right.unsqueeze(-1))
    return _aligned(lhs), _aligned(rhs), p.symmetric


def _aligned(t: Tensor) -> Tensor:
    """On a GPU, pad the inner dimension of a product operand to a multiple of 8 (aligned rows)."""
    pad = -t.shape[-1] % 8
    return torch.nn.functional.pad(t, (0, pad)) if t.is_cuda and pad else t


def _inner(p: _Pairs, *, outer: bool) -> Tensor:
    """``s(x1_i, x2_j)`` for all pairs (``outer``) or elementwise pairs."""
    if not outer:
        return (p.x1s * p.x2).sum(-1) + p.bias.unsqueeze(-1)
    lhs, rhs, two_sided = _operands(p, torch.ones_like(p.q1), torch.ones_like(p.q2))
    out = lhs @ rhs.mT
    return 0.5 * (out + out.mT) if two_sided else out


def _pair_output(act: Activation, p: _Pairs, w: Tensor, ov: Tensor, output: str, *, outer: bool) -> Tensor:
    """The requested output for all pairs (``outer``) or elementwise pairs.

    ``w`` and ``ov`` broadcast against the pair array. For a symmetric matrix the diagonal
    is taken from the O(n) diagonal path, exactly.
    """
    rows, cols = (lambda t: t.unsqueeze(-1), lambda t: t.unsqueeze(-2)) if outer else (lambda t: t, lambda t: t)
    nngp = output == "nngp"
    r1, r2 = safe_sqrt(p.q1), safe_sqrt(p.q2)
    diagonal = None
    if outer and p.symmetric:
        diagonal = ov.squeeze(-1) * p.d1 if nngp else p.q1

    one_product = next((tag for kind, tag in _ONE_PRODUCT.items() if isinstance(act, kind)), None)
    if one_product == "arcsine" and not arcsine_resolves(p.q1, p.q2):
        one_product = None  # variances too large for the arcsine variable: the general solver
    if one_product is not None:
        # erf: r = sqrt(q + 1/2) (never 0); the relu family: r = sqrt(q), and a zero-variance
        # point (zero input, no bias) has covariance 0 with everything.
        if isinstance(act, Erf):
            r1, r2 = torch.sqrt(p.q1 + 0.5), torch.sqrt(p.q2 + 0.5)
        inv1 = torch.where(r1 > 0, 1.0 / torch.where(r1 > 0, r1, 1.0), 0.0)
        inv2 = torch.where(r2 > 0, 1.0 / torch.where(r2 > 0, r2, 1.0), 0.0)
        if outer:
            lhs, rhs, two_sided = _operands(p, inv1, inv2)
        else:
            lhs = _cat_features(p.x1s * inv1.unsqueeze(-1), (p.bias.unsqueeze(-1) * inv1).unsqueeze(-1))
            rhs = _cat_features(p.x2 * inv2.unsqueeze(-1), inv2.unsqueeze(-1))
            two_sided = False
        kernel = functools.partial(homogeneous_kernel, act) if one_product == "homogeneous" else arcsine_kernel
        return kernel(
            lhs,
            rhs,
            w,
            rows(r1),
            cols(r2),
            want="value" if nngp else "cov",
            matrix=outer,
            two_sided=two_sided,
            symmetric=outer and p.symmetric,
            scale=ov if nngp else None,
            diagonal=diagonal,
        )

    if outer:
        fast = _series_output(act, p, w, ov, nngp, diagonal)
        if fast is not None:
            return fast
    s12 = _inner(p, outer=outer)
    state1, state2 = act.prepare(p.q1, None if p.symmetric else p.q2)
    if isinstance(act, QuadratureActivation) and s12.dtype == torch.float64:
        coverage = _sampled_coverage(act, state1, state1 if state2 is None else state2, s12, p, w, outer=outer)
        if coverage is not None:
            state1, state2 = act.narrow(state1, state2, coverage)
    state2 = state1 if state2 is None else state2
    state1 = tuple(rows(t) for t in state1)
    state2 = tuple(cols(t) for t in state2)
    rho, value = solve_pairs(
        act,
        state1,
        state2,
        s12,
        rows(p.s11),
        cols(p.s22),
        w,
        rows(p.d1),
        cols(p.d2),
        matrix=outer,
        symmetric=p.symmetric and outer,
    )
    out = ov * value if nngp else rows(r1) * cols(r2) * rho
    if diagonal is not None:
        full = torch.broadcast_shapes(out.shape[:-1], diagonal.shape)
        out = torch.diagonal_scatter(out.expand(*full, full[-1]), diagonal.expand(full), dim1=-2, dim2=-1)
    return out


def _series_output(
    act: Activation, p: _Pairs, w: Tensor, ov: Tensor, nngp: bool, diagonal: Tensor | None
) -> Tensor | None:
    """The matrix by :mod:`deq_kernel.mehler` (one product, one fused pass), or ``None`` where it does not apply.

    It applies to activations with a Hermite expansion, for one unbatched matrix with scalar
    hyperparameters and positive variances (a zero input without bias is left to the
    general solver).
    """
    if type(act).hermite_expansion is Activation.hermite_expansion or w.numel() != 1 or ov.numel() != 1:
        return None
    p = _unbatched(p)
    if p is None:
        return None
    if diagonal is not None:
        diagonal = diagonal.reshape(-1)
    if not (bool((p.q1 > 0).all()) and bool((p.q2 > 0).all())):
        return None
    inv1, inv2 = torch.rsqrt(p.q1), torch.rsqrt(p.q2)
    lhs, rhs, two_sided = _operands(p, inv1, inv2)
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
    if plan is None:
        return None
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


def _unbatched(p: _Pairs) -> _Pairs | None:
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
    return _Pairs(x1, x1s, x2, scale, bias, q1, q2, d1, d2, s11, s22, p.symmetric)


#: Pairs sampled to choose the series order of a quadrature activation.
COVERAGE_SAMPLE = 2048


def _sampled_coverage(
    act: Activation, state1: tuple, state2: tuple, s12: Tensor, p: _Pairs, w: Tensor, *, outer: bool
) -> float | None:
    """A correlation that all but about 0.1% of the pairs stay below, from a sample of pairs.

    The sample's pairs are solved exactly; a margin of 0.05 is added. Pairs beyond it are
    still exact (the series' bound flags them for the exact dual), only slower. ``None``
    (keep the default) for batched or small problems.
    """
    if not outer or s12.dim() != 2 or w.numel() != 1 or s12.numel() < 16 * COVERAGE_SAMPLE:
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


def _ntk_output(act: Activation, derivative: Activation, p: _Pairs, w: Tensor, ov: Tensor, *, outer: bool) -> Tensor:
    """The neural tangent kernel (see :mod:`deq_kernel.ntk`) from the equilibrium quantities."""
    rows, cols = (lambda t: t.unsqueeze(-1), lambda t: t.unsqueeze(-2)) if outer else (lambda t: t, lambda t: t)
    one = torch.ones_like(ov)
    value = _pair_output(act, p, w, one, "nngp", outer=outer)
    cov = _pair_output(act, p, w, one, "preactivation", outer=outer)
    r1, r2 = safe_sqrt(p.q1), safe_sqrt(p.q2)
    inv1 = torch.where(r1 > 0, 1.0 / torch.where(r1 > 0, r1, 1.0), 0.0)
    inv2 = torch.where(r2 > 0, 1.0 / torch.where(r2 > 0, r2, 1.0), 0.0)
    rho = snap_correlation(cov * (rows(inv1) * cols(inv2)), torch.finfo(cov.dtype).eps)
    # Identical points (correlation 1, where some derivative duals have infinite slope)
    # and zero-variance points take the diagonal's value; the others the pair dual.
    s12 = _inner(p, outer=outer)
    s11r, s22c = rows(p.s11), cols(p.s22)
    eps = torch.finfo(s12.dtype).eps
    identical = (s11r + s22c - 2.0 * s12).detach() <= 8.0 * eps * (s11r + s22c).detach()
    if outer and p.symmetric:
        identical = identical | identical.mT  # the product s12 need not be bitwise symmetric
    special = identical | ((rows(p.q1) * cols(p.q2)).detach() == 0)
    state1, state2 = derivative.prepare(p.q1, None if p.symmetric else p.q2)
    state2 = state1 if state2 is None else state2
    slope = derivative.pair_dual(
        tuple(rows(t) for t in state1), tuple(cols(t) for t in state2), torch.where(special, 0.0, rho)
    )[0]
    e1 = derivative.diag_dual(p.q1)[0]
    e2 = e1 if p.q2 is p.q1 else derivative.diag_dual(p.q2)[0]
    slope = torch.where(identical, 0.5 * (rows(e1) + cols(e2)), slope)  # symmetric in the two points
    if outer and p.symmetric:
        slope = 0.5 * (slope + slope.mT)  # a quadrature fallback may integrate in one order of the pair
    out = tangent_kernel(value, cov, slope, w, ov)
    if outer and p.symmetric:
        diagonal = tangent_kernel(p.d1, p.q1, derivative.diag_dual(p.q1)[0], w.squeeze(-1), ov.squeeze(-1))
        full = torch.broadcast_shapes(out.shape[:-1], diagonal.shape)
        out = torch.diagonal_scatter(out.expand(*full, full[-1]), diagonal.expand(full), dim1=-2, dim2=-1)
    return out


def _as_input(x: ArrayLike, name: str, like: Tensor | None = None) -> Tensor:
    if isinstance(x, Tensor):
        t = x
        if t.dtype in (torch.float16, torch.bfloat16) or t.is_complex():
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be a tensor or a numeric array-like: {exc}") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got an array of dtype {arr.dtype}")
        if arr.dtype != np.float32:
            arr = arr.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if like is not None:
            t = t.to(like.device)
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., n, d) with at least 2 dimensions, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature (d >= 1), got shape {tuple(t.shape)}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on the same device as x1 ({like.device}), got {t.device}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _as_hyper(value: Any, name: str, like: Tensor) -> Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a tensor, got {value!r}")
    if isinstance(value, Tensor):
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        t = value.to(device=like.device, dtype=like.dtype)
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number or a tensor, got {value!r}") from None
        t = torch.as_tensor(arr, dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative, got {_describe(t)}")
    return t


def _describe(t: Tensor) -> str:
    t = t.detach()
    return repr(float(t)) if t.numel() == 1 else f"a tensor with values in [{float(t.min()):.4g}, {float(t.max()):.4g}]"


def _batch_shape(x1: Tensor, x2: Tensor, **hypers: Tensor) -> torch.Size:
    names = {"w": "weight_variance", "iv": "input_variance", "b": "bias_variance", "ov": "output_variance"}
    try:
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the batch shapes of x1 {tuple(x1.shape[:-2])} and x2 {tuple(x2.shape[:-2])} do not broadcast"
        ) from None
    for key, t in hypers.items():
        shape = t.shape[:-1] if key == "iv" and t.dim() >= 1 else t.shape
        try:
            batch = torch.broadcast_shapes(batch, shape)
        except RuntimeError:
            raise ValueError(
                f"{names[key]} of shape {tuple(t.shape)} does not broadcast against the batch shape {tuple(batch)}"
            ) from None
    return batch
