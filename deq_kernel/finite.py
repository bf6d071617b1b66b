r"""Finite-width deep equilibrium models and Monte Carlo estimates of their covariance.

The kernel of :func:`deq_kernel.equilibrium_covariance` is the width-to-infinity limit of
real networks (Gao et al., NeurIPS 2023, Theorem 4.4). This module builds those networks,
with exactly the initialisation of the design:

.. math::
    U_{ij} \sim N(0, \sigma_u^2/d),\quad W_{ij} \sim N(0, \sigma_w^2/n),\quad
    b_i \sim N(0, \sigma_b^2),\quad v_i \sim N(0, \sigma_v^2/n),

    h^*(x) = \phi(W h^*(x) + U x + b),\qquad f(x) = v \cdot h^*(x),

and samples many of them at once to estimate ``Cov[f(x), f(x')]`` over the draw of the
weights.

* :class:`DEQNetwork`: one network, a ``torch.nn.Module``. The equilibrium is found by
  Anderson acceleration (or plain Picard iteration) to a relative tolerance; a solve
  that does not converge raises :class:`deq_kernel.ConvergenceError`. Gradients come
  from the implicit function theorem (one adjoint fixed point per backward pass), so
  the network trains by SGD without back-propagating through the iterations.
  ``network(x, depth=L)`` is the weight-tied network of finite depth ``L`` instead:
  ``h^0 = 0``, ``h^l = phi(W h^{l-1} + U x + b)``.
* :func:`sample_outputs`, :func:`network_kernels`, :func:`empirical_covariance`: many
  independent networks, stacked and solved together with batched matrix products.
  Network ``i`` of a call with seed ``s`` has the weights of
  ``DEQNetwork(..., generator=network_generator(s, i))``, whatever ``batch_size``.
* :func:`finite_depth_covariance`: the infinite-width covariance of the weight-tied
  network of finite depth (and, without input injection, of a deep MLP), the sequence
  whose limit in depth is the equilibrium kernel.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .activations import Activation, get_activation, safe_divide
from .equilibrium.newton import ConvergenceError

__all__ = [
    "ESTIMATORS",
    "NONCONVERGED",
    "SOLVERS",
    "DEQNetwork",
    "DroppedNetworksWarning",
    "SolveInfo",
    "empirical_covariance",
    "finite_depth_covariance",
    "network_generator",
    "network_kernels",
    "sample_outputs",
]

#: Values accepted for ``solver``.
SOLVERS = ("anderson", "picard")
#: Values accepted for ``estimator`` in :func:`empirical_covariance`.
ESTIMATORS = ("outputs", "conditional")
#: Values accepted for ``nonconverged`` in the samplers.
NONCONVERGED = ("raise", "drop")
#: How the samplers draw each network's recurrent weights ``W`` (see :class:`_SubspaceWeights`).
WEIGHTS = ("dense", "subspace")


class DroppedNetworksWarning(UserWarning):
    """Some sampled networks had no equilibrium to tolerance and were left out."""


ArrayLike = Any
ActivationLike = str | Activation | Callable[[Tensor], Tensor]


class SolveInfo(NamedTuple):
    """What a fixed-point solve did.

    Attributes
    ----------
    iterations : int
        Applications of the equilibrium map after the first.
    residual : float
        Largest relative residual ``|phi(W h + U x + b) - h| / |phi(W h + U x + b)|`` over
        the rows (points, networks) at the end.
    history : tuple of float
        That largest relative residual after each iteration, starting from the initial guess.
    """

    iterations: int
    residual: float
    history: tuple[float, ...]


# --------------------------------------------------------------------------- validation


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _variance(value: Any, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
    return value


def _input_variance(value: Any, in_features: int) -> float | Tensor:
    """A scalar, or one variance per input dimension (ARD) as a float64 tensor."""
    if isinstance(value, (Tensor, np.ndarray, list, tuple)) and np.ndim(value) >= 1:
        t = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=np.float64))
        if t.dim() != 1 or t.numel() != in_features:
            raise ValueError(
                f"input_variance must be a scalar or have shape ({in_features},) (one per input feature), "
                f"got shape {tuple(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError("input_variance must be finite and non-negative")
        return t
    return _variance(value, "input_variance")


def _tolerance(value: Any, dtype: torch.dtype) -> float:
    if value is None:
        return 1e-5 if dtype == torch.float32 else 1e-10
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"tol must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"tol must be a positive number, got {value!r}")
    return float(value)


def _solver(value: Any) -> str:
    if value not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {value!r}")
    return value


def _dtype(value: Any) -> torch.dtype:
    if value is None:
        value = torch.get_default_dtype()
    if value not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {value!r}")
    return value


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise TypeError(f"seed must be a non-negative integer, got {value!r}")
    return int(value)


def _activation(activation: ActivationLike, weight_variance: float, activation_kwargs: dict) -> Activation:
    act = get_activation(activation, **activation_kwargs)
    act.check_weight_variance(torch.tensor(weight_variance, dtype=torch.float64))
    return act


# --------------------------------------------------------------------------- fixed points


def _row_residual(h: Tensor, fh: Tensor) -> Tensor:
    """``|f(h) - h| / |f(h)|`` per row (last dimension); 0 where both are 0."""
    num = torch.linalg.vector_norm(fh - h, dim=-1)
    den = torch.linalg.vector_norm(fh, dim=-1)
    return num / den.clamp_min(torch.finfo(h.dtype).tiny)


def _fixed_point(
    fn: Callable[[Tensor], Tensor],
    h0: Tensor,
    *,
    tol: float,
    max_iter: int,
    solver: str,
    memory: int,
    what: str,
    strict: bool = True,
) -> tuple[Tensor, SolveInfo, Tensor]:
    """Solve ``h = fn(h)`` for every row of ``h0`` (rows are independent problems).

    Anderson acceleration (type II; Walker & Ni, SIAM J. Numer. Anal. 2011) mixes a row's
    last ``memory`` images ``fn(h)`` with the weights that minimise the norm of the mixed
    residual. The small least-squares systems are solved in float64 with a Tikhonov term
    relative to their scale. The map is only piecewise smooth (relu), where Anderson can
    stall as the active set changes, so it is safeguarded row by row: a row whose best
    residual has not improved for ``memory`` iterations drops its history (the next step
    is a plain Picard step), and after three such restarts it stays with Picard steps,
    which converge wherever the map contracts.

    Returns ``(fn(h), info, converged)``: ``fn`` of the last iterate and a boolean mask of
    the rows whose relative residual is at most ``tol``. With ``strict`` (the default) a
    row that fails raises :class:`ConvergenceError`; otherwise the failed rows (including
    diverged, non-finite ones) are reported in the mask and the others are returned.
    """
    shape, width = h0.shape, h0.shape[-1]
    rows = h0.numel() // max(width, 1)
    h, fh = h0, fn(h0)
    history: list[float] = []
    diverged = torch.zeros(rows, dtype=torch.bool, device=h.device)
    if solver == "anderson":
        # Mixing weights multiply the rounding error of the stored images, so the
        # Tikhonov term grows with the working precision.
        ridge = max(1e-10, 100.0 * torch.finfo(h.dtype).eps)
        fs = h.new_zeros(rows, memory, width)  # images fn(h)
        gs = h.new_zeros(rows, memory, width)  # residuals fn(h) - h
        gram = torch.zeros(rows, memory, memory, dtype=torch.float64, device=h.device)
        valid = torch.zeros(rows, memory, dtype=torch.bool, device=h.device)
        best = torch.full((rows,), math.inf, dtype=torch.float64, device=h.device)
        stalled = torch.zeros(rows, dtype=torch.long, device=h.device)
        restarts = torch.zeros(rows, dtype=torch.long, device=h.device)
    for iteration in range(max_iter + 1):
        residual = _row_residual(h, fh).reshape(rows)
        diverged |= ~torch.isfinite(residual)
        if strict and bool(diverged.any()):
            raise ConvergenceError(
                f"the {what} fixed-point iteration diverged (non-finite values after {iteration} iterations); "
                "lower weight_variance or check the inputs",
                residual=math.inf,
                iterations=iteration,
            )
        open_residual = torch.where(diverged, 0.0, residual)
        worst = float(open_residual.max()) if rows else 0.0
        history.append(worst)
        if worst <= tol or iteration == max_iter:
            break
        if solver == "picard":
            h = fh
        else:
            improved = residual.double() < best
            best = torch.where(improved, residual.double(), best)
            stalled = torch.where(improved, 0, stalled + 1)
            restart = stalled >= memory
            valid &= ~restart.unsqueeze(-1)
            restarts += restart
            stalled = torch.where(restart, 0, stalled)
            slot = iteration % memory
            g_new = (fh - h).reshape(rows, width)
            fs[:, slot] = fh.reshape(rows, width)
            gs[:, slot] = g_new
            valid[:, slot] = True
            # One new row and column of the Gram matrix of the residuals per iteration.
            column = torch.nan_to_num((gs @ g_new.unsqueeze(-1)).squeeze(-1).double())
            gram[:, slot, :] = column
            gram[:, :, slot] = column
            pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
            masked = torch.where(pair, gram, 0.0)
            scale = masked.diagonal(dim1=-2, dim2=-1).sum(-1) / valid.sum(-1)
            diag = torch.where(valid, ridge * scale.unsqueeze(-1) + torch.finfo(torch.float64).tiny, 1.0)
            weights = torch.linalg.solve(masked + torch.diag_embed(diag), valid.double().unsqueeze(-1))
            weights = weights / weights.sum(-2, keepdim=True)
            mixed = (weights.mT.to(h.dtype) @ fs).squeeze(-2)
            picard = fh.reshape(rows, width)
            use_mixed = torch.isfinite(weights).all(-2).squeeze(-1) & (restarts < 3)
            h = torch.where(use_mixed.unsqueeze(-1), mixed, picard).reshape(shape)
        fh = fn(h)
    converged = ~diverged & (residual <= tol)
    info = SolveInfo(len(history) - 1, worst, tuple(history))
    if strict and not bool(converged.all()):
        raise ConvergenceError(
            f"the {what} fixed point did not converge in {max_iter} iterations (largest relative residual "
            f"{worst:.3g}, tolerance {tol:.3g}); raise max_iter or lower weight_variance",
            residual=worst,
            iterations=max_iter,
        )
    return fh, info, converged


class _ImplicitBackward(torch.autograd.Function):
    """Attach the implicit-function gradient to a solved equilibrium ``h* = phi(h* W^T + injection)``.

    The forward pass returns ``h*`` unchanged (it was found without autograd). With
    ``z = h* W^T + injection`` and ``J = diag(phi'(z)) W``, the adjoint of a cotangent ``g``
    is ``a = g + J^T a`` (a linear fixed point, solved like the forward one); then
    ``dL/dz = phi'(z) a``, ``dL/d injection = dL/dz`` and ``dL/dW = (dL/dz)^T h*``.
    """

    @staticmethod
    def forward(h: Tensor, injection: Tensor, weight: Tensor, act: Activation, options: dict) -> Tensor:
        return h.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        # Separate from forward so that torch.func transforms (vjp, jacrev) accept the function.
        h, injection, weight, ctx.act, ctx.options = inputs
        ctx.save_for_backward(h, weight, torch.addmm(injection, h, weight.mT))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, pre = ctx.saved_tensors
        slope = ctx.act.derivative(pre)

        def adjoint(a: Tensor) -> Tensor:
            return torch.addmm(grad, slope * a, weight)

        a, _, _ = _fixed_point(adjoint, grad, what="adjoint (backward)", **ctx.options)
        grad_pre = slope * a
        grad_weight = grad_pre.mT @ h if ctx.needs_input_grad[2] else None
        return None, grad_pre, grad_weight, None, None


# --------------------------------------------------------------------------- the network


def network_generator(seed: int, index: int = 0) -> torch.Generator:
    """The CPU generator that draws the weights of network ``index`` of a sample with ``seed``.

    Each network has its own stream (numpy's ``SeedSequence(seed, spawn_key=(index,))``), so
    a sample is reproducible from ``seed`` alone, independently of how it is batched.
    """
    seed = _seed(seed)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise TypeError(f"index must be a non-negative integer, got {index!r}")
    state = np.random.SeedSequence(seed, spawn_key=(int(index),)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _draw_normals(out: tuple[Tensor, ...], generator: torch.Generator | None) -> None:
    """Fill ``(U, W, b, v)`` with standard normals, in that order, from one generator.

    Scaling is left to the caller, so that a stack of networks is scaled in one pass.
    """
    for t in out:
        torch.randn(t.shape, generator=generator, dtype=t.dtype, out=t)


def _stds(
    in_features: int, width: int, weight_variance: float, input_variance: float | Tensor, bias_variance, output_variance
):
    u_std = (input_variance / in_features) ** 0.5
    return u_std, (weight_variance / width) ** 0.5, bias_variance**0.5, (output_variance / width) ** 0.5


class DEQNetwork(nn.Module):
    r"""A finite-width deep equilibrium model with the initialisation of the DEQ kernel.

    ``f(x) = v . h*(x)`` with ``h*(x) = phi(W h*(x) + U x + b)`` and
    ``U ~ N(0, input_variance/d)``, ``W ~ N(0, weight_variance/width)``,
    ``b ~ N(0, bias_variance)``, ``v ~ N(0, output_variance/width)`` elementwise.
    As ``width`` grows, ``f`` over the draw of the weights tends to the Gaussian process
    with covariance :func:`deq_kernel.equilibrium_covariance` (same arguments).

    Parameters
    ----------
    in_features : int
        Input dimension ``d``.
    width : int
        Hidden width ``n``.
    out_features : int, default 1
        Rows of ``v``; each output is an independent draw of the same process.
    activation : str, Activation or callable, default "relu"
        As for :func:`deq_kernel.equilibrium_covariance`.
    weight_variance, input_variance, bias_variance, output_variance : float
        :math:`\sigma_w^2, \sigma_u^2, \sigma_b^2, \sigma_v^2`. ``weight_variance`` must be
        below the activation's bound (where the kernel exists); ``input_variance`` may be a
        sequence of ``in_features`` variances (ARD).
    solver : {"anderson", "picard"}, default "anderson"
        Anderson acceleration or plain fixed-point iteration, forward and adjoint. At
        random initialisation the Jacobian's spectrum fills a disk (circular law), where
        no Krylov-type method beats plain iteration by much; Anderson's gain is that it
        still converges near the edge of contraction, where Picard iteration can cycle.
    tol : float, optional
        Relative residual ``|phi(W h + U x + b) - h| / |h|`` to reach, for every input;
        default 1e-5 in float32 and 1e-10 in float64.
    max_iter : int, default 500
        Iteration cap; beyond it :class:`deq_kernel.ConvergenceError` is raised.
    memory : int, default 6
        Iterates mixed by Anderson acceleration.
    generator : torch.Generator, optional
        Source of the initial weights (CPU); see :func:`network_generator`.
    dtype : torch.dtype, optional
        float32 or float64; default ``torch.get_default_dtype()``.
    device : torch.device or str, optional
    **activation_kwargs
        Activation options, e.g. ``negative_slope``.

    Attributes
    ----------
    input_weight, weight, bias, output_weight : torch.nn.Parameter
        ``U`` (width, in_features), ``W`` (width, width), ``b`` (width,), ``v`` (out_features, width).
    last_solve : SolveInfo or None
        What the last forward solve did (iterations, residual, per-iteration history).

    Examples
    --------
    >>> import torch
    >>> from deq_kernel.finite import DEQNetwork, network_generator
    >>> net = DEQNetwork(3, 64, generator=network_generator(0), dtype=torch.float64)
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> net(x).shape
    torch.Size([5, 1])
    >>> net.last_solve.residual < 1e-10
    True
    >>> torch.allclose(net(x), net(x, depth=500))  # the equilibrium is the deep limit
    True
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        out_features: int = 1,
        *,
        activation: ActivationLike = "relu",
        weight_variance: float = 1.0,
        input_variance: float | ArrayLike = 1.0,
        bias_variance: float = 0.0,
        output_variance: float = 1.0,
        solver: str = "anderson",
        tol: float | None = None,
        max_iter: int = 500,
        memory: int = 6,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **activation_kwargs: Any,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.width = _positive_int(width, "width")
        self.out_features = _positive_int(out_features, "out_features")
        self.weight_variance = _variance(weight_variance, "weight_variance")
        self.input_variance = _input_variance(input_variance, self.in_features)
        self.bias_variance = _variance(bias_variance, "bias_variance")
        self.output_variance = _variance(output_variance, "output_variance")
        self.activation = _activation(activation, self.weight_variance, activation_kwargs)
        self.solver = _solver(solver)
        dtype = _dtype(dtype)
        self.tol = _tolerance(tol, dtype)
        self.max_iter = _positive_int(max_iter, "max_iter")
        self.memory = _positive_int(memory, "memory")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r}")

        d, n = self.in_features, self.width
        tensors = (torch.empty(n, d, dtype=dtype), torch.empty(n, n, dtype=dtype), torch.empty(n, dtype=dtype))
        tensors += (torch.empty(self.out_features, n, dtype=dtype),)
        iv = self.input_variance.to(dtype) if isinstance(self.input_variance, Tensor) else self.input_variance
        stds = _stds(d, n, self.weight_variance, iv, self.bias_variance, self.output_variance)
        _draw_normals(tensors, generator)
        for t, std in zip(tensors, stds, strict=True):
            t.mul_(std)
        self.input_weight, self.weight, self.bias, self.output_weight = (nn.Parameter(t.to(device)) for t in tensors)
        self.last_solve: SolveInfo | None = None

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x must have the network's dtype {self.weight.dtype}, got {x.dtype}")
        return x

    def injection(self, x: Tensor) -> Tensor:
        """``U x + b`` for every row of ``x``: shape ``(..., width)``."""
        x = self._check_input(x)
        return nn.functional.linear(x, self.input_weight, self.bias)

    def equilibrium(self, x: Tensor) -> Tensor:
        """The hidden equilibrium ``h*(x)``, shape ``(..., width)``, differentiable implicitly.

        Raises
        ------
        deq_kernel.ConvergenceError
            If the forward (or, in backward, the adjoint) iteration does not reach ``tol``
            within ``max_iter`` iterations.
        """
        inj = self.injection(x)
        flat = inj.reshape(-1, self.width)
        weight = self.weight
        options = {"tol": self.tol, "max_iter": self.max_iter, "solver": self.solver, "memory": self.memory}
        with torch.no_grad():
            injection, w = flat.detach(), weight.detach()
            h, self.last_solve, _ = _fixed_point(
                lambda h: self.activation(torch.addmm(injection, h, w.mT)),
                torch.zeros_like(injection),
                what="forward",
                **options,
            )
        if torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad):
            h = _ImplicitBackward.apply(h, flat, weight, self.activation, options)
        return h.reshape(inj.shape)

    def hidden(self, x: Tensor, depth: int) -> Tensor:
        """``h^depth(x)`` of the weight-tied network of finite depth: ``h^0 = 0``,
        ``h^l = phi(W h^{l-1} + U x + b)``. Ordinary autograd through the layers."""
        depth = _positive_int(depth, "depth")
        inj = self.injection(x)
        h = self.activation(inj)
        for _ in range(depth - 1):
            h = self.activation(inj + nn.functional.linear(h, self.weight))
        return h

    def forward(self, x: Tensor, depth: int | None = None) -> Tensor:
        """``f(x) = v . h(x)``, shape ``(..., out_features)``.

        Parameters
        ----------
        x : Tensor, shape ``(..., in_features)``
        depth : int, optional
            ``None`` (default): the equilibrium ``h*``. An integer ``L``: the weight-tied
            network of depth ``L`` (see :meth:`hidden`), whose limit in ``L`` is the equilibrium.
        """
        h = self.equilibrium(x) if depth is None else self.hidden(x, depth)
        return nn.functional.linear(h, self.output_weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, width={self.width}, out_features={self.out_features}, "
            f"activation={self.activation.name!r}, weight_variance={self.weight_variance}, solver={self.solver!r}"
        )


# --------------------------------------------------------------------------- many networks


def _as_points(x: ArrayLike, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
        device = t.device if device is None else device
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"x must be a tensor or a numeric array-like: {exc}") from None
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"x must have shape (n, d) with n, d >= 1, got {tuple(t.shape)}")
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"x must be real, got dtype {t.dtype}")
    t = t.to(dtype=dtype, device=device)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("x contains NaN or infinite values")
    return t


class _Sampler(NamedTuple):
    x: Tensor
    width: int
    n_networks: int
    seed: int
    act: Activation
    stds: tuple
    depth: int | None
    options: dict
    batch_size: int
    drop: bool
    subspace: bool


def _sampler(
    x: ArrayLike,
    *,
    width: int,
    n_networks: int,
    seed: int,
    activation: ActivationLike,
    weight_variance: float,
    input_variance: float | ArrayLike,
    bias_variance: float,
    output_variance: float,
    depth: int | None,
    batch_size: int | None,
    solver: str,
    tol: float | None,
    max_iter: int,
    memory: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    nonconverged: str,
    weights: str,
    activation_kwargs: dict,
) -> _Sampler:
    width = _positive_int(width, "width")
    n_networks = _positive_int(n_networks, "n_networks")
    seed = _seed(seed)
    dtype = _dtype(dtype)
    x = _as_points(x, dtype, device)
    wv = _variance(weight_variance, "weight_variance")
    iv = _input_variance(input_variance, x.shape[1])
    iv = iv.to(dtype) if isinstance(iv, Tensor) else iv
    bv = _variance(bias_variance, "bias_variance")
    stds = _stds(x.shape[1], width, wv, iv, bv, _variance(output_variance, "output_variance"))
    act = _activation(activation, wv, activation_kwargs)
    if depth is not None:
        depth = _positive_int(depth, "depth")
    if batch_size is None:
        # Keep the stacked W's near 2**24 numbers (64 MiB in float32), and batches small
        # enough that one slow network does not hold many others in the iteration. At width
        # 1000 on 2 cores, 16 networks a batch drew 104 networks/s against 80 with 67 (2**26).
        batch_size = max(1, min(256, 2**24 // (width * width)))
    batch_size = min(_positive_int(batch_size, "batch_size"), n_networks)
    options = {
        "tol": _tolerance(tol, dtype),
        "max_iter": _positive_int(max_iter, "max_iter"),
        "solver": _solver(solver),
        "memory": _positive_int(memory, "memory"),
    }
    if nonconverged not in NONCONVERGED:
        raise ValueError(f"nonconverged must be one of {', '.join(map(repr, NONCONVERGED))}, got {nonconverged!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    return _Sampler(
        x, width, n_networks, seed, act, stds, depth, options, batch_size, nonconverged == "drop", weights == "subspace"
    )


@torch.no_grad()
def _hidden_states(s: _Sampler) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(h, v)`` per batch of networks: ``h`` (b, n, width) and ``v`` (b, width)."""
    x, width, act = s.x, s.width, s.act
    n, d = x.shape
    dtype, device = x.dtype, x.device
    dropped = 0
    for start in range(0, s.n_networks, s.batch_size):
        b = min(s.batch_size, s.n_networks - start)
        u = torch.empty(b, width, d, dtype=dtype)
        bias, v = torch.empty(b, 1, width, dtype=dtype), torch.empty(b, 1, width, dtype=dtype)
        if s.subspace:
            generators = [_subspace_generator(s.seed, start + i) for i in range(b)]
            for i, generator in enumerate(generators):
                _draw_normals((u[i], bias[i, 0], v[i]), generator)
            weights = _SubspaceWeights(generators, width, s.stds[1], dtype, device)
        else:
            w = torch.empty(b, width, width, dtype=dtype)
            _draw_batch((u, w, bias, v), s.seed, start)
            w = w.to(device).mul_(s.stds[1])

            def weights(h: Tensor, w: Tensor = w) -> Tensor:
                return h @ w.mT

        u, bias, v = (t.to(device).mul_(std) for t, std in zip((u, bias, v), (s.stds[0], *s.stds[2:]), strict=True))
        injection = torch.baddbmm(bias, x.expand(b, n, d), u.mT)
        if s.depth is None:
            h, _, converged = _fixed_point(
                lambda h, inj=injection, weights=weights: act(inj + weights(h)),
                torch.zeros_like(injection),
                what=f"forward (networks {start}..{start + b - 1})",
                strict=not s.drop,
                **s.options,
            )
            keep = converged.reshape(b, n).all(-1)
            if not bool(keep.all()):
                dropped += int((~keep).sum())
                h, v = h[keep], v[keep]
        else:
            h = act(injection)
            for _ in range(s.depth - 1):
                h = act(injection + weights(h))
        yield h, v.squeeze(1)
    if dropped:
        warnings.warn(
            f"{dropped} of {s.n_networks} networks (width {width}) had no equilibrium found to tol within "
            f"max_iter and were dropped (nonconverged='drop'); the estimate is conditional on convergence",
            DroppedNetworksWarning,
            stacklevel=3,
        )


def _draw_batch(out: tuple[Tensor, Tensor, Tensor, Tensor], seed: int, start: int) -> None:
    """Fill stacked ``(U, W, b, v)`` of networks ``start, start + 1, ...`` with standard normals.

    Network ``start + i`` draws from its own generator, in the order and shapes of
    :class:`DEQNetwork`, so that it is reproducible on its own. Each generator is sequential,
    so the networks are drawn on up to ``torch.get_num_threads()`` threads at once (drawing is
    half of the sampler's time at large width); the numbers do not depend on the threads.
    """
    u, w, bias, v = out
    count = u.shape[0]

    def draw(i: int) -> None:
        _draw_normals((u[i], w[i], bias[i, 0], v[i]), network_generator(seed, start + i))

    workers = min(torch.get_num_threads(), count)
    if workers <= 1 or w[0].numel() < 1 << 16:
        for i in range(count):
            draw(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(draw, range(count)))  # re-raises a worker's exception here


def _subspace_generator(seed: int, index: int) -> torch.Generator:
    """The generator of network ``index`` under ``weights="subspace"``: a stream of its own, apart from
    :func:`network_generator`'s (the two modes draw different networks from one seed)."""
    state = np.random.SeedSequence(seed, spawn_key=(int(index), 1)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class _SubspaceWeights:
    r"""The recurrent weights of a batch of networks, drawn only on the directions they meet.

    ``W`` has i.i.d. ``N(0, std^2)`` entries. For an orthonormal basis ``Q`` of the vectors it
    has been applied to, ``Y = W Q`` has i.i.d. ``N(0, std^2)`` entries, and ``W (I - Q Q^T)``
    is independent of ``Y`` (jointly Gaussian and uncorrelated) with the law of a fresh draw
    times ``I - Q Q^T``. So, applied to a batch ``H``, ``W H = Y (Q^T H) + W R`` with ``R`` the
    part of ``H`` orthogonal to ``Q``: an orthonormal basis ``P`` of ``R`` (``R = P T``) gets
    fresh draws ``W P``, appended to ``Y`` as ``P`` is to ``Q``. Every answer has exactly
    the law it has with the whole matrix drawn, also when the next ``H`` depends on earlier
    answers (as in a fixed-point iteration), while only ``width x k`` numbers are drawn and
    multiplied, ``k`` the number of directions met (one per input and iteration) instead
    of ``width``. Should ``k`` reach ``width``, the basis is completed and ``W`` held whole.

    Each network draws from its own generator, so that its numbers do not depend on the
    batch it is in. The new directions are orthogonalised against the basis twice (classical
    Gram-Schmidt with reorthogonalisation), which keeps it orthonormal to rounding.
    """

    def __init__(self, generators: list[torch.Generator], width: int, std: float, dtype: torch.dtype, device) -> None:
        self.generators, self.width, self.std = generators, width, std
        self.dtype, self.device = dtype, device
        self.k = 0
        # The basis and its images as rows, (b, capacity, width): the first k rows are in use.
        self.q = self.y = torch.empty(len(generators), 0, width, dtype=dtype, device=device)
        self.whole: Tensor | None = None  # W itself, once the basis is complete

    def _draw(self, rows: int) -> Tensor:
        """``rows`` standard normal vectors per network, ``(b, rows, width)``, each from its network's generator."""
        out = torch.empty(len(self.generators), rows, self.width, dtype=self.dtype)
        for t, generator in zip(out, self.generators, strict=True):
            _draw_normals((t,), generator)
        return out.to(self.device)

    def _append(self, basis: Tensor, images: Tensor) -> None:
        k, n = self.k, basis.shape[-2]
        if k + n > self.q.shape[-2]:  # room for twice as many rows: appending costs O(1) per row
            size = min(self.width, max(k + n, 2 * self.q.shape[-2]))
            q, y = (t.new_empty(len(self.generators), size, self.width) for t in (self.q, self.y))
            q[:, :k], y[:, :k] = self.q[:, :k], self.y[:, :k]
            self.q, self.y = q, y
        self.q[:, k : k + n], self.y[:, k : k + n] = basis, images
        self.k = k + n

    def __call__(self, h: Tensor) -> Tensor:
        """``h W^T`` for ``h`` of shape ``(b, n, width)`` (rows: the vectors ``W`` is applied to)."""
        if self.whole is not None:
            return h @ self.whole.mT
        if not bool(h.any()):  # W 0 = 0 (the iteration's start): no direction to draw
            return torch.zeros_like(h)
        k, n = self.k, h.shape[-2]
        q = self.q[:, :k]
        coef = h @ q.mT
        rest = h - coef @ q
        if k + n > self.width:
            self._complete()
            return coef @ self.y[:, :k] + rest @ self.whole.mT
        # rest^T = first tri; first = basis fix + q^T again (the second Gram-Schmidt pass, on the
        # normalised vectors): h^T = q^T coef^T + q^T again tri + basis (fix tri), exactly.
        first, tri = torch.linalg.qr(rest.mT)
        again = q @ first
        basis, fix = torch.linalg.qr(first - q.mT @ again)
        eps = torch.finfo(h.dtype).eps
        if k and float((q @ basis).abs().amax()) > 64 * eps * math.sqrt(self.width):
            # A column of rest at rounding level (repeated or zero inputs): QR's direction for it
            # may lie in span(q). Householder QR of [q^T, first] keeps the new directions
            # orthogonal to q exactly; its first k columns are q up to signs.
            full, triangle = torch.linalg.qr(torch.cat([q.mT, first], -1))
            signs = triangle[:, :k, :k].diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-1)
            basis, fix, again = full[..., k:], triangle[:, k:, k:], signs * triangle[:, :k, k:]
        coef = coef + (again @ tri).mT
        images = self._draw(n).mul_(self.std)
        self._append(basis.mT, images)
        return coef @ self.y[:, :k] + (fix @ tri).mT @ images

    def _complete(self) -> None:
        """Complete the basis with the orthogonal complement's directions and hold ``W = Y Q^T``."""
        q = self.q[:, : self.k]
        seeds = self._draw(self.width - self.k).mT
        for _ in range(2):
            seeds = seeds - q.mT @ (q @ seeds)
        rest, _ = torch.linalg.qr(seeds)
        images = self._draw(self.width - self.k).mul_(self.std)
        self.whole = self.y[:, : self.k].mT @ q + images.mT @ rest.mT


_SAMPLER_DOC = """x : tensor or array-like, shape ``(n, d)``
        Inputs, shared by every network.
    width : int
        Hidden width of every network.
    n_networks : int
        Independent networks to draw.
    seed : int
        Network ``i`` has the weights of ``DEQNetwork(..., generator=network_generator(seed, i))``.
    activation, weight_variance, input_variance, bias_variance, output_variance
        As for :class:`DEQNetwork` and :func:`deq_kernel.equilibrium_covariance`.
    depth : int, optional
        ``None``: the equilibrium. An integer: the weight-tied network of that depth.
    batch_size : int, optional
        Networks solved together (their ``W`` are stacked for ``torch.bmm``); by default
        ``min(256, 2**24 / width**2)``. Results do not depend on it.
    solver, tol, max_iter, memory
        As for :class:`DEQNetwork`; every network and input must reach ``tol``.
    dtype : torch.dtype, default torch.float32
        Working precision of the networks. float32 rounding is far below the Monte Carlo
        error; accumulations are in float64.
    device : torch.device or str, optional
        Where the networks run; default the device of ``x`` (CPU for array-likes). Weights
        are drawn on the CPU, so results do not depend on the device beyond rounding.
    nonconverged : {"raise", "drop"}, default "raise"
        What to do with a network whose equilibrium is not found to ``tol`` (at small
        width some draws of ``W`` are not contractions and have none, or several):
        raise :class:`deq_kernel.ConvergenceError`, or drop it with a
        :class:`DroppedNetworksWarning` that counts them (the result then conditions on
        convergence and has fewer networks).
    weights : {{"dense", "subspace"}}, default "dense"
        How each network's recurrent weights ``W`` are drawn. ``"dense"``: the whole
        ``width x width`` matrix, the network of ``DEQNetwork(..., generator=network_generator(seed, i))``.
        ``"subspace"``: ``W`` only on the directions the iteration applies it to (an
        orthonormal basis of them; ``W`` times it is again i.i.d. Gaussian, and so is ``W`` on
        each new direction given the earlier ones), about ``n x iterations`` columns instead of
        ``width``: the same distribution of networks exactly, other draws from the same seed,
        faster where the inputs times the iterations are well below the width (2x at
        width 1000 with 10 inputs), slower where they are not (width 100)."""


def sample_outputs(
    x: ArrayLike,
    *,
    width: int,
    n_networks: int,
    seed: int,
    activation: ActivationLike = "relu",
    weight_variance: float = 1.0,
    input_variance: float | ArrayLike = 1.0,
    bias_variance: float = 0.0,
    output_variance: float = 1.0,
    depth: int | None = None,
    batch_size: int | None = None,
    solver: str = "anderson",
    tol: float | None = None,
    max_iter: int = 500,
    memory: int = 6,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    nonconverged: str = "raise",
    weights: str = "dense",
    **activation_kwargs: Any,
) -> Tensor:
    """Outputs ``f(x)`` of ``n_networks`` independently drawn finite DEQs.

    As ``width`` grows each column tends in distribution to ``N(0, k(x, x))``, and the
    rows to the Gaussian process with covariance :func:`deq_kernel.equilibrium_covariance`.

    Parameters
    ----------
    {params}
    **activation_kwargs
        Activation options.

    Returns
    -------
    Tensor, shape ``(n_networks, n)``
        Row ``i`` is network ``i``'s output at every input (dtype ``dtype``); with
        ``nonconverged="drop"``, the rows of the networks kept, in order.

    Raises
    ------
    deq_kernel.ConvergenceError
        If some network's equilibrium is not found to ``tol``.
    """
    s = _sampler(**_locals_for_sampler(locals()))
    return torch.cat([(h * v.unsqueeze(1)).sum(-1) for h, v in _hidden_states(s)])


def network_kernels(
    x: ArrayLike,
    *,
    width: int,
    n_networks: int,
    seed: int,
    activation: ActivationLike = "relu",
    weight_variance: float = 1.0,
    input_variance: float | ArrayLike = 1.0,
    bias_variance: float = 0.0,
    output_variance: float = 1.0,
    depth: int | None = None,
    batch_size: int | None = None,
    solver: str = "anderson",
    tol: float | None = None,
    max_iter: int = 500,
    memory: int = 6,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    nonconverged: str = "raise",
    weights: str = "dense",
    **activation_kwargs: Any,
) -> Tensor:
    """Each network's empirical kernel ``output_variance * h(x) . h(x') / width``.

    This is the covariance of ``f`` given the hidden weights ``U, W, b`` (the average over
    ``v`` alone), the per-network quantity of the paper's Figures 3 and 4. Its mean over
    networks is the network covariance, and each one tends to the equilibrium kernel
    as the width grows (the squared relative Frobenius error falls like ``1/width``).

    Parameters
    ----------
    {params}
    **activation_kwargs
        Activation options.

    Returns
    -------
    Tensor, shape ``(n_networks, n, n)``, dtype float64
    """
    s = _sampler(**_locals_for_sampler(locals()))
    scale = s.stds[3] ** 2  # output_variance / width
    return torch.cat([scale * (h.double() @ h.double().mT) for h, _ in _hidden_states(s)])


def empirical_covariance(
    x: ArrayLike,
    *,
    width: int,
    n_networks: int,
    seed: int,
    activation: ActivationLike = "relu",
    weight_variance: float = 1.0,
    input_variance: float | ArrayLike = 1.0,
    bias_variance: float = 0.0,
    output_variance: float = 1.0,
    depth: int | None = None,
    estimator: str = "outputs",
    return_stderr: bool = False,
    batch_size: int | None = None,
    solver: str = "anderson",
    tol: float | None = None,
    max_iter: int = 500,
    memory: int = 6,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    nonconverged: str = "raise",
    weights: str = "dense",
    **activation_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Covariance of the outputs of ``n_networks`` independently drawn finite DEQs.

    An unbiased Monte Carlo estimate of ``Cov[f(x), f(x')]`` over the random weights of
    width-``width`` networks, to compare with :func:`deq_kernel.equilibrium_covariance`.
    The output mean is exactly zero (``v`` is centred and independent of ``h``), so the
    second moment is averaged without centring.

    Parameters
    ----------
    {params}
    estimator : {{"outputs", "conditional"}}, default "outputs"
        ``"outputs"``: the mean of ``f(x) f(x')`` over networks, the covariance of the
        outputs as sampled. ``"conditional"``: the mean of :func:`network_kernels`, which
        averages ``v`` out exactly (Rao-Blackwellised): the same expectation, with a much
        smaller variance, so the finite-width bias is visible with fewer networks.
    return_stderr : bool, default False
        Also return the elementwise standard error of the estimate.
    **activation_kwargs
        Activation options.

    Returns
    -------
    Tensor, shape ``(n, n)``, dtype float64
        The estimate; with ``return_stderr``, a pair ``(estimate, standard_error)``.

    Examples
    --------
    >>> import torch, deq_kernel
    >>> from deq_kernel.finite import empirical_covariance
    >>> x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> emp = empirical_covariance(x, width=256, n_networks=200, seed=0, weight_variance=0.36, estimator="conditional")
    >>> exact = deq_kernel.equilibrium_covariance(x, weight_variance=0.36)
    >>> bool(torch.linalg.matrix_norm(emp - exact) < 0.03 * torch.linalg.matrix_norm(exact))
    True
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    if not isinstance(return_stderr, bool):
        raise TypeError(f"return_stderr must be a bool, got {return_stderr!r}")
    s = _sampler(**_locals_for_sampler(locals()))
    n = s.x.shape[0]
    total = torch.zeros(n, n, dtype=torch.float64, device=s.x.device)
    total_sq = torch.zeros_like(total)
    scale = s.stds[3] ** 2
    count = 0
    for h, v in _hidden_states(s):
        if estimator == "outputs":
            f = (h * v.unsqueeze(1)).sum(-1).double()
            terms = f.unsqueeze(-1) * f.unsqueeze(-2)
        else:
            hd = h.double()
            terms = scale * (hd @ hd.mT)
        total += terms.sum(0)
        total_sq += (terms * terms).sum(0)
        count += terms.shape[0]
    if count == 0:
        raise ConvergenceError(
            f"none of the {s.n_networks} networks converged", residual=math.inf, iterations=s.options["max_iter"]
        )
    mean = total / count
    if not return_stderr:
        return mean
    variance = (total_sq / count - mean * mean).clamp_min(0.0) * (count / max(count - 1, 1))
    return mean, (variance / count).sqrt()


def _locals_for_sampler(values: dict) -> dict:
    """The arguments of :func:`_sampler` picked from a public function's ``locals()``."""
    return {name: values[name] for name in _SAMPLER_ARGS}


_SAMPLER_ARGS = tuple(inspect.signature(_sampler).parameters)

for _fn in (sample_outputs, network_kernels, empirical_covariance):
    _fn.__doc__ = _fn.__doc__.format(params=_SAMPLER_DOC)


# --------------------------------------------------------------------------- finite depth, infinite width


def _dual_matrix(act: Activation, cov: Tensor) -> Tensor:
    """``E[phi(u) phi(u)^T]`` for ``u ~ N(0, cov)``, ``cov`` of shape (n, n)."""
    q = cov.diagonal().clamp_min(0.0)
    root = q.sqrt()
    inv = safe_divide(1.0, root)
    rho = (cov * inv.unsqueeze(-1) * inv.unsqueeze(-2)).clamp(-1.0, 1.0)
    state, _ = act.prepare(q)
    rows = tuple(t.unsqueeze(-1) for t in state)
    cols = tuple(t.unsqueeze(-2) for t in state)
    value, _ = act.pair_dual(rows, cols, rho)
    value = value.expand(cov.shape).clone()
    value.diagonal().copy_(act.diag_dual(q)[0])
    return 0.5 * (value + value.mT)


def finite_depth_covariance(
    x: ArrayLike,
    depth: int,
    *,
    activation: ActivationLike = "relu",
    weight_variance: float = 1.0,
    input_variance: float | ArrayLike = 1.0,
    bias_variance: float = 0.0,
    output_variance: float = 1.0,
    input_injection: bool = True,
    output: str = "nngp",
    all_depths: bool = False,
    **activation_kwargs: Any,
) -> Tensor:
    r"""Infinite-width covariance of a weight-tied network of finite depth.

    With ``s(x, x') = sum_i input_variance_i x_i x'_i / d + bias_variance``, the
    pre-activation covariance of layer ``l`` of the network of :meth:`DEQNetwork.hidden`
    is, as the width tends to infinity (weight tying does not change the forward
    recursion; Yang 2019, Gao et al. 2023 Corollary 4.2),

    .. math:: K^1 = s,\qquad K^{l+1} = \sigma_w^2\,E[\phi(u)\phi(u')]_{K^l} + s,

    and the output covariance is :math:`k^L = \sigma_v^2 E[\phi(u)\phi(u')]_{K^L}`. As
    ``depth`` grows, ``K^L`` tends geometrically to the equilibrium ``K*`` of
    :func:`deq_kernel.equilibrium_covariance`. With ``input_injection=False`` the input
    enters the first layer only, :math:`K^{l+1} = \sigma_w^2 E[\phi\phi]_{K^l} + \sigma_b^2`:
    the NNGP of a deep MLP, whose kernel degenerates with depth.

    Parameters
    ----------
    x : tensor or array-like, shape ``(n, d)``
    depth : int
        Number of layers ``L >= 1``.
    activation, weight_variance, input_variance, bias_variance, output_variance, **activation_kwargs
        As for :func:`deq_kernel.equilibrium_covariance`, except that ``weight_variance`` is
        not limited to the activation's bound: a finite depth is defined for any.
    input_injection : bool, default True
        Inject ``U x + b`` at every layer (the weight-tied DEQ unrolled) or only at the first.
    output : {"nngp", "preactivation"}
        ``k^L`` or ``K^L``.
    all_depths : bool, default False
        Return every depth ``1..L`` stacked, shape ``(L, n, n)``.

    Returns
    -------
    Tensor, shape ``(n, n)`` (or ``(L, n, n)``), float64 for array-likes, else ``x``'s dtype.
    """
    depth = _positive_int(depth, "depth")
    if output not in ("nngp", "preactivation"):
        raise ValueError(f"output must be 'nngp' or 'preactivation', got {output!r}")
    for flag, name in ((input_injection, "input_injection"), (all_depths, "all_depths")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    dtype = x.dtype if isinstance(x, Tensor) and x.dtype in (torch.float32, torch.float64) else torch.float64
    x = _as_points(x, dtype, None)
    wv = _variance(weight_variance, "weight_variance")
    iv = _input_variance(input_variance, x.shape[1])
    bv = _variance(bias_variance, "bias_variance")
    ov = _variance(output_variance, "output_variance")
    act = get_activation(activation, **activation_kwargs)
    scale = iv.to(x) if isinstance(iv, Tensor) else torch.tensor(iv, dtype=x.dtype, device=x.device)
    s = (x * scale / x.shape[1]) @ x.mT + bv
    cov = s
    results = []
    for layer in range(1, depth + 1):
        if layer > 1:
            cov = wv * _dual_matrix(act, cov) + (s if input_injection else bv)
        if all_depths or layer == depth:
            results.append(ov * _dual_matrix(act, cov) if output == "nngp" else cov)
    return torch.stack(results) if all_depths else results[0]
