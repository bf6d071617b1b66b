"""Kernel selection by exact marginal likelihood: fit candidate kernels, rank them.

:func:`rank_kernels` fits one exact GP per candidate covariance (by default DEQ kernels with
several activations, and RBF and Matern-5/2 baselines), each by type-II maximum likelihood
(:func:`deq_kernel.gpytorch.fit_exact_gp`), and returns a :class:`KernelRanking`: one row per
candidate, best log marginal likelihood first, with the fitted hyperparameters and, when test
data are given, the held-out error.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from gpytorch.kernels import Kernel, MaternKernel, RBFKernel, ScaleKernel
from gpytorch.likelihoods import GaussianLikelihood
from torch import Tensor

from .gpytorch import DEQKernel, ExactGPModel, ExactPosterior, fit_exact_gp

__all__ = ["KernelRanking", "KernelScore", "default_candidates", "rank_kernels"]


@dataclass
class KernelScore:
    """One fitted candidate.

    Attributes
    ----------
    rank : int
        1 for the highest log marginal likelihood.
    name : str
        The candidate's name.
    log_marginal_likelihood : float
        Of the (standardised) training targets at the fitted hyperparameters, in nats.
    n_parameters : int
        Number of fitted scalar hyperparameters (kernel, output scale, noise and mean).
    hyperparameters : dict
        Fitted values, by name (``"outputscale"``, ``"noise"``, ``"weight_variance"``, ...).
    test_rmse, test_nlpd : float or None
        Held-out root-mean-square error of the predictive mean and mean negative log
        predictive density (with the noise), in the units of the targets; None without
        test data.
    n_iter : int
        Optimiser iterations.
    fit_seconds : float
        Wall-clock time of the fit.
    model : ExactGPModel
        The fitted model (on standardised targets); not shown in the table.
    """

    rank: int
    name: str
    log_marginal_likelihood: float
    n_parameters: int
    hyperparameters: dict[str, float | list[float]]
    test_rmse: float | None
    test_nlpd: float | None
    n_iter: int
    fit_seconds: float
    model: ExactGPModel = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The row without the model."""
        return {
            "rank": self.rank,
            "name": self.name,
            "log_marginal_likelihood": self.log_marginal_likelihood,
            "n_parameters": self.n_parameters,
            "test_rmse": self.test_rmse,
            "test_nlpd": self.test_nlpd,
            "n_iter": self.n_iter,
            "fit_seconds": self.fit_seconds,
            "hyperparameters": self.hyperparameters,
        }


class KernelRanking(list):
    """Rows of :class:`KernelScore`, best first; prints as a table."""

    @property
    def best(self) -> KernelScore:
        """The row of highest log marginal likelihood."""
        if not self:
            raise ValueError("the ranking is empty")
        return self[0]

    def to_pandas(self) -> Any:
        """The table as a :class:`pandas.DataFrame` (requires pandas), one row per candidate."""
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("KernelRanking.to_pandas requires pandas: pip install pandas") from None
        return pd.DataFrame([row.as_dict() for row in self]).set_index("rank")

    def __str__(self) -> str:
        headers = [
            "rank",
            "kernel",
            "log ML",
            "params",
            "test RMSE",
            "test NLPD",
            "iters",
            "seconds",
            "hyperparameters",
        ]
        rows = [
            [
                str(r.rank),
                r.name,
                f"{r.log_marginal_likelihood:.2f}",
                str(r.n_parameters),
                "-" if r.test_rmse is None else f"{r.test_rmse:.4g}",
                "-" if r.test_nlpd is None else f"{r.test_nlpd:.4g}",
                str(r.n_iter),
                f"{r.fit_seconds:.1f}",
                _format_hypers(r.hyperparameters),
            ]
            for r in self
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
        right = {0, 2, 3, 4, 5, 6, 7}

        def line(cells: list[str]) -> str:
            parts = [
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(parts).rstrip()

        return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def default_candidates(num_dims: int | None = None) -> dict[str, Callable[[], Kernel]]:
    """DEQ kernels (relu, erf, sin) and RBF and Matern-5/2 baselines.

    Parameters
    ----------
    num_dims : int, optional
        Input dimension for ARD (one input variance or length scale per dimension);
        None shares one across dimensions.

    Returns
    -------
    dict
        Name to a function returning a fresh (unscaled) covariance module. The DEQ
        activations are those with closed-form duals, whose fits are fast.
    """
    return {
        "DEQ(relu)": lambda: DEQKernel("relu", ard_num_dims=num_dims),
        "DEQ(erf)": lambda: DEQKernel("erf", ard_num_dims=num_dims),
        "DEQ(sin)": lambda: DEQKernel("sin", ard_num_dims=num_dims),
        "RBF": lambda: RBFKernel(ard_num_dims=num_dims),
        "Matern-5/2": lambda: MaternKernel(nu=2.5, ard_num_dims=num_dims),
    }


def rank_kernels(
    train_x: Tensor,
    train_y: Tensor,
    candidates: Mapping[str, Kernel | Callable[[], Kernel]] | None = None,
    *,
    test_x: Tensor | None = None,
    test_y: Tensor | None = None,
    optimizer: str = "lbfgs",
    max_iter: int = 100,
    normalize_y: bool = True,
) -> KernelRanking:
    """Fit an exact GP per candidate kernel by marginal likelihood and rank them.

    Each model has a constant mean, ``ScaleKernel(candidate)`` (a candidate that is already a
    ``ScaleKernel`` is used as it is) and Gaussian noise, all fitted by maximising the
    exact marginal likelihood. Candidates are copied, never modified.

    Parameters
    ----------
    train_x : Tensor, shape ``(n, d)``
    train_y : Tensor, shape ``(n,)``
    candidates : mapping of str to Kernel or callable returning one, optional
        Default: :func:`default_candidates` (without ARD).
    test_x, test_y : Tensor, optional
        Held-out data: adds the test RMSE and NLPD columns.
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
    max_iter : int, default 100
    normalize_y : bool, default True
        Standardise the targets before fitting (log marginal likelihoods are then those of
        the standardised targets, comparable between candidates; test errors are in the
        original units).

    Returns
    -------
    KernelRanking
        Best log marginal likelihood first.

    Examples
    --------
    >>> import torch
    >>> from deq_kernel.model_selection import rank_kernels
    >>> x = torch.linspace(-2, 2, 40, dtype=torch.float64).unsqueeze(-1)
    >>> y = torch.relu(x).squeeze(-1) + 0.05 * torch.randn(40, dtype=torch.float64)
    >>> table = rank_kernels(x, y, max_iter=30)
    >>> print(table)  # doctest: +SKIP
    >>> table.best.name in {"DEQ(relu)", "DEQ(erf)", "DEQ(sin)", "RBF", "Matern-5/2"}
    True
    """
    train_x, train_y = _as_float64(train_x, "train_x"), _as_float64(train_y, "train_y")
    if train_x.dim() != 2 or train_y.dim() != 1 or train_x.shape[0] != train_y.shape[0]:
        raise ValueError(
            f"train_x must be (n, d) and train_y (n,) with the same n, got {tuple(train_x.shape)} "
            f"and {tuple(train_y.shape)}"
        )
    if (test_x is None) != (test_y is None):
        raise ValueError("test_x and test_y must be given together")
    if test_x is not None:
        test_x, test_y = _as_float64(test_x, "test_x"), _as_float64(test_y, "test_y")
        if test_x.dim() != 2 or test_x.shape[-1] != train_x.shape[-1] or test_y.shape != test_x.shape[:1]:
            raise ValueError(
                f"test_x must be (m, {train_x.shape[-1]}) and test_y (m,), got {tuple(test_x.shape)} "
                f"and {tuple(test_y.shape)}"
            )
    if candidates is None:
        candidates = default_candidates()
    if not candidates:
        raise ValueError("candidates must hold at least one kernel")

    mean, scale = (float(train_y.mean()), float(train_y.std())) if normalize_y else (0.0, 1.0)
    if not scale > 0:
        scale = 1.0
    targets = (train_y - mean) / scale
    rows = []
    for name, candidate in candidates.items():
        kernel = candidate() if callable(candidate) and not isinstance(candidate, Kernel) else copy.deepcopy(candidate)
        if not isinstance(kernel, Kernel):
            raise TypeError(f"candidate {name!r} is not a gpytorch Kernel (or a function returning one)")
        covar = kernel if isinstance(kernel, ScaleKernel) else ScaleKernel(kernel)
        model = ExactGPModel(train_x, targets, GaussianLikelihood(), covar_module=covar).to(train_x)
        start = time.perf_counter()
        result = fit_exact_gp(model, optimizer=optimizer, max_iter=max_iter)
        seconds = time.perf_counter() - start
        rmse = nlpd = None
        if test_x is not None:
            rmse, nlpd = _held_out(model, test_x, test_y, mean, scale)
        hypers = _hyperparameters(model)
        rows.append(
            KernelScore(
                rank=0,
                name=str(name),
                log_marginal_likelihood=result.log_marginal_likelihood,
                n_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                hyperparameters=hypers,
                test_rmse=rmse,
                test_nlpd=nlpd,
                n_iter=result.n_iter,
                fit_seconds=seconds,
                model=model,
            )
        )
    rows.sort(key=lambda r: -r.log_marginal_likelihood if math.isfinite(r.log_marginal_likelihood) else math.inf)
    for rank, row in enumerate(rows, start=1):
        row.rank = rank
    return KernelRanking(rows)


def _as_float64(t: Any, name: str) -> Tensor:
    try:
        out = torch.as_tensor(t, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor or a numeric array-like") from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _held_out(model: ExactGPModel, x: Tensor, y: Tensor, mean: float, scale: float) -> tuple[float, float]:
    # Exact, and without GPyTorch's process-wide settings: see ExactPosterior.
    noise = model.likelihood.noise.detach().reshape(())
    mu, var = ExactPosterior(model).predict(x, noise=noise)
    mu, var = mu * scale + mean, var * scale**2
    rmse = float(((mu - y) ** 2).mean().sqrt())
    nlpd = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mu) ** 2 / var).mean())
    return rmse, nlpd


def _hyperparameters(model: ExactGPModel) -> dict[str, float | list[float]]:
    """Constrained values of every fitted parameter, with short names."""
    out: dict[str, float | list[float]] = {}
    for full_name, raw, constraint in model.named_parameters_and_constraints():
        if not raw.requires_grad:
            continue
        value = (constraint.transform(raw) if constraint is not None else raw).detach().reshape(-1)
        name = _short_name(full_name)
        out[name] = float(value[0]) if value.numel() == 1 else [float(v) for v in value]
    return out


def _short_name(name: str) -> str:
    for prefix in ("covar_module.base_kernel.", "covar_module.", "likelihood.noise_covar.", "mean_module."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace("raw_", "")


def _format_hypers(hypers: dict[str, float | list[float]]) -> str:
    def fmt(v: float | Iterable[float]) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        return f"{v:.3g}"

    return ", ".join(f"{k}={fmt(v)}" for k, v in hypers.items())
