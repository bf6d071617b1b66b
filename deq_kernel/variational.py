r"""Sparse variational GPs (SVGP) with :class:`~deq_kernel.DEQKernel`, for data too large for an exact GP.

:class:`SVGPModel` is a :class:`gpytorch.models.ApproximateGP` (Hensman, Fusi and Lawrence,
*Gaussian Processes for Big Data*, UAI 2013): ``m`` learned inducing points ``Z``, a full-rank
Gaussian :math:`q(u) = N(\mu, S)` over the function values at ``Z``
(:class:`~gpytorch.variational.CholeskyVariationalDistribution`, whitened by
:class:`~gpytorch.variational.VariationalStrategy`), a constant mean and
``ScaleKernel(DEQKernel(...))``. :func:`fit_svgp` maximises the evidence lower bound
(:class:`~gpytorch.mlls.VariationalELBO`) with Adam over minibatches drawn by a
:class:`torch.utils.data.DataLoader`.

Each step evaluates the kernel on ``K(Z, Z)`` (symmetric, ``m x m``), ``K(Z, X_batch)``
(rectangular) and the diagonal ``k(x, x)`` of the batch: the first two take the relu family's
correlation-table path of :mod:`deq_kernel.equilibrium.table`, the last the O(n) diagonal path. Their shapes
repeat from step to step, so under the default ``settings.compile("auto")`` the kernel's
elementwise passes are compiled in the background once the eager ones have run long enough
to repay it, and no step waits for the compiler.

The model classes live here rather than in :mod:`deq_kernel.gpytorch` because they are one idea
(inducing-point approximations and their stochastic training) that the exact-GP module neither
needs nor imports.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gpytorch
import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood, Likelihood
from gpytorch.means import ConstantMean, Mean
from gpytorch.models import ApproximateGP
from gpytorch.variational import (
    CholeskyVariationalDistribution,
    IndependentMultitaskVariationalStrategy,
    VariationalStrategy,
)
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from .activations import Activation
from .gpytorch import DEQKernel
from .settings import positive_int

__all__ = ["SVGPFitResult", "SVGPModel", "fit_svgp", "predict_latent"]


class SVGPModel(ApproximateGP):
    r"""Sparse variational GP with learned inducing points and, by default, ``ScaleKernel(DEQKernel(...))``.

    Parameters
    ----------
    inducing_points : Tensor, shape ``(m, d)``
        Initial inducing inputs (e.g. a random subset of the training inputs); learned with
        ``learn_inducing_locations=True``.
    likelihood : gpytorch.likelihoods.Likelihood
        Held as a submodule, so that ``model.parameters()``, ``state_dict`` and pickling include
        it: ``GaussianLikelihood`` (regression), ``BernoulliLikelihood`` (two classes) or
        ``SoftmaxLikelihood(num_features=k, num_classes=k, mixing_weights=False)`` with
        ``num_tasks=k``.
    num_tasks : int, optional
        Independent latent functions (one per class for a softmax likelihood), by
        :class:`~gpytorch.variational.IndependentMultitaskVariationalStrategy`. They share the
        inducing inputs, the DEQ hyperparameters and the output scale (one kernel matrix and one
        Cholesky factorisation per step); each has its own variational distribution and
        constant mean.
    covar_module : gpytorch.kernels.Kernel, optional
        Default: ``ScaleKernel(DEQKernel(activation, ard_num_dims=..., **activation_kwargs))``.
    mean_module : gpytorch.means.Mean, optional
        Default: ``ConstantMean`` (one constant per task).
    activation : str, Activation or callable, default "relu"
    ard : bool, default False
        One input variance per input dimension in the default kernel.
    learn_inducing_locations : bool, default True
    **activation_kwargs
        Options of the default kernel's activation.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from deq_kernel.variational import SVGPModel, fit_svgp
    >>> x = torch.randn(500, 2, dtype=torch.float64)
    >>> y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(500, dtype=torch.float64)
    >>> model = SVGPModel(x[:32].clone(), gpytorch.likelihoods.GaussianLikelihood()).double()
    >>> result = fit_svgp(model, x, y, epochs=5, batch_size=128, learning_rate=0.05)
    >>> len(result.elbo_history)
    5
    """

    def __init__(
        self,
        inducing_points: Tensor,
        likelihood: Likelihood,
        *,
        num_tasks: int | None = None,
        covar_module: Kernel | None = None,
        mean_module: Mean | None = None,
        activation: str | Activation | Callable[[Tensor], Tensor] = "relu",
        ard: bool = False,
        learn_inducing_locations: bool = True,
        **activation_kwargs: Any,
    ) -> None:
        if not isinstance(inducing_points, Tensor) or inducing_points.dim() != 2 or inducing_points.shape[0] < 1:
            raise ValueError(
                "inducing_points must be a tensor of shape (m, d) with m >= 1, got "
                f"{getattr(inducing_points, 'shape', type(inducing_points).__name__)}"
            )
        if not isinstance(likelihood, Likelihood):
            raise TypeError(f"likelihood must be a gpytorch.likelihoods.Likelihood, got {type(likelihood).__name__}")
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"num_tasks must be a positive integer or None, got {num_tasks!r}")
        batch_shape = torch.Size([num_tasks]) if num_tasks is not None else torch.Size()
        num_inducing = inducing_points.shape[0]
        distribution = CholeskyVariationalDistribution(num_inducing, batch_shape=batch_shape)
        strategy = VariationalStrategy(
            self, inducing_points, distribution, learn_inducing_locations=learn_inducing_locations
        )
        if num_tasks is not None:
            strategy = IndependentMultitaskVariationalStrategy(strategy, num_tasks=num_tasks)
        super().__init__(strategy)
        if covar_module is None:
            ard_num_dims = inducing_points.shape[-1] if ard else None
            # No batch shape: the tasks share one kernel matrix and one Cholesky factor per step
            # (a batched kernel would evaluate the same matrix once per task).
            covar_module = ScaleKernel(DEQKernel(activation, ard_num_dims=ard_num_dims, **activation_kwargs))
        self.covar_module = covar_module
        self.mean_module = ConstantMean(batch_shape=batch_shape) if mean_module is None else mean_module
        self.likelihood = likelihood
        self.num_tasks = num_tasks

    @property
    def inducing_points(self) -> Tensor:
        strategy = self.variational_strategy
        return getattr(strategy, "base_variational_strategy", strategy).inducing_points

    def forward(self, x: Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


@dataclass
class SVGPFitResult:
    """What :func:`fit_svgp` did.

    Attributes
    ----------
    elbo : float
        Evidence lower bound per data point, averaged over the last epoch's minibatches
        (a stochastic estimate: the parameters change during the epoch).
    n_steps : int
        Optimiser steps taken.
    epoch_seconds : list of float
        Wall time of each epoch.
    elbo_history : list of float
        The epoch averages of the ELBO per data point.
    """

    elbo: float
    n_steps: int
    epoch_seconds: list[float] = field(default_factory=list)
    elbo_history: list[float] = field(default_factory=list)


def fit_svgp(
    model: SVGPModel,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 1024,
    learning_rate: float = 0.01,
    train_hyperparameters: bool = True,
    initialize: bool = True,
    generator: torch.Generator | None = None,
    verbose: bool = False,
) -> SVGPFitResult:
    r"""Maximise the evidence lower bound of an :class:`SVGPModel` by Adam over minibatches.

    Each epoch visits the data once in a random order, in minibatches from a
    :class:`torch.utils.data.DataLoader`; each step maximises
    :class:`gpytorch.mlls.VariationalELBO` of the batch (scaled to the whole data set). The
    model is left in evaluation mode.

    Parameters
    ----------
    model : SVGPModel
        With its ``likelihood``; on the device and in the dtype of ``x``.
    x : Tensor, shape ``(n, d)``
    y : Tensor, shape ``(n,)``
        Targets (class indices for a softmax likelihood, 0/1 for a Bernoulli one).
    epochs : int, default 20
    batch_size : int, default 1024
    learning_rate : float, default 0.01
    train_hyperparameters : bool, default True
        Also learn the kernel's hyperparameters, the mean and the likelihood's parameters;
        ``False`` learns only the variational distribution and the inducing inputs.
    initialize : bool, default True
        With a :class:`~gpytorch.likelihoods.GaussianLikelihood` and one latent function, start
        from the optimal :math:`q(u)` for the initial inducing inputs and hyperparameters (Titsias,
        AISTATS 2009), found in one pass over the data: :math:`S = \Lambda^{-1}`,
        :math:`\mu = \sigma^{-2} S A (y - m)` with :math:`A = L^{-1} K_{ZX}`,
        :math:`\Lambda = I + \sigma^{-2} A A^\top` (whitened, :math:`K_{ZZ} = L L^\top`). The
        stochastic optimisation then starts at the collapsed bound instead of far below it.
    generator : torch.Generator, optional
        Draws the order of the minibatches.
    verbose : bool, default False
        A progress bar per epoch on standard error (``tqdm``; one plain line per epoch when
        standard error is not a terminal).

    Returns
    -------
    SVGPFitResult
    """
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    if not (isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be (n, d) and y (n,) with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    likelihood = model.likelihood
    num_data = x.shape[0]
    dataset = TensorDataset(x, y)
    # Whole batches are indexed at once: the default collation stacks rows one by one.
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size=batch_size, drop_last=False)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None)
    variational = {id(p) for p in model.variational_strategy.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and (train_hyperparameters or id(p) in variational)]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=num_data)
    result = SVGPFitResult(elbo=math.nan, n_steps=0)
    if initialize and isinstance(likelihood, GaussianLikelihood) and model.num_tasks is None:
        _initialize_gaussian(model, x, y, batch_size)
    model.train()
    likelihood.train()
    for epoch in range(1, epochs + 1):
        start, total, count = time.perf_counter(), 0.0, 0
        with _progress(len(loader), f"epoch {epoch}/{epochs}", verbose) as bar:
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = -mll(model(xb), yb)
                loss.backward()
                optimizer.step()
                value = -loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the evidence lower bound became {value} at epoch {epoch}; lower learning_rate"
                    )
                total += value * xb.shape[0]
                count += xb.shape[0]
                result.n_steps += 1
                bar.update(value)
            result.elbo = total / count
            result.elbo_history.append(result.elbo)
            result.epoch_seconds.append(time.perf_counter() - start)
            bar.close(result.elbo, result.epoch_seconds[-1])
    model.eval()
    likelihood.eval()
    return result


def _initialize_gaussian(model: SVGPModel, x: Tensor, y: Tensor, batch_size: int) -> None:
    """Set ``q(u)`` to its optimum under a Gaussian likelihood (see :func:`fit_svgp`)."""
    strategy = model.variational_strategy
    distribution = strategy._variational_distribution
    z = strategy.inducing_points.detach()
    model.eval()
    with torch.no_grad():
        kzz = model.covar_module(z).to_dense()
        kzz = kzz + strategy.jitter_val * torch.eye(kzz.shape[-1], dtype=kzz.dtype, device=kzz.device)
        chol = torch.linalg.cholesky(kzz)
        gram = torch.zeros_like(kzz)
        projected = kzz.new_zeros(kzz.shape[-1])
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            a = torch.linalg.solve_triangular(chol, model.covar_module(z, xb).to_dense(), upper=False)
            gram += a @ a.mT
            projected += a @ (yb - model.mean_module(xb))
        noise = model.likelihood.noise.reshape(())
        precision = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device) + gram / noise
        factor = torch.linalg.cholesky(precision)
        mean = torch.cholesky_solve((projected / noise).unsqueeze(-1), factor).squeeze(-1)
        covariance = torch.cholesky_inverse(factor)
        distribution.variational_mean.copy_(mean)
        distribution.chol_variational_covar.copy_(torch.linalg.cholesky(covariance))
        strategy.variational_params_initialized.fill_(1)


def predict_latent(model: SVGPModel, x: Tensor, *, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and variance of the approximate posterior of the latent function(s), in blocks of rows.

    Parameters
    ----------
    model : SVGPModel
    x : Tensor, shape ``(n, d)``
    batch_size : int, default 4096
        Rows per block: memory is ``O(batch_size * m)``, not ``O(n * m)``.

    Returns
    -------
    mean, variance : Tensor
        Shape ``(n,)``, or ``(n, num_tasks)`` for a multitask model.
    """
    positive_int("batch_size", batch_size)
    model.eval()
    n = x.shape[0]
    shape = (n,) if model.num_tasks is None else (n, model.num_tasks)
    # Written into preallocated outputs: a list of small per-block results, each allocated
    # between a block's megabyte-sized temporaries, fragments the heap so that the process
    # kept about 2 KB per predicted point (15 GB at 10^7 points).
    mean, variance = x.new_empty(shape), x.new_empty(shape)
    with torch.no_grad():  # GPyTorch's settings as the caller has them: they are process-wide
        for start in range(0, n, batch_size):
            posterior = model(x[start : start + batch_size])
            mean[start : start + batch_size] = posterior.mean
            variance[start : start + batch_size] = posterior.variance.clamp_min(0.0)
    return mean, variance


class _progress:
    """A tqdm bar over an epoch's steps on a terminal, one line per epoch otherwise, nothing unless verbose."""

    def __init__(self, steps: int, description: str, verbose: bool) -> None:
        self.bar = None
        self.description = description
        self.verbose = verbose
        if verbose and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=description, unit="batch", leave=True, file=sys.stderr)

    def __enter__(self) -> _progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def update(self, elbo: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(elbo=f"{elbo:.4g}", refresh=False)
            self.bar.update(1)

    def close(self, elbo: float, seconds: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(elbo=f"{elbo:.4g}")
            self.bar.close()
            self.bar = None
        elif self.verbose:
            print(f"{self.description}: ELBO per point {elbo:.6g}, {seconds:.2f} s", file=sys.stderr, flush=True)
