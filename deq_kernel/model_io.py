"""CSV tables in, fitted models out: what the ``deq-kernel`` command line reads and writes.

* :func:`read_csv` and :func:`numeric_columns` turn a CSV file with a header row into a
  float64 matrix, naming the column and line of the first bad cell.
* :class:`SavedModel` is a fitted :class:`~deq_kernel.sklearn.DEQGPRegressor` or
  :class:`~deq_kernel.sklearn.DEQGPClassifier` with its feature names, feature scaler and
  class labels. :meth:`SavedModel.save` writes a directory holding ``model.json`` (format
  version, feature names, scaler, kernel settings, task, classes, library version) and
  ``tensors.pt`` (training data and the GPyTorch model's state, written with
  :func:`torch.save`, read with ``weights_only=True``: no pickled code). The directory is
  written under a temporary name next to the target and renamed into place, so a crash never
  leaves a half-written model. :func:`load_model` re-creates the estimator with the library's
  own classes and reproduces the saved model's predictions bit for bit.

Every problem with the user's input raises :class:`InputError`, whose message is one line.
"""

from __future__ import annotations

import copy
import csv
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .activations import ACTIVATIONS, Activation, activation_spec, get_activation
from .sklearn import DEQGPClassifier, DEQGPRegressor

__all__ = [
    "DELIMITERS",
    "FORMAT_VERSION",
    "InputError",
    "SavedModel",
    "Table",
    "load_model",
    "numeric_columns",
    "read_csv",
]

#: Version of the model directory layout; a reader refuses anything newer.
FORMAT_VERSION = 2
#: Names of the two files of a model directory.
MODEL_FILE = "model.json"
TENSORS_FILE = "tensors.pt"
_FORMAT_NAME = "deq-kernel model"
_ESTIMATORS = {cls.__name__: cls for cls in (DEQGPRegressor, DEQGPClassifier)}
#: Cells read as missing values (besides those that parse as NaN).
_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})
#: A number written with a decimal comma (``-1,5``, ``2,0e3``).
_DECIMAL_COMMA = re.compile(r"[+-]?\d*,\d+([eE][+-]?\d+)?")

Estimator = DEQGPRegressor | DEQGPClassifier


class InputError(ValueError):
    """A problem with the user's data, options or files, described in one line."""


# --------------------------------------------------------------------------- CSV tables


#: Field separators that :func:`read_csv` tries when none is given, in order of preference.
DELIMITERS = (",", ";", "\t", "|")
#: Rows read to detect the separator.
_SNIFF_ROWS = 50


#: Rows parsed before their cells are packed into the columns' arrays.
_CHUNK_ROWS = 1 << 13


@dataclass
class Table:
    """A CSV file's header and data cells (as text), column by column.

    Each column is a numpy array of its cells' UTF-8 bytes (stripped), a few bytes per cell
    where Python strings cost some sixty: a large file is held once, compactly.

    Attributes
    ----------
    path : str
        The file, as the user named it.
    header : list of str
        Column names.
    cells : list of ndarray
        One array per column (dtype ``S``), each as long as the table.
    lines : ndarray of int
        The file line of each data row (the header is line 1), for messages.
    delimiter : str
        The field separator the file was read with.
    decimal : str
        The decimal mark of its numbers (``"."`` or ``","``).
    """

    path: str
    header: list[str]
    cells: list[np.ndarray]
    lines: np.ndarray
    delimiter: str = ","
    decimal: str = "."

    def __len__(self) -> int:
        """The number of data rows."""
        return len(self.lines)

    def column(self, name: str) -> list[str]:
        """The cells of column ``name``."""
        return [cell.decode("utf-8") for cell in self.cells[self.header.index(name)]]

    def numbers(self, name: str) -> list[str]:
        """The cells of column ``name`` as ``float`` reads numbers: a decimal comma becomes a point."""
        cells = self.column(name)
        return [cell.replace(",", ".") for cell in cells] if self.decimal == "," else cells

    def floats(self, name: str) -> np.ndarray | None:
        """Column ``name`` as float64 in one vectorised conversion, or ``None`` if a cell does not convert."""
        raw = self.cells[self.header.index(name)]
        if self.decimal == ",":
            raw = np.char.replace(raw, b",", b".")
        try:
            return raw.astype(np.float64)
        except ValueError:
            return None

    def select(self, keep: np.ndarray) -> Table:
        """The table restricted to the rows where ``keep`` is true."""
        keep = np.asarray(keep, dtype=bool)
        return Table(
            self.path, self.header, [c[keep] for c in self.cells], self.lines[keep], self.delimiter, self.decimal
        )

    def check_columns(self, names: Sequence[str], what: str, hint: str = "") -> None:
        """Raise :class:`InputError` for the first of ``names`` that is not a column, with the closest one."""
        for name in names:
            if name not in self.header:
                close = difflib.get_close_matches(name, self.header, n=1)
                suggestion = f"did you mean {close[0]!r}? " if close else ""
                separator = ""
                if len(self.header) == 1:
                    separator = (
                        f"; the header has one column when split at {describe_delimiter(self.delimiter)}: "
                        "give --delimiter if the file uses another separator"
                    )
                raise InputError(
                    f"{what} {name!r} is not in {self.path!r} ({suggestion}columns: {', '.join(self.header)}"
                    f"{separator}){hint}"
                )


def describe_delimiter(delimiter: str) -> str:
    """A separator as a message names it (a tab is invisible)."""
    return "tabs" if delimiter == "\t" else repr(delimiter)


def _detect_delimiter(lines: Sequence[str]) -> str:
    """The separator of :data:`DELIMITERS` that splits the first rows into the most, equally many, fields.

    A separator that gives rows of different lengths is passed over (a decimal comma inside
    semicolon-separated fields makes ``,`` such a separator); if none splits the header at
    all, or none is consistent, ``,`` is used and the reader reports what it finds.
    """
    sample = [line for line in lines[: 4 * _SNIFF_ROWS] if line.strip()][:_SNIFF_ROWS]
    best, best_fields = ",", 1
    for delimiter in DELIMITERS:
        try:
            counts = {len(row) for row in csv.reader(sample, delimiter=delimiter)}
        except csv.Error:
            continue
        if len(counts) == 1 and (fields := counts.pop()) > best_fields:
            best, best_fields = delimiter, fields
    return best


def read_csv(path: str | os.PathLike, *, delimiter: str | None = None, decimal: str = ".") -> Table:
    """Read a delimited text file whose first line names the columns.

    Parameters
    ----------
    path : str or path
        The file (UTF-8, with or without a byte-order mark; any line ending).
    delimiter : str, optional
        The field separator. Default: detected from the first rows among ``,``, ``;``, tab
        and ``|`` (the one that splits them into the most, equally many, fields).
    decimal : {".", ","}
        The decimal mark of the numbers (``","`` for files written with a decimal comma;
        then the separator cannot be ``,``).

    Raises
    ------
    InputError
        The file is missing, unreadable, empty, has no data rows, repeated or empty column
        names, or a row whose number of fields differs from the header's.
    """
    name = str(path)
    if decimal not in (".", ","):
        raise InputError(f"the decimal mark must be '.' or ',', got {decimal!r}")
    if delimiter is not None and (len(delimiter) != 1 or delimiter in '"\r\n'):
        raise InputError(f"the delimiter must be one character other than a quote or a line break, got {delimiter!r}")
    file = Path(path)
    if not file.exists():
        raise InputError(f"data file {name!r} does not exist")
    if file.is_dir():
        raise InputError(f"{name!r} is a directory, not a CSV file")
    try:
        with file.open(encoding="utf-8-sig", newline="") as handle:
            return _read_records(handle, name, delimiter, decimal)
    except UnicodeDecodeError:
        raise InputError(f"{name!r} is not a text (UTF-8 CSV) file") from None
    except OSError as exc:
        raise InputError(f"cannot read {name!r}: {exc.strerror}") from None


def _read_records(handle: Any, name: str, delimiter: str | None, decimal: str) -> Table:
    """The rows of an open file, streamed: the file is never held as text, nor its rows twice."""
    head = list(itertools.islice(handle, 4 * _SNIFF_ROWS))
    given = delimiter is not None
    if delimiter is None:
        delimiter = _detect_delimiter([line.rstrip("\r\n") for line in head])
        if decimal == "," and delimiter == ",":
            delimiter = ";"  # with decimal commas, the usual separator
    if delimiter == decimal:
        raise InputError(f"the delimiter and the decimal mark of {name!r} cannot both be {delimiter!r}")
    reader = csv.reader(itertools.chain(head, handle), delimiter=delimiter)
    header: list[str] | None = None
    chunks: list[list[np.ndarray]] = []
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                _check_header(header, name)
                continue
            if len(row) != len(header):
                how = "given" if given else "detected"
                raise InputError(
                    f"{name!r}: line {reader.line_num} has {len(row)} fields, the header has {len(header)} (fields "
                    f"split at {describe_delimiter(delimiter)}, {how}; give --delimiter for another separator, or "
                    "quote fields that contain it)"
                )
            rows.append(row)
            lines.append(reader.line_num)
            if len(rows) == _CHUNK_ROWS:
                chunks.append(_pack(rows))
                rows = []
    except csv.Error as exc:
        raise InputError(f"{name!r} is not valid CSV (line {reader.line_num}: {exc})") from None
    if header is None:
        raise InputError(f"data file {name!r} is empty")
    if not lines:
        raise InputError(f"data file {name!r} has a header but no data rows")
    if rows:
        chunks.append(_pack(rows))
    cells = []
    for j in range(len(header)):  # one column at a time: the chunks and one column's copy at once
        cells.append(np.concatenate([chunk[j] for chunk in chunks]))
        for chunk in chunks:
            chunk[j] = None  # type: ignore[call-overload]
    return Table(name, header, cells, np.asarray(lines, dtype=np.int64), delimiter, decimal)


def _pack(rows: list[list[str]]) -> list[np.ndarray]:
    """The stripped cells of some rows, column by column, as arrays of UTF-8 bytes."""
    return [_as_bytes([cell.strip() for cell in column]) for column in zip(*rows, strict=True)]


def _as_bytes(cells: list[str]) -> np.ndarray:
    try:
        return np.array(cells, dtype="S")  # ASCII: numpy encodes it at once
    except UnicodeEncodeError:
        return np.array([cell.encode("utf-8") for cell in cells], dtype="S")


def _check_header(header: list[str], name: str) -> None:
    if any(not h for h in header):
        raise InputError(f"{name!r}: column {header.index('') + 1} of the header has no name")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise InputError(f"{name!r}: repeated column name(s) {_names(repeated)} in the header")


def is_missing(cell: str) -> bool:
    """Whether a cell is empty or names a missing value (``NaN``, ``NA``, ...)."""
    return cell.strip().lower() in _MISSING


def missing_rows(table: Table, columns: Sequence[str]) -> np.ndarray:
    """A boolean mask of the rows with a missing value in any of ``columns``."""
    mask = np.zeros(len(table), dtype=bool)
    for name in columns:
        mask |= np.array([is_missing(c) for c in table.column(name)], dtype=bool)
    return mask


def check_no_missing(table: Table, columns: Sequence[str], hint: str = "") -> None:
    """Raise :class:`InputError` naming the first missing cell of ``columns`` (in file order)."""
    first = None
    for name in columns:
        for cell, line in zip(table.column(name), table.lines, strict=True):
            if is_missing(cell):
                if first is None or line < first[1]:
                    first = (name, line)
                break
    if first is not None:
        raise InputError(
            f"{table.path!r}: column {first[0]!r} has a missing value (empty or NaN) at line {first[1]}{hint}"
        )


def numeric_columns(table: Table, columns: Sequence[str], kind: str = "feature") -> np.ndarray:
    """The cells of ``columns`` as a float64 matrix of shape ``(n_rows, len(columns))``.

    Raises
    ------
    InputError
        For a cell that is not a finite number, naming its column and line.
    """
    out = np.empty((len(table), len(columns)), dtype=np.float64)
    for j, name in enumerate(columns):
        values = table.floats(name)
        if values is not None and bool(np.isfinite(values).all()):
            out[:, j] = values
            continue
        cells = zip(table.column(name), table.numbers(name), table.lines, strict=True)
        for i, (cell, number, line) in enumerate(cells):
            try:
                value = float(number)
            except ValueError:
                hint = ""
                if table.decimal == "." and _DECIMAL_COMMA.fullmatch(cell):
                    hint = "; a decimal comma? give --decimal ,"
                raise InputError(
                    f"{table.path!r}: {kind} column {name!r} is not numeric ({cell!r} at line {line}{hint})"
                ) from None
            if not math.isfinite(value):
                raise InputError(
                    f"{table.path!r}: {kind} column {name!r} has the non-finite value {cell!r} at line {line}"
                )
            out[i, j] = value
    return out


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


# --------------------------------------------------------------------------- models


@dataclass
class SavedModel:
    """A fitted DEQ Gaussian-process estimator with what is needed to apply it to a CSV file.

    Attributes
    ----------
    estimator : DEQGPRegressor or DEQGPClassifier
        Fitted on standardised features (and, for classification, class indices).
    task : {"regression", "classification"}
    target : str
        Name of the target column.
    features : list of str
        Names of the feature columns, in the estimator's order.
    feature_mean, feature_scale : ndarray of shape (n_features,)
        The standardisation ``(x - feature_mean) / feature_scale`` applied before the estimator.
    classes : list of str or None
        Class labels (classification), indexed by the estimator's classes.
    train_inputs : ndarray of shape (n_samples, n_features)
        The standardised training features.
    train_targets : ndarray of shape (n_samples,)
        Training targets (regression) or class indices (classification).
    """

    estimator: Estimator
    task: str
    target: str
    features: list[str]
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    classes: list[str] | None
    train_inputs: np.ndarray
    train_targets: np.ndarray

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Standardise raw feature values as the training features were."""
        return (np.asarray(X, dtype=np.float64) - self.feature_mean) / self.feature_scale

    def predict(self, X: np.ndarray, *, return_std: bool = False, latent: bool = False) -> dict[str, np.ndarray]:
        """Predictions for raw feature rows, as named output columns.

        Regression gives ``mean`` and, with ``return_std``, ``std``: the predictive standard
        deviation of an observation (the noise included), or with ``latent`` ``latent_std``,
        the latent function's. Classification gives ``label`` (and one ``proba_<class>`` column
        per class, with ``return_std``).
        """
        Z = self.transform(X)
        if self.task == "regression":
            if not return_std:
                return {"mean": self.estimator.predict(Z)}
            mean, std = self.estimator.predict(Z, return_std=True, latent=latent)
            return {"mean": mean, "latent_std" if latent else "std": std}
        proba = self.estimator.predict_proba(Z)
        labels = np.asarray(self.classes, dtype=object)[np.argmax(proba, axis=1)]
        out: dict[str, np.ndarray] = {"label": labels}
        if return_std:
            out.update({f"proba_{c}": proba[:, k] for k, c in enumerate(self.classes)})
        return out

    # ------------------------------------------------------------------ writing

    def metadata(self) -> dict[str, Any]:
        """The JSON description of the model (without the tensors' checksum)."""
        return {
            "format": _FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "task": self.task,
            "target": self.target,
            "features": list(self.features),
            "scaler": {"mean": self.feature_mean.tolist(), "scale": self.feature_scale.tolist()},
            "classes": None if self.classes is None else list(self.classes),
            "estimator": {"class": type(self.estimator).__name__, "params": _json_params(self.estimator)},
            "fitted": {
                "log_marginal_likelihood_value_": float(self.estimator.log_marginal_likelihood_value_),
                "n_iter_": int(self.estimator.n_iter_),
            },
            "kernel": fitted_hyperparameters(self.estimator),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the model directory atomically and return its path.

        The files are written to a new temporary directory next to ``directory``, which is
        then renamed to ``directory``. An existing model directory there is replaced only
        once the new one is complete; any other existing path is refused.

        Raises
        ------
        InputError
            ``directory`` exists and is not a model directory, or cannot be written.
        """
        target = Path(directory)
        if target.exists() and not (target.is_dir() and (target / MODEL_FILE).is_file()):
            raise InputError(f"{str(target)!r} exists and is not a model directory; choose another --out")
        meta = self.metadata()  # refuses a setting it cannot hold before anything is written
        parent = target.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = sibling(target, ".tmp", lambda path: os.mkdir(path, 0o777))  # the umask applies
        except OSError as exc:
            raise InputError(f"cannot write the model to {str(target)!r}: {exc.strerror}") from None
        try:
            self._write(staging, meta)
            _replace_directory(staging, target)
            sync_directory(parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _write(self, directory: Path, meta: dict[str, Any]) -> None:
        model = self.estimator.model_
        tensors = {
            "train_inputs": torch.from_numpy(np.ascontiguousarray(self.train_inputs, dtype=np.float64)),
            "train_targets": torch.from_numpy(np.ascontiguousarray(self.train_targets)),
            "state_dict": {name: value.detach().cpu() for name, value in model.state_dict().items()},
        }
        draws = getattr(self.estimator, "_draws", None)
        if draws is not None:  # the classifier's fixed Monte Carlo draws
            tensors["draws"] = torch.from_numpy(np.ascontiguousarray(draws, dtype=np.float64))
        tensor_path = directory / TENSORS_FILE
        with open(tensor_path, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        meta = dict(meta, tensors={"file": TENSORS_FILE, "sha256": _sha256(tensor_path)})
        with open(directory / MODEL_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


def _replace_directory(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = sibling(target, ".old", os.mkdir)
    os.rmdir(retired)
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)  # put the old model back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def sync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sibling(target: Path, suffix: str, create: Callable[[Path], Any]) -> Path:
    """A new path next to ``target``, ``.name.<random>suffix``, made by ``create`` (which must fail if it exists).

    Unique per call, so that two runs writing the same target never share a staging path;
    the file or directory is created with the process's umask (no ``os.umask`` call, which
    would change it for every thread for a moment).
    """
    parent = target.resolve().parent
    while True:
        path = parent / f".{target.name}.{secrets.token_hex(6)}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_params(estimator: Estimator) -> dict[str, Any]:
    """Every constructor parameter of the estimator as JSON (see :func:`_encode`).

    Raises
    ------
    InputError
        For a setting a model directory cannot hold (a callable activation, an activation
        object not built by name), naming it: the saved model would otherwise come back as
        another model.
    """
    return {name: _encode(value, name) for name, value in estimator.get_params(deep=False).items()}


def _encode(value: Any, name: str) -> Any:
    """A parameter value as JSON that :func:`_decode` turns back into an equal value of the same type.

    JSON's own scalars stay as they are; tuples and lists (an ``image_shape``), numpy scalars
    and arrays, a ``RandomState``, a torch device and an activation built by name are tagged
    objects ``{"__type__": ..., ...}``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"cannot save the estimator setting {name}={value!r}: not a finite number")
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"__type__": "numpy", "dtype": value.dtype.str, "value": value.item()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {
            "__type__": "ndarray",
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "data": value.ravel().tolist(),
        }
    if isinstance(value, np.random.RandomState):
        kind, keys, pos, has_gauss, gauss = value.get_state(legacy=True)
        state = {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": gauss}
        return {"__type__": "RandomState", "state": state}
    if isinstance(value, torch.device):
        return {"__type__": "device", "value": str(value)}
    if isinstance(value, (tuple, list)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {"__type__": kind, "items": [_encode(v, f"{name}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__type__": "dict", "items": {k: _encode(v, f"{name}[{k!r}]") for k, v in value.items()}}
    if isinstance(value, Activation):
        spec = activation_spec(value)
        if spec is not None:
            return {"__type__": "activation", "name": spec[0], "options": _encode(spec[1], name)}
        raise InputError(
            f"cannot save the estimator setting {name}={value!r}: an activation object not built by name cannot be "
            f"written to a model directory; pass its name (one of {', '.join(ACTIVATIONS)}), or keep the estimator "
            "with pickle or joblib"
        )
    if callable(value):
        raise InputError(
            f"cannot save the estimator setting {name}={value!r}: a callable cannot be written to a model directory "
            "(it holds no code); keep the estimator with pickle or joblib"
        )
    raise InputError(
        f"cannot save the estimator setting {name}={value!r} ({type(value).__name__}) in a model directory"
    )


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode`."""
    if not isinstance(value, dict):
        return value
    kind = value.get("__type__")
    if kind == "numpy":
        return np.dtype(value["dtype"]).type(value["value"])
    if kind == "ndarray":
        return np.asarray(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if kind == "RandomState":
        st = value["state"]
        rng = np.random.RandomState()
        rng.set_state((st["kind"], np.asarray(st["keys"], dtype=np.uint32), st["pos"], st["has_gauss"], st["gauss"]))
        return rng
    if kind == "device":
        return torch.device(value["value"])
    if kind == "dict":
        return {k: _decode(v) for k, v in value["items"].items()}
    if kind in ("tuple", "list"):
        items = [_decode(v) for v in value["items"]]
        return tuple(items) if kind == "tuple" else items
    if kind == "activation":
        return get_activation(value["name"], **_decode(value["options"]))
    raise ValueError(f"unknown saved value {value!r}")


def fitted_hyperparameters(estimator: Estimator) -> dict[str, Any]:
    """The fitted kernel settings of an estimator, by name (for people: not read back)."""
    model = estimator.model_
    covar = model.covar_module
    base = getattr(covar, "base_kernel", covar)
    if not hasattr(base, "weight_variance"):
        return {}
    out: dict[str, Any] = {"activation": base.activation.name}
    for name in ("weight_variance", "input_variance", "bias_variance"):
        values = getattr(base, name).detach().cpu().reshape(-1).tolist()
        out[name] = values[0] if len(values) == 1 else values
    if hasattr(covar, "outputscale"):
        scale = covar.outputscale.detach().cpu().reshape(-1).tolist()
        out["outputscale"] = scale[0] if len(scale) == 1 else scale
    noise = getattr(model.likelihood, "noise", None)
    if isinstance(estimator, DEQGPRegressor) and noise is not None:
        out["noise"] = float(noise.detach().cpu().reshape(-1)[0])
    return out


# --------------------------------------------------------------------------- reading


def load_model(directory: str | os.PathLike) -> SavedModel:
    """Read a model directory written by :meth:`SavedModel.save`.

    The estimator is re-created from its saved parameters, conditioned on the saved training
    data without optimising (``optimizer=None``), and given the saved GPyTorch state, so its
    predictions are those of the saved model, bit for bit.

    Raises
    ------
    InputError
        The directory does not exist or is not a model, comes from a newer format version,
        or has a missing or corrupted file.
    """
    path = Path(directory)
    name = str(directory)
    if not path.exists():
        raise InputError(f"model directory {name!r} does not exist")
    if not path.is_dir() or not (path / MODEL_FILE).is_file():
        raise InputError(f"{name!r} is not a deq-kernel model directory (no {MODEL_FILE})")
    meta = _read_metadata(path / MODEL_FILE)
    tensor_path = path / meta["tensors"]["file"]
    if not tensor_path.is_file():
        raise InputError(f"corrupted model {name!r}: {meta['tensors']['file']} is missing")
    if _sha256(tensor_path) != meta["tensors"]["sha256"]:
        raise InputError(f"corrupted model {name!r}: {tensor_path.name} does not match its checksum in {MODEL_FILE}")
    try:
        tensors = torch.load(tensor_path, map_location="cpu", weights_only=True)
        inputs = tensors["train_inputs"].numpy()
        targets = tensors["train_targets"].numpy()
        state = tensors["state_dict"]
    except Exception as exc:  # any failure to read the file means it is damaged
        raise InputError(f"corrupted model {name!r}: cannot read {tensor_path.name} ({type(exc).__name__})") from None
    estimator, saved_params = _recreate(meta["estimator"], name)
    estimator.fit(inputs, targets)
    try:
        estimator.model_.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise InputError(f"corrupted model {name!r}: the saved GP state does not fit its settings ({exc})") from None
    estimator.model_.eval()
    # What the saved fit reported, not what conditioning at the initial values computed.
    fitted = meta.get("fitted")
    if fitted is not None:
        estimator.log_marginal_likelihood_value_ = float(fitted["log_marginal_likelihood_value_"])
        estimator.n_iter_ = int(fitted["n_iter_"])
    if "draws" in tensors:
        estimator._draws = tensors["draws"].numpy()
    estimator.set_params(**saved_params)
    estimator._condition()
    scaler = meta["scaler"]
    return SavedModel(
        estimator=estimator,
        task=meta["task"],
        target=meta["target"],
        features=list(meta["features"]),
        feature_mean=np.asarray(scaler["mean"], dtype=np.float64),
        feature_scale=np.asarray(scaler["scale"], dtype=np.float64),
        classes=None if meta["classes"] is None else [str(c) for c in meta["classes"]],
        train_inputs=inputs,
        train_targets=targets,
    )


def _read_metadata(file: Path) -> dict[str, Any]:
    where = str(file)
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"corrupted model file {where!r}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
        raise InputError(f"{where!r} is not a deq-kernel model description")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"corrupted model file {where!r}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"model {str(file.parent)!r} has format version {version}, newer than this deq-kernel "
            f"{__version__} reads ({FORMAT_VERSION}); upgrade deq-kernel"
        )
    required = {"task", "target", "features", "scaler", "classes", "estimator", "tensors"}
    missing = sorted(required - meta.keys())
    if missing:
        raise InputError(f"corrupted model file {where!r}: missing {_names(missing)}")
    try:
        ok = (
            meta["task"] in ("regression", "classification")
            and meta["estimator"]["class"] in _ESTIMATORS
            and isinstance(meta["estimator"]["params"], dict)
            and len(meta["scaler"]["mean"]) == len(meta["scaler"]["scale"]) == len(meta["features"])
            and isinstance(meta["tensors"]["file"], str)
            and "/" not in meta["tensors"]["file"]
            and isinstance(meta["tensors"]["sha256"], str)
            and (meta["classes"] is None) == (meta["task"] == "regression")
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise InputError(f"corrupted model file {where!r}: malformed entries")
    return meta


def _recreate(spec: dict[str, Any], name: str) -> tuple[Estimator, dict[str, Any]]:
    """A new, unfitted estimator that conditions without optimising, and the saved parameters.

    The caller fits it (conditioning on the saved data), gives it the saved state, then sets
    the saved parameters back, so that ``get_params()`` and a refit are the saved model's.
    """
    cls = _ESTIMATORS[spec["class"]]
    known = cls().get_params(deep=False)
    try:
        params = {k: _decode(v) for k, v in spec["params"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"corrupted model {name!r}: bad estimator settings ({exc})") from None
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(
            f"model {name!r} uses estimator setting(s) {_names(unknown)} that this deq-kernel {__version__} lacks"
        )
    if "input_variance" in params and isinstance(params["input_variance"], list):  # format version 1
        params["input_variance"] = np.asarray(params["input_variance"], dtype=np.float64)
    # Conditioning draws from a RandomState: it gets its own copy, the saved one stays as saved.
    conditioning = {k: copy.deepcopy(v) if isinstance(v, np.random.RandomState) else v for k, v in params.items()}
    conditioning.update(optimizer=None, max_fit_samples=None, n_restarts_optimizer=0)
    if conditioning.get("method") == "svgp":
        # A variational model is re-created by one pass, then given the saved state.
        conditioning.update(epochs=1, verbose=False)
    try:
        return cls(**conditioning), params
    except (TypeError, ValueError) as exc:
        raise InputError(f"corrupted model {name!r}: bad estimator settings ({exc})") from None
