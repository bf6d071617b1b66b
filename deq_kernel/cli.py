"""``deq-kernel``: Gaussian processes with the DEQ kernel from the command line.

Commands::

    deq-kernel demo [--out DIR]                  DEQ GP against an RBF GP on bundled data, with a plot
    deq-kernel fit DATA.csv --target COL         fit a model by marginal likelihood and save it
    deq-kernel predict MODEL_DIR DATA.csv        predictive means (and std / class probabilities)
    deq-kernel verify [--widths 64,256,1024]     Monte Carlo check against finite-width DEQs
    deq-kernel bench [--quick]                   the kernel benchmark's ratio table

Bad input (a missing file or column, a non-numeric or missing cell, ...) ends the command
with exit status 2 and one line on stderr starting ``error:``; an unexpected failure with
status 1, and its traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import __version__
from .model_io import (
    DELIMITERS,
    MODEL_FILE,
    InputError,
    SavedModel,
    check_no_missing,
    describe_delimiter,
    fitted_hyperparameters,
    load_model,
    missing_rows,
    numeric_columns,
    read_csv,
    sibling,
    sync_directory,
)

__all__ = ["InputError", "main"]

PROG = "deq-kernel"
#: Largest number of distinct integer target values that ``--task auto`` reads as classes.
AUTO_MAX_CLASSES = 10


# --------------------------------------------------------------------------- progress


class Progress:
    """A progress bar (tqdm) on a terminal; otherwise a plain line at each tenth of the way.

    Parameters
    ----------
    total : int
        Expected number of steps.
    description : str
        What is progressing, e.g. ``"fit"``.
    stream : text stream, default ``sys.stderr``
    """

    def __init__(self, total: int, description: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.description = description
        self.count = 0
        self.stream = sys.stderr if stream is None else stream
        self._bar = None
        self._reported = 0
        if _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, steps: int = 1) -> None:
        """Advance by ``steps``."""
        self.count += steps
        if self._bar is not None:
            self._bar.update(steps)
            return
        tenth = max(1, math.ceil(self.total / 10))
        if self.count - self._reported >= tenth or self.count == self.total:
            self._reported = self.count
            print(f"{self.description}: {self.count}/{self.total}", file=self.stream, flush=True)

    def close(self) -> None:
        """Remove the bar (plain lines stay)."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def optimizer_steps(progress: Progress) -> Iterator[None]:
    """Advance ``progress`` by one after every ``torch.optim`` step taken inside the block."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: progress.update())
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------- fit


@dataclass
class TrainingData:
    """Features and target read from a CSV file, ready for an estimator."""

    features: list[str]
    X: np.ndarray
    target: str
    task: str
    y: np.ndarray  # float targets (regression) or class indices (classification)
    classes: list[str] | None
    dropped: int


def load_training_data(
    path: str,
    target: str,
    task: str,
    drop_missing: bool,
    *,
    features: Sequence[str] | None = None,
    drop: Sequence[str] = (),
    delimiter: str | None = None,
    decimal: str = ".",
) -> TrainingData:
    """Read ``path``, check it, and split it into standardisable features and a target.

    ``features`` (default: every column but the target and ``drop``) are the feature columns;
    ``drop`` names columns to leave out (an identifier, say). Only the target and the features
    are checked for missing and non-numeric cells. ``delimiter`` and ``decimal`` are
    :func:`~deq_kernel.model_io.read_csv`'s.

    Raises
    ------
    InputError
        For every problem the user can fix: see :mod:`deq_kernel.model_io`, plus a missing
        target, feature or dropped column, no feature column, fewer than two rows, a constant
        target, or one class.
    """
    table = read_csv(path, delimiter=delimiter, decimal=decimal)
    table.check_columns([target], "target column")
    table.check_columns(drop, "--drop column")
    if features is not None:
        table.check_columns(features, "--features column")
        repeated = sorted({f for f in features if list(features).count(f) > 1})
        if repeated:
            raise InputError(f"--features names {', '.join(map(repr, repeated))} more than once")
        if target in features:
            raise InputError(f"--features names the target column {target!r}; a model cannot use it as a feature")
        clash = [f for f in features if f in drop]
        if clash:
            raise InputError(f"--features and --drop both name {', '.join(map(repr, clash))}")
        features = list(features)
    else:
        if target in drop:
            raise InputError(f"--drop names the target column {target!r}")
        features = [name for name in table.header if name != target and name not in drop]
    if not features:
        raise InputError(f"{path!r} has no feature columns besides the target {target!r} (and --drop)")
    used = [*features, target]
    dropped = 0
    if drop_missing:
        mask = missing_rows(table, used)
        dropped = int(mask.sum())
        table = table.select(~mask)
        if not len(table):
            raise InputError(f"every row of {path!r} has a missing value; nothing is left to fit")
    else:
        check_no_missing(table, used, hint=" (use --drop-missing to drop such rows)")
    X = numeric_columns(table, features)
    if len(table) < 2:
        raise InputError(f"{path!r} has {len(table)} usable data row; fitting needs at least 2")
    for j, name in enumerate(features):
        if len(table) >= ROW_NUMBER_ROWS and _is_row_number(X[:, j]):
            warnings.warn(
                f"feature column {name!r} counts the rows ({_format_value(X[0, j])}, {_format_value(X[1, j])}, ...): "
                f"an identifier? give --drop {name} to leave it out",
                UserWarning,
                stacklevel=2,
            )
    cells = table.numbers(target)  # numbers as the rest of the code reads them
    task = _resolve_task(task, cells)
    if task == "regression":
        y = numeric_columns(table, [target], kind="target")[:, 0]
        if np.all(y == y[0]):
            raise InputError(f"target column {target!r} is constant ({cells[0]}): there is nothing to fit")
        return TrainingData(features, X, target, task, y, None, dropped)
    labels = _class_labels(cells)
    classes, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise InputError(f"target column {target!r} has a single class ({classes[0]}); classification needs 2")
    _warn_if_not_classes(target, cells, classes)
    return TrainingData(features, X, target, task, y.astype(np.int64), classes, dropped)


#: Fewest rows for which a feature counting the rows draws a warning (an identifier column).
ROW_NUMBER_ROWS = 10
#: More distinct classes than this draws a warning under ``--task classification``.
MANY_CLASSES = 30


def _warn_if_not_classes(target: str, cells: Sequence[str], classes: Sequence[str]) -> None:
    """Warn when a classification target looks continuous or has very many classes."""
    try:
        values = np.array([float(c) for c in cells])
    except ValueError:
        values = None
    if values is not None and np.all(np.isfinite(values)) and np.any(values != np.round(values)):
        warnings.warn(
            f"target column {target!r} has non-integer numbers ({len(classes)} distinct values, e.g. "
            f"{', '.join(classes[:3])}): each is a class of its own; --task regression fits it as a number",
            UserWarning,
            stacklevel=3,
        )
    elif len(classes) > MANY_CLASSES:
        warnings.warn(
            f"target column {target!r} has {len(classes)} classes, more than {MANY_CLASSES}: most will have few "
            "rows each; --task regression fits a numeric target as a number",
            UserWarning,
            stacklevel=3,
        )


def _is_row_number(column: np.ndarray) -> bool:
    """Whether a column counts the rows by one (``0, 1, 2, ...`` or ``1, 2, 3, ...``, either way)."""
    steps = np.diff(column)
    return bool(column[0] in (0.0, 1.0, len(column) - 1.0, float(len(column))) and np.all(np.abs(steps) == 1.0))


def _resolve_task(task: str, cells: Sequence[str]) -> str:
    """``auto``: classification for non-numeric targets or a few distinct integers, else regression."""
    if task != "auto":
        return task
    try:
        values = np.array([float(c) for c in cells])
    except ValueError:
        return "classification"
    if not np.all(np.isfinite(values)):
        return "regression"  # reported as a bad target cell
    distinct = np.unique(values)
    integral = np.all(distinct == np.round(distinct))
    return "classification" if integral and len(distinct) <= AUTO_MAX_CLASSES else "regression"


def _class_labels(cells: Sequence[str]) -> list[str]:
    """Labels as text, numbers written canonically (``"1"`` and ``"1.0"`` are one class)."""
    labels = []
    for cell in cells:
        try:
            value = float(cell)
        except ValueError:
            labels.append(cell)
            continue
        labels.append(str(int(value)) if math.isfinite(value) and value == round(value) else repr(value))
    return labels


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X - mean) / scale`` per column, with the mean and scale (1 for a constant column)."""
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return (X - mean) / scale, mean, scale


def make_estimator(task: str, args: argparse.Namespace) -> Any:
    """The estimator that ``fit`` trains, with the command-line settings.

    Hyperparameters are fitted by Adam, ``--steps`` at most, stopping early once the marginal
    likelihood has not improved by ``--tol`` (relative) for ten steps. ``--method`` and its
    options are passed only to estimators that take them.
    """
    from .sklearn import DEQGPClassifier, DEQGPRegressor  # looked up now: the estimators' parameters decide

    cls = DEQGPRegressor if task == "regression" else DEQGPClassifier
    estimator = cls(
        args.activation,
        ard=args.ard,
        optimizer="adam",
        max_iter=args.steps,
        tol=args.tol,
        learning_rate=args.learning_rate,
        random_state=args.seed,
    )
    known = estimator.get_params(deep=False)
    extra = {
        "method": args.method,
        "n_inducing": args.n_inducing,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "kernel": args.kernel,
        "image_shape": args.image_shape,
        "kernel_size": args.kernel_size,
        "readout": args.readout,
    }
    defaults = {"method": "exact", "kernel": "nngp"}  # what an estimator without the parameter does
    for name, value in extra.items():
        if value is None or (name not in known and defaults.get(name) == value):
            continue
        if name not in known:
            option = "--" + name.replace("_", "-")
            raise InputError(
                f"{option} {value} needs an estimator with a {name!r} parameter, which {cls.__name__} "
                f"of deq_kernel {__version__} does not have"
            )
        estimator.set_params(**{name: value})
    if uses_own_progress(estimator):
        estimator.set_params(verbose=True)
    return estimator


def uses_own_progress(estimator: Any) -> bool:
    """Whether the estimator reports its own progress (a sparse variational fit, by epochs)."""
    params = estimator.get_params(deep=False)
    return params.get("method") == "svgp" and "verbose" in params


def fit_estimator(estimator: Any, X: np.ndarray, y: np.ndarray, steps: int, description: str = "fit") -> float:
    """Fit ``estimator`` with a progress bar over optimiser steps; returns the seconds taken."""
    start = time.perf_counter()
    if uses_own_progress(estimator):
        estimator.fit(X, y)
    else:
        with Progress(steps, description) as progress, optimizer_steps(progress):
            estimator.fit(X, y)
    return time.perf_counter() - start


def cross_validate(estimator: Any, X: np.ndarray, y: np.ndarray, task: str, folds: int, seed: int) -> np.ndarray:
    """Held-out scores (R^2 or accuracy) of clones of ``estimator`` refitted on each fold's rest."""
    from sklearn.base import clone
    from sklearn.model_selection import KFold, StratifiedKFold

    if task == "classification":
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(folds, shuffle=True, random_state=seed)
    scores = []
    with Progress(folds, "cross-validation") as progress:
        for train, test in splitter.split(X, y):
            model = clone(estimator).fit(X[train], y[train])
            scores.append(model.score(X[test], y[test]))
            progress.update()
    return np.asarray(scores)


def _cv_folds(requested: int, data: TrainingData) -> tuple[int, str]:
    """The number of folds that the data allow (0: none), and why it is smaller, if it is."""
    if requested == 0:
        return 0, ""
    # R^2 needs at least two held-out rows per fold.
    limit = len(data.y) // 2 if data.task == "regression" else int(np.bincount(data.y).min())
    if limit < 2:
        return 0, "too few rows per class" if data.task == "classification" else "too few rows"
    if limit < requested:
        return limit, f"limited by {'the smallest class' if data.task == 'classification' else 'the rows'}"
    return requested, ""


def _check_model_out(out: str) -> None:
    """Refuse, before any work, an ``--out`` that cannot become a model directory."""
    target = Path(out)
    if target.exists() and not (target.is_dir() and (target / MODEL_FILE).is_file()):
        raise InputError(f"--out {out!r} exists and is not a model directory; choose another --out")
    _check_parent(target, out)


def _check_file_out(out: str | None) -> None:
    """Refuse, before any work, an ``--out`` file that cannot be written."""
    if out is None:
        return
    target = Path(out)
    if target.is_dir():
        raise InputError(f"--out {out!r} is a directory; give a file name")
    _check_parent(target, out)


def _check_dir_out(out: str) -> Path:
    """The ``--out`` directory for a plot, created if need be; refused before any work if it cannot be."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise InputError(f"--out {out!r} is a file, not a directory; give a directory for the plot")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the --out directory {out!r}: {exc.strerror}") from None
    if not os.access(target, os.W_OK):
        raise InputError(f"cannot write to the --out directory {out!r}")
    return target


def _check_parent(target: Path, out: str) -> None:
    parent = target.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot write --out {out!r}: {str(parent)!r} is not a writable directory")


def _check_image_options(args: argparse.Namespace, num_features: int) -> None:
    """``--image-shape`` against the features and the options it cannot go with."""
    if args.image_shape is None:
        for option, value in (("--kernel-size", args.kernel_size), ("--readout", args.readout)):
            if value is not None:
                raise InputError(f"{option} needs --image-shape (the features are the pixels of an image)")
        return
    values = math.prod(args.image_shape)
    shape = ",".join(map(str, args.image_shape))
    if values != num_features:
        raise InputError(
            f"--image-shape {shape} has {values} values per image, but the data has {num_features} features "
            "(the pixels as columns, channel by channel and row by row)"
        )
    if args.ard:
        raise InputError("--ard cannot go with --image-shape: the convolutional kernel has one input variance")


def command_fit(args: argparse.Namespace) -> int:
    """``deq-kernel fit``: read, standardise, fit with progress, report, cross-validate, save."""
    _check_model_out(args.out)
    data = load_training_data(
        args.data,
        args.target,
        args.task,
        args.drop_missing,
        features=args.features,
        drop=args.drop or (),
        delimiter=args.delimiter,
        decimal=args.decimal,
    )
    _check_image_options(args, len(data.features))
    Z, mean, scale = standardise(data.X)
    estimator = make_estimator(data.task, args)
    described = f"{len(data.y)} rows, {len(data.features)} features"
    if data.dropped:
        described += f" ({data.dropped} rows with missing values dropped)"
    if data.task == "classification":
        described += f", {len(data.classes)} classes: {', '.join(data.classes)}"
    if args.image_shape is not None:
        from .convolutional import check_conv_options

        params = estimator.get_params(deep=False)  # the estimator's defaults fill what was not given
        shape, size, readout = check_conv_options(params["image_shape"], params["kernel_size"], params["readout"])
        described += f"; images {'x'.join(map(str, shape))}, {size}x{size} convolutions, {readout} readout"
    print(f"{data.task} of {data.target!r} on {described}")
    seconds = fit_estimator(estimator, Z, data.y, args.steps)
    steps = getattr(estimator, "n_iter_", None)
    variational = estimator.get_params(deep=False).get("method") == "svgp"
    if variational:
        print(f"fitted in {seconds:.1f} s ({steps} minibatch steps)")
        print(f"evidence lower bound: {estimator.log_marginal_likelihood_value_:.4g}")
    else:
        if steps is not None and steps < args.steps:
            print(f"fitted in {seconds:.1f} s: stopped early after {steps} of {args.steps} steps (converged)")
        else:
            print(f"fitted in {seconds:.1f} s ({args.steps} steps)")
        print(f"log marginal likelihood: {estimator.log_marginal_likelihood_value_:.4g}")
    print("fitted hyperparameters:")
    for name, value in fitted_hyperparameters(estimator).items():
        print(f"  {name:<16} {_format_value(value)}")
    folds, why = _cv_folds(args.cv, data)
    if folds:
        scores = cross_validate(estimator, Z, data.y, data.task, folds, args.seed)
        metric = "R^2" if data.task == "regression" else "accuracy"
        note = f" ({why})" if why else ""
        print(f"{folds}-fold cross-validated {metric}: {scores.mean():.4f} +/- {scores.std():.4f}{note}")
    elif args.cv:
        print(f"cross-validation skipped: {why}")
    model = SavedModel(estimator, data.task, data.target, data.features, mean, scale, data.classes, Z, data.y)
    path = model.save(args.out)
    print(f"saved the model to {str(path)!r}")
    return 0


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------- predict


def command_predict(args: argparse.Namespace) -> int:
    """``deq-kernel predict``: a saved model applied to the columns of a CSV file, by name."""
    _check_file_out(args.out)
    model = load_model(args.model)
    table = read_csv(args.data, delimiter=args.delimiter, decimal=args.decimal)
    lacking = [name for name in model.features if name not in table.header]
    if lacking:
        raise InputError(
            f"{args.data!r} lacks the training column(s) {', '.join(repr(n) for n in lacking)} of model {args.model!r}"
        )
    skipped: list[int] = []
    if args.drop_missing:
        mask = missing_rows(table, model.features)
        skipped = [line for line, m in zip(table.lines, mask, strict=True) if m]
        table = table.select(~mask)
        if not len(table):
            raise InputError(f"every row of {args.data!r} has a missing value; nothing is left to predict")
    else:
        check_no_missing(table, model.features, hint=" (use --drop-missing to skip such rows)")
    X = numeric_columns(table, model.features)
    columns = model.predict(X, return_std=args.std or args.latent, latent=args.latent)
    if args.drop_missing:
        columns = {"line": np.asarray(table.lines), **columns}
    write_csv(columns, args.out)
    if skipped:
        shown = ", ".join(map(str, skipped[:20])) + (", ..." if len(skipped) > 20 else "")
        print(
            f"skipped {len(skipped)} row(s) with missing values at line(s) {shown}; the 'line' column names "
            "the file line of each prediction",
            file=sys.stderr,
        )
    if args.out is not None:
        print(f"wrote {len(X)} predictions to {args.out!r}", file=sys.stderr)
    return 0


def write_csv(columns: dict[str, np.ndarray], out: str | None) -> None:
    """Write named columns as CSV to the file ``out`` (atomically) or to stdout.

    Floats are written with :func:`repr`, which reads back to the same float exactly.
    """
    names = list(columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in zip(*(columns[n] for n in names), strict=True):
        writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else str(v) for v in row])
    if out is None:
        sys.stdout.write(buffer.getvalue())
        return
    target = Path(out)
    if target.is_dir():
        raise InputError(f"--out {out!r} is a directory; give a file name")
    staging = None
    try:
        # A staging name of its own (two runs writing the same file do not collide), synced
        # before the rename and the rename synced after it: a crash leaves the old file or the new.
        fds = []
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        staging = sibling(target, ".tmp", lambda path: fds.append(os.open(path, flags, 0o666)))
        with os.fdopen(fds[0], "w", encoding="utf-8") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, target)
        sync_directory(target.resolve().parent)
    except OSError as exc:
        if staging is not None:
            staging.unlink(missing_ok=True)
        raise InputError(f"cannot write {out!r}: {exc.strerror}") from None


# --------------------------------------------------------------------------- demo


@dataclass
class DemoRow:
    """One line of the demo's table."""

    data: str
    model: str
    n_train: int
    n_test: int
    metric: str
    nlpd: float
    seconds: float
    hyperparameters: str
    #: Per held-out point: the squared error (RMSE) or 1 for a correct class (accuracy).
    losses: np.ndarray

    @property
    def score(self) -> float:
        """The held-out RMSE or accuracy, from :attr:`losses`."""
        mean = float(np.mean(self.losses))
        return math.sqrt(mean) if self.metric == "RMSE" else mean

    @property
    def score_se(self) -> float:
        """Standard error of :attr:`score` over the held-out points (delta method for RMSE)."""
        se = float(np.std(self.losses, ddof=1) / np.sqrt(len(self.losses)))
        return se / (2.0 * self.score) if self.metric == "RMSE" else se


def _demo_regression(quick: bool) -> tuple[list[DemoRow], dict[str, Any]]:
    """DEQ GP and RBF GP on scikit-learn's diabetes data; returns table rows and plot data."""
    from sklearn.datasets import load_diabetes
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    from sklearn.model_selection import train_test_split

    from .sklearn import DEQGPRegressor

    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    if quick:
        X_train, y_train = X_train[:80], y_train[:80]
    Z_train, mean, scale = standardise(X_train)
    Z_test = (X_test - mean) / scale

    deq = DEQGPRegressor("relu", max_iter=20 if quick else 100, random_state=0)
    start = time.perf_counter()
    deq.fit(Z_train, y_train)
    deq_seconds = time.perf_counter() - start
    deq_mean, deq_std = deq.predict(Z_test, return_std=True)  # of an observation: the noise included
    base = deq.model_.covar_module.base_kernel
    deq_hypers = (
        f"weight_variance={base.weight_variance.item():.3g} input_variance={base.input_variance.item():.3g} "
        f"bias_variance={base.bias_variance.item():.3g} outputscale={deq.model_.covar_module.outputscale.item():.3g} "
        f"noise={deq.model_.likelihood.noise.item():.3g}"
    )

    kernel = ConstantKernel(1.0) * RBF(1.0) + WhiteKernel(0.1)
    rbf = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0)
    start = time.perf_counter()
    rbf.fit(Z_train, y_train)
    rbf_seconds = time.perf_counter() - start
    rbf_mean, rbf_std = rbf.predict(Z_test, return_std=True)  # the WhiteKernel is part of the kernel
    fitted = rbf.kernel_
    rbf_hypers = (
        f"lengthscale={fitted.k1.k2.length_scale:.3g} outputscale={fitted.k1.k1.constant_value:.3g} "
        f"noise={fitted.k2.noise_level:.3g}"
    )
    rows = [
        DemoRow(
            "diabetes",
            "DEQ GP (relu)",
            len(y_train),
            len(y_test),
            "RMSE",
            _gaussian_nlpd(deq_mean, deq_std, y_test),
            deq_seconds,
            deq_hypers,
            (deq_mean - y_test) ** 2,
        ),
        DemoRow(
            "diabetes",
            "RBF GP",
            len(y_train),
            len(y_test),
            "RMSE",
            _gaussian_nlpd(rbf_mean, rbf_std, y_test),
            rbf_seconds,
            rbf_hypers,
            (rbf_mean - y_test) ** 2,
        ),
    ]
    plot = {"y_test": y_test, "deq": (deq_mean, deq_std), "rbf": (rbf_mean, rbf_std)}
    return rows, plot


def _demo_classification(quick: bool) -> tuple[list[DemoRow], dict[str, Any]]:
    """DEQ GP and RBF GP classifiers on scikit-learn's breast-cancer data."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.gaussian_process import GaussianProcessClassifier
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel
    from sklearn.model_selection import train_test_split

    from .sklearn import DEQGPClassifier

    bunch = load_breast_cancer()
    X, y = bunch.data, bunch.target
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    if quick:
        X_train, y_train = X_train[:80], y_train[:80]
    Z_train, mean, scale = standardise(X_train)
    Z_test = (X_test - mean) / scale

    deq = DEQGPClassifier("relu", max_iter=20 if quick else 100, random_state=0)
    start = time.perf_counter()
    deq.fit(Z_train, y_train)
    deq_seconds = time.perf_counter() - start
    deq_proba = deq.predict_proba(Z_test)
    fitted = deq.kernel_
    scales = np.atleast_1d(fitted_hyperparameters(deq).get("outputscale", []))
    deq_hypers = (
        f"weight_variance={fitted.weight_variance:.3g} input_variance={float(fitted.input_variance):.3g} "
        f"bias_variance={fitted.bias_variance:.3g} outputscale={'/'.join(f'{v:.3g}' for v in scales)}"
    )

    rbf = GaussianProcessClassifier(ConstantKernel(1.0) * RBF(1.0), random_state=0)
    start = time.perf_counter()
    rbf.fit(Z_train, y_train)
    rbf_seconds = time.perf_counter() - start
    rbf_proba = rbf.predict_proba(Z_test)
    rbf_hypers = f"lengthscale={rbf.kernel_.k2.length_scale:.3g} outputscale={rbf.kernel_.k1.constant_value:.3g}"
    rows = [
        DemoRow(
            "breast_cancer",
            "DEQ GP (relu)",
            len(y_train),
            len(y_test),
            "accuracy",
            _categorical_nlpd(deq_proba, y_test),
            deq_seconds,
            deq_hypers,
            (np.argmax(deq_proba, axis=1) == y_test).astype(float),
        ),
        DemoRow(
            "breast_cancer",
            "RBF GP",
            len(y_train),
            len(y_test),
            "accuracy",
            _categorical_nlpd(rbf_proba, y_test),
            rbf_seconds,
            rbf_hypers,
            (np.argmax(rbf_proba, axis=1) == y_test).astype(float),
        ),
    ]
    order = np.concatenate([np.flatnonzero(y_test == c)[:30] for c in (0, 1)])
    covariance = fitted(Z_test[order])
    scale = np.sqrt(np.diag(covariance))
    names = [str(bunch.target_names[c]) for c in (0, 1)]
    plot = {"correlation": covariance / np.outer(scale, scale), "labels": y_test[order], "class_names": names}
    return rows, plot


def _gaussian_nlpd(mean: np.ndarray, std: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log density of ``y`` under independent normals."""
    return float(np.mean(0.5 * np.log(2 * np.pi * std**2) + 0.5 * ((y - mean) / std) ** 2))


def _categorical_nlpd(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log probability of the true class (the log loss)."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-300, None))))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _demo_table(rows: Sequence[DemoRow]) -> str:
    headers = ["data", "model", "train", "test", "held-out", "NLPD", "seconds", "fitted hyperparameters"]
    cells = [
        [
            r.data,
            r.model,
            str(r.n_train),
            str(r.n_test),
            f"{r.metric} {r.score:.4g} +- {r.score_se:.2g}",
            f"{r.nlpd:.4g}",
            f"{r.seconds:.1f}",
            r.hyperparameters,
        ]
        for r in rows
    ]
    return format_table(headers, cells, right={2, 3, 5, 6})


def _paired_difference(rows: Sequence[DemoRow]) -> str:
    """The DEQ model's score minus the RBF model's on the same held-out points, with its paired standard error."""
    deq, rbf = rows
    diff = deq.losses - rbf.losses
    se = float(np.std(diff, ddof=1) / np.sqrt(len(diff)))
    what = "mean squared error" if deq.metric == "RMSE" else "accuracy"
    mean = float(np.mean(diff))
    verdict = "within two standard errors: no difference shown" if abs(mean) <= 2 * se else "a difference"
    paired = f"paired over {len(diff)} points; {verdict}"
    return f"{deq.data}: {what} of DEQ GP minus RBF GP {mean:.4g} +- {se:.2g} ({paired})"


def _pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None (with one line saying so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'deq-kernel[plot]')")
        return None
    return plt


def _demo_plot(regression: dict[str, Any], classification: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    mean, std = regression["deq"]
    order = np.argsort(mean)
    position = np.arange(len(order))
    left.fill_between(position, (mean - 2 * std)[order], (mean + 2 * std)[order], alpha=0.25, label="DEQ GP, 95% band")
    left.plot(position, mean[order], lw=2, label="DEQ GP mean")
    left.plot(position, regression["rbf"][0][order], "--", lw=1.5, label="RBF GP mean")
    left.plot(position, regression["y_test"][order], "k.", ms=4, label="held-out target")
    left.set(
        xlabel="held-out patients, by DEQ GP mean",
        ylabel="disease progression",
        title="diabetes: predictions with uncertainty",
    )
    left.legend(loc="upper left", fontsize=8)
    image = right.imshow(classification["correlation"], cmap="viridis")
    count = int(np.sum(classification["labels"] == classification["labels"][0]))
    total = len(classification["labels"])
    right.axhline(count - 0.5, color="w", lw=1)
    right.axvline(count - 0.5, color="w", lw=1)
    names = classification["class_names"]
    centres = [(count - 1) / 2, (count + total - 1) / 2]
    right.set(
        title="breast cancer: fitted DEQ kernel correlation\nbetween held-out points, 30 of each class",
        xlabel="held-out point, grouped by true class",
        ylabel="held-out point, grouped by true class",
        xticks=centres,
        yticks=centres,
        xticklabels=names,
        yticklabels=names,
    )
    colorbar = fig.colorbar(image, ax=right, shrink=0.85)
    colorbar.set_label("kernel correlation k(x, x') / sqrt(k(x, x) k(x', x'))")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def command_demo(args: argparse.Namespace) -> int:
    """``deq-kernel demo``: DEQ and RBF Gaussian processes on two bundled data sets, a table and a plot."""
    import torch
    from threadpoolctl import threadpool_limits

    out = _check_dir_out(args.out)
    start = time.perf_counter()
    size = " (quick: 80 training rows each)" if args.quick else ""
    print(f"DEQ Gaussian processes against RBF Gaussian processes on scikit-learn's bundled data{size}")
    print("fitting: diabetes (regression) ...", file=sys.stderr, flush=True)
    # Matrices of a few hundred rows gain nothing from more threads, and threads that wait on
    # each other slow down many times over when the cores are shared: one thread is the fast
    # and predictable choice here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):  # NumPy's and SciPy's BLAS, for the RBF baselines
            reg_rows, reg_plot = _demo_regression(args.quick)
            print("fitting: breast_cancer (classification) ...", file=sys.stderr, flush=True)
            clf_rows, clf_plot = _demo_classification(args.quick)
    finally:
        torch.set_num_threads(threads)
    rows = reg_rows + clf_rows
    print(_demo_table(rows))
    for data in dict.fromkeys(r.data for r in rows):
        print(_paired_difference([r for r in rows if r.data == data]))
    print("held-out: RMSE in the target's units (lower is better) or accuracy, +- its standard error over the points")
    print("NLPD: mean negative log predictive density; for classification, the log loss (lower is better)")
    print("hyperparameters: of standardised inputs and, for regression, standardised targets")
    path = out / "deq-kernel-demo.png"
    if _demo_plot(reg_plot, clf_plot, path):
        print(f"plot: {path}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- verify


def command_verify(args: argparse.Namespace) -> int:
    """``deq-kernel verify``: finite-width DEQ kernels against the exact kernel, by width."""
    import torch

    import deq_kernel
    from deq_kernel.finite import network_kernels

    out = _check_dir_out(args.out)

    widths = args.widths
    activation = deq_kernel.get_activation(args.activation)
    if not args.weight_variance < activation.weight_variance_bound:
        raise InputError(
            f"--weight-variance must be below {activation.weight_variance_bound:.6g} for activation "
            f"{args.activation!r}, got {args.weight_variance}"
        )
    x = torch.randn(args.points, args.dim, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    settings = {
        "activation": args.activation,
        "weight_variance": args.weight_variance,
        "bias_variance": args.bias_variance,
    }
    exact = deq_kernel.equilibrium_covariance(x, **settings)
    norm = torch.linalg.matrix_norm(exact)
    print(
        f"{args.activation} DEQ, weight_variance={args.weight_variance}, bias_variance={args.bias_variance}: "
        f"{args.points} points in d={args.dim}, {args.networks} networks per width (seed {args.seed})"
    )
    rows, errors = [], []
    with Progress(len(widths), "verify") as progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", deq_kernel.finite.DroppedNetworksWarning)
        for width in widths:
            kernels = network_kernels(
                x, width=width, n_networks=args.networks, seed=args.seed, nonconverged="drop", **settings
            )
            each = (torch.linalg.matrix_norm(kernels - exact) / norm).numpy()
            mean_error = float(np.mean(each))
            average = float(torch.linalg.matrix_norm(kernels.mean(0) - exact) / norm)
            errors.append(mean_error)
            rows.append(
                [
                    str(width),
                    str(len(each)),
                    f"{mean_error:.4f}",
                    f"{np.std(each):.4f}",
                    f"{mean_error * math.sqrt(width):.3f}",
                    f"{average:.4f}",
                ]
            )
            progress.update()
    headers = ["width", "networks", "rel. error", "sd", "rel. error*sqrt(width)", "rel. error of mean kernel"]
    print(format_table(headers, rows, right=set(range(6))))
    print("rel. error: relative Frobenius distance of one network's kernel h.h'/width to the exact kernel, averaged")
    if len(widths) >= 2:
        slope = float(np.polyfit(np.log(widths), np.log(errors), 1)[0])
        print(f"log-log slope of the error against width: {slope:.3f} (theory: -0.5)")
    plt = _pyplot()
    if plt is not None:
        path = out / "deq-kernel-verify.png"
        fig, ax = plt.subplots(figsize=(5, 4), constrained_layout=True)
        ax.loglog(widths, errors, "o-", label="finite DEQ networks")
        ref = errors[0] * np.sqrt(widths[0] / np.asarray(widths, dtype=float))
        ax.loglog(widths, ref, "k--", lw=1, label="width$^{-1/2}$")
        ax.set(
            xlabel="width", ylabel="relative error of the network kernel", title=f"{args.activation} DEQ: NNGP check"
        )
        ax.legend()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"plot: {path}")
    return 0


# --------------------------------------------------------------------------- bench


def find_benchmark() -> Path:
    """``benchmarks/bench_kernel.py`` of the source tree, or the script ``$DEQ_KERNEL_BENCHMARK`` names."""
    override = os.environ.get("DEQ_KERNEL_BENCHMARK")
    if override:
        if not Path(override).is_file():
            raise InputError(f"DEQ_KERNEL_BENCHMARK names {override!r}, which is not a file")
        return Path(override)
    for path in (
        Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernel.py",
        Path.cwd() / "benchmarks" / "bench_kernel.py",
    ):
        if path.is_file():
            return path
    raise InputError(
        "the kernel benchmark (benchmarks/bench_kernel.py) ships with the source tree, not the installed "
        "package: run deq-kernel bench from a checkout, or set DEQ_KERNEL_BENCHMARK to the script"
    )


def command_bench(args: argparse.Namespace) -> int:
    """``deq-kernel bench``: run the kernel benchmark script, which prints its ratio table."""
    script = find_benchmark()
    command = [sys.executable, str(script)]
    if args.quick:
        command.append("--quick")
    if args.activations:
        command += ["--activations", args.activations]
    sys.stdout.flush()
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the benchmark {script} failed with exit status {result.returncode}")
    return 0


# --------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line (exit status 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _checked_int(text: str, ok: Callable[[int], bool], expected: str) -> int:
    """``text`` as an integer for which ``ok`` holds, else the usage error ``expected ..., got ...``."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _checked_int(text, lambda v: v >= 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _checked_int(text, lambda v: v >= 0, "a non-negative integer")


def _folds(text: str) -> int:
    return _checked_int(text, lambda v: v == 0 or v >= 2, "0 (no cross-validation) or a number of folds >= 2")


def _image_shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W or C,H,W of positive integers, e.g. 8,8, got {text!r}")
    return shape


def _odd_int(text: str) -> int:
    return _checked_int(text, lambda v: v >= 1 and v % 2 == 1, "a positive odd integer")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _column_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names such as age,bmi, got {text!r}")
    return names


def _delimiter(text: str) -> str:
    named = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}
    value = named.get(text.lower(), text)
    if len(value) != 1 or value in '"\r\n':
        raise argparse.ArgumentTypeError(
            f"expected one character (or tab, comma, semicolon, pipe, space), got {text!r}"
        )
    return value


def _add_table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--delimiter",
        type=_delimiter,
        metavar="SEP",
        help="field separator: one character, or tab, comma, semicolon, pipe, space "
        f"(default: detected among {', '.join(describe_delimiter(d) for d in DELIMITERS)})",
    )
    parser.add_argument("--decimal", choices=(".", ","), default=".", help="decimal mark of the numbers (default: '.')")


def _widths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 64,256,1024, got {text!r}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``deq-kernel`` and its commands."""
    from .activations import ACTIVATIONS

    names = sorted(name for name in ACTIVATIONS if isinstance(name, str))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an unexpected failure"
    )

    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1], parents=[common])
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="DEQ GP against RBF GP on bundled data, with a plot",
        description="Fit DEQ and RBF Gaussian processes to scikit-learn's bundled diabetes "
        "(regression) and breast-cancer (classification) data; print held-out RMSE or "
        "accuracy, NLPD, fitted hyperparameters and times; write a plot.",
    )
    demo.add_argument("--out", default=".", metavar="DIR", help="where to write deq-kernel-demo.png (default: .)")
    demo.add_argument("--quick", action="store_true", help="80 training rows per data set, fewer steps")
    demo.set_defaults(handler=command_demo)

    fit = commands.add_parser(
        "fit",
        parents=[common],
        help="fit a DEQ GP to a CSV file and save it",
        description="Standardise the features of a CSV file, fit a DEQ Gaussian process's "
        "hyperparameters by marginal likelihood (Adam, stopping early once it stops "
        "improving), print them and a cross-validated score, and save the model.",
    )
    fit.add_argument("data", metavar="DATA.csv", help="CSV file with a header row")
    fit.add_argument("--target", required=True, metavar="COL", help="name of the column to predict")
    fit.add_argument(
        "--task",
        choices=("auto", "regression", "classification"),
        default="auto",
        help=f"auto: classification for text labels or at most {AUTO_MAX_CLASSES} distinct integers",
    )
    fit.add_argument(
        "--activation",
        choices=names,
        default="relu",
        metavar="NAME",
        help=f"activation of the DEQ: {', '.join(names)} (default: relu)",
    )
    fit.add_argument("--ard", action="store_true", help="one input variance per feature")
    fit.add_argument(
        "--steps", type=_positive_int, default=200, metavar="N", help="most optimiser steps (default: 200)"
    )
    fit.add_argument(
        "--tol",
        type=_non_negative_float,
        default=1e-4,
        help="stop when the marginal likelihood improves by less than this (relative) for 10 steps (default: 1e-4)",
    )
    fit.add_argument(
        "--learning-rate", type=_positive_float, help="optimiser step size (default: the estimator's, 0.1 for Adam)"
    )
    fit.add_argument(
        "--method",
        choices=("exact", "svgp"),
        default="exact",
        help="exact GP, or a sparse variational GP where the estimators support it",
    )
    fit.add_argument("--n-inducing", type=_positive_int, metavar="M", help="inducing points (svgp)")
    fit.add_argument("--batch-size", type=_positive_int, metavar="B", help="minibatch size (svgp)")
    fit.add_argument("--epochs", type=_positive_int, metavar="E", help="passes over the data (svgp)")
    fit.add_argument(
        "--kernel",
        choices=("nngp", "ntk"),
        default="nngp",
        help="the DEQ's Gaussian-process kernel or, where the estimators support it, its neural tangent kernel",
    )
    fit.add_argument(
        "--image-shape",
        type=_image_shape,
        metavar="SHAPE",
        help="the features are the pixels of images of this shape, H,W or C,H,W: the convolutional DEQ kernel",
    )
    fit.add_argument(
        "--kernel-size", type=_odd_int, metavar="K", help="with --image-shape: the convolutions' size (default: 3)"
    )
    fit.add_argument(
        "--readout",
        choices=("flatten", "gap"),
        help="with --image-shape: read out every pixel, or pool globally first (default: flatten)",
    )
    fit.add_argument(
        "--cv",
        type=_folds,
        default=5,
        metavar="K",
        help="folds of the cross-validated score, each refitted; 0 skips it (default: 5)",
    )
    fit.add_argument(
        "--features",
        type=_column_names,
        metavar="COLS",
        help="comma-separated feature columns (default: every column but the target and --drop)",
    )
    fit.add_argument(
        "--drop", type=_column_names, metavar="COLS", help="comma-separated columns to leave out, e.g. an identifier"
    )
    _add_table_options(fit)
    fit.add_argument(
        "--drop-missing", action="store_true", help="drop rows with empty or NaN cells in the target or a feature"
    )
    fit.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    fit.add_argument("--out", default="deq-model", metavar="MODEL_DIR", help="model directory (default: deq-model)")
    fit.set_defaults(handler=command_fit)

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="predict with a saved model",
        description="Predict the target of each row of a CSV file with a saved model. "
        "The training feature columns are found by name; other columns are ignored.",
    )
    predict.add_argument("model", metavar="MODEL_DIR", help="directory written by deq-kernel fit")
    predict.add_argument("data", metavar="DATA.csv", help="CSV file with the training feature columns")
    predict.add_argument(
        "--std",
        action="store_true",
        help="also write the predictive standard deviation of an observation, noise included (regression: "
        "column 'std'), or the class probabilities (classification)",
    )
    predict.add_argument(
        "--latent",
        action="store_true",
        help="regression: write the latent function's standard deviation, without the noise (column 'latent_std')",
    )
    _add_table_options(predict)
    predict.add_argument(
        "--drop-missing",
        action="store_true",
        help="skip rows with empty or NaN cells in a feature, name them on stderr, and add a 'line' column "
        "(the file line of each prediction)",
    )
    predict.add_argument("--out", metavar="PRED.csv", help="output file (default: standard output)")
    predict.set_defaults(handler=command_predict)

    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="Monte Carlo check against finite-width DEQs",
        description="Compare the kernels of randomly drawn finite-width DEQs with the "
        "exact infinite-width kernel, print the error table and write a log-log plot.",
    )
    verify.add_argument("--activation", choices=names, default="relu", metavar="NAME", help="(default: relu)")
    verify.add_argument("--widths", type=_widths, default=[64, 256, 1024], help="(default: 64,256,1024)")
    verify.add_argument(
        "--networks", type=_positive_int, default=50, metavar="N", help="networks per width (default: 50)"
    )
    verify.add_argument("--points", type=_positive_int, default=8, metavar="N", help="input points (default: 8)")
    verify.add_argument("--dim", type=_positive_int, default=10, metavar="D", help="input dimension (default: 10)")
    verify.add_argument("--weight-variance", type=_positive_float, default=0.36, help="(default: 0.36)")
    verify.add_argument("--bias-variance", type=_non_negative_float, default=0.1, help="(default: 0.1)")
    verify.add_argument("--seed", type=int, default=0, help="(default: 0)")
    verify.add_argument("--out", default=".", metavar="DIR", help="where to write deq-kernel-verify.png (default: .)")
    verify.set_defaults(handler=command_verify)

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="the kernel benchmark's ratio table",
        description="Run benchmarks/bench_kernel.py: the DEQ kernel's time against "
        "GPyTorch's RBF kernel and the 100-step Picard iteration.",
    )
    bench.add_argument("--quick", action="store_true", help="n = 512, one repeat")
    bench.add_argument("--activations", metavar="NAMES", help="comma-separated (default: relu,tanh)")
    bench.set_defaults(handler=command_bench)
    return parser


def _version_text() -> str:
    return f"{PROG} {__version__}"


# --------------------------------------------------------------------------- main


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deq-kernel`` with ``argv`` (default: the process's arguments); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    handler: Callable[[argparse.Namespace], int] = args.handler
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {type(exc).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
