"""The ``deq-kernel`` command line: commands, model files, and every bad input through a subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator

import deq_kernel
from deq_kernel import cli
from deq_kernel.model_io import FORMAT_VERSION, InputError, SavedModel, load_model

#: One thread per subprocess: the tests run side by side on few cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("DEQ_KERNEL_BENCHMARK", None)


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny; one thread each keeps the tests and their subprocesses off each other's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m deq_kernel ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "deq_kernel", *args],
        capture_output=True,
        text=True,
        env=ENV if env is None else env,
        cwd=cwd,
        timeout=300,
    )


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def regression_rows(n: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.05 * rng.normal(size=n)
    return [[*map(float, row), float(t)] for row, t in zip(x, y, strict=True)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small CSV files, good and bad."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 2))
    labels = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
    paths = {
        "reg": write_csv(d / "reg.csv", ["a", "b", "c", "y"], regression_rows(30)),
        "clf": write_csv(
            d / "clf.csv", ["u", "v", "label"], [[*map(float, r), t] for r, t in zip(x, labels, strict=True)]
        ),
        "single": write_csv(d / "single.csv", ["a", "y"], [[1.0, 2.0]]),
        "constant": write_csv(d / "constant.csv", ["a", "y"], [[1.0, 2.5], [2.0, 2.5], [3.0, 2.5]]),
        "text": write_csv(d / "text.csv", ["a", "b", "y"], [[1, 2, 0.5], [2, "high", 0.7], [3, 4, 0.1]]),
        "nan": write_csv(d / "nan.csv", ["a", "b", "y"], [[1, 2, 0.5], [2, 3, 0.7], [3, "NaN", 0.1], [4, 1, 0.2]]),
        "empty_cell": write_csv(d / "empty_cell.csv", ["a", "b", "y"], [[1, 2, 0.5], [2, "", 0.7], [3, 5, 0.1]]),
        "lacking": write_csv(d / "lacking.csv", ["a", "c", "extra"], [[1, 2, 3]]),
        "header_only": write_csv(d / "header_only.csv", ["a", "y"], []),
        "decimal_comma": d / "decimal_comma.csv",
        "holes": write_csv(d / "holes.csv", ["a", "b", "c"], [[1, 2, 3], [1, "", 3]]),
    }
    paths["decimal_comma"].write_text("a;b;y\n1,5;2,0;0,25\n2,5;1,0;0,5\n0,5;3,0;1,5\n")
    paths["empty"] = d / "empty.csv"
    paths["empty"].write_text("")
    return paths


@pytest.fixture(scope="module")
def model_dir(files, tmp_path_factory) -> Path:
    """A regression model fitted by the command line (a few steps)."""
    out = tmp_path_factory.mktemp("models") / "reg-model"
    result = run("fit", str(files["reg"]), "--target", "y", "--steps", "8", "--cv", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "fitted hyperparameters:" in result.stdout
    assert "2-fold cross-validated R^2:" in result.stdout
    return out


def fit_args(*extra: str) -> object:
    return cli.build_parser().parse_args(["fit", "data.csv", "--target", "y", *extra])


def fit_in_process(path: Path, target: str, *extra: str) -> SavedModel:
    """The command line's own fitting steps, in this process."""
    args = cli.build_parser().parse_args(["fit", str(path), "--target", target, "--steps", "10", *extra])
    data = cli.load_training_data(args.data, args.target, args.task, args.drop_missing)
    Z, mean, scale = cli.standardise(data.X)
    estimator = cli.make_estimator(data.task, args)
    estimator.fit(Z, data.y)
    return SavedModel(estimator, data.task, data.target, data.features, mean, scale, data.classes, Z, data.y)


# --------------------------------------------------------------------------- entry points


def test_version_from_the_module_and_the_console_script():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"deq-kernel {deq_kernel.__version__}"
    script = Path(sys.executable).with_name("deq-kernel")
    if not script.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"deq-kernel {deq_kernel.__version__}"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["demo", "fit", "predict", "verify", "bench", "--version", "--debug"]),
        (["demo"], ["--out", "--quick"]),
        (["fit"], ["--target", "--task", "--activation", "--steps", "--drop-missing", "--method", "--cv", "--out"]),
        (["predict"], ["MODEL_DIR", "DATA.csv", "--std", "--out"]),
        (["verify"], ["--activation", "--widths", "--out"]),
        (["bench"], ["--quick"]),
    ],
)
def test_help_of_each_command(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {' '.join(['deq-kernel', *command])}")
    for word in expected:
        assert word in text


# --------------------------------------------------------------------------- fit and predict


def test_fit_writes_a_model_directory(model_dir, files):
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "tensors.pt"]
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["library_version"] == deq_kernel.__version__
    assert meta["task"] == "regression"
    assert meta["target"] == "y"
    assert meta["features"] == ["a", "b", "c"]
    assert meta["classes"] is None
    x = np.array(regression_rows(30))[:, :3]
    np.testing.assert_allclose(meta["scaler"]["mean"], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(meta["scaler"]["scale"], x.std(0), rtol=1e-12)
    assert meta["estimator"]["params"]["activation"] == "relu"
    assert 0 < meta["kernel"]["weight_variance"] < 2
    tensors = torch.load(model_dir / "tensors.pt", weights_only=True)
    assert tensors["train_inputs"].shape == (30, 3)
    np.testing.assert_allclose(tensors["train_inputs"].numpy(), (x - x.mean(0)) / x.std(0), rtol=1e-12)


def test_predict_by_column_name_to_stdout_and_file(model_dir, files, tmp_path, forked):
    result = run("predict", str(model_dir), str(files["reg"]), "--std")
    assert result.returncode == 0, result.stderr
    table = np.genfromtxt(io.StringIO(result.stdout), delimiter=",", names=True)
    assert table.dtype.names == ("mean", "std")
    assert len(table) == 30 and np.all(table["std"] > 0)
    y = np.array(regression_rows(30))[:, 3]
    assert np.sqrt(np.mean((table["mean"] - y) ** 2)) < 0.8 * y.std()  # it learned something

    # Columns shuffled, one extra: found by name, the extra ignored, the same predictions.
    rows = regression_rows(30)
    shuffled = write_csv(
        tmp_path / "shuffled.csv", ["note", "c", "y", "a", "b"], [["x", r[2], r[3], r[0], r[1]] for r in rows]
    )
    out = tmp_path / "pred.csv"
    again = forked("predict", str(model_dir), str(shuffled), "--std", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert out.read_text() == result.stdout


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_model_round_trip_reproduces_predictions_bit_for_bit(kind, files, tmp_path):
    model = fit_in_process(files["reg"], "y") if kind == "regression" else fit_in_process(files["clf"], "label")
    x_new = np.random.default_rng(5).normal(size=(7, len(model.features)))
    before = model.predict(x_new, return_std=True)
    model.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    after = loaded.predict(x_new, return_std=True)
    assert list(after) == list(before)
    for name in before:
        assert np.array_equal(after[name], before[name]), name
    if kind == "classification":
        assert loaded.classes == ["no", "yes"]
        assert list(before) == ["label", "proba_no", "proba_yes"]


def test_images_through_the_command_line(tmp_path, capsys):
    """--image-shape fits the convolutional kernel; its model directory comes back with it, bit for bit."""
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(24, 9))
    rows = [[*map(float, r), float(r[:4].sum() - r[5:].sum())] for r in x]
    data = write_csv(tmp_path / "images.csv", [f"p{i}" for i in range(9)] + ["y"], rows)
    out = tmp_path / "model"
    argv = ["fit", str(data), "--target", "y", "--image-shape", "3,3", "--kernel-size", "1", "--steps", "3"]
    assert cli.main([*argv, "--cv", "0", "--out", str(out)]) == 0
    assert "images 1x3x3, 1x1 convolutions, flatten readout" in capsys.readouterr().out
    loaded = load_model(out)
    kernel = loaded.estimator.kernel_.k1.k2
    assert isinstance(kernel, deq_kernel.sklearn.ConvDEQ) and kernel.image_shape == (1, 3, 3)
    assert loaded.estimator.image_shape == (3, 3) and loaded.estimator.kernel_size == 1
    model = fit_in_process(data, "y", "--image-shape", "3,3", "--kernel-size", "1", "--steps", "3")
    x_new = rng.uniform(size=(4, 9))
    before = model.predict(x_new, return_std=True)
    model.save(tmp_path / "again")
    after = load_model(tmp_path / "again").predict(x_new, return_std=True)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_round_trip_of_a_sparse_variational_model(files, tmp_path):
    if "method" not in deq_kernel.sklearn.DEQGPRegressor().get_params():
        pytest.skip("the estimators have no 'method' parameter")
    model = fit_in_process(files["reg"], "y", "--method", "svgp", "--n-inducing", "8", "--epochs", "2")
    assert model.estimator.method == "svgp"
    x_new = np.random.default_rng(6).normal(size=(5, 3))
    before = model.predict(x_new, return_std=True)
    model.save(tmp_path / "model")
    after = load_model(tmp_path / "model").predict(x_new, return_std=True)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_classification_predictions_through_the_command_line(files, tmp_path, capsys):
    out = tmp_path / "model"
    assert (
        cli.main(["fit", str(files["clf"]), "--target", "label", "--steps", "10", "--cv", "2", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "classification of 'label' on 40 rows, 2 features, 2 classes: no, yes" in text
    assert "2-fold cross-validated accuracy:" in text
    assert cli.main(["predict", str(out), str(files["clf"]), "--std"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "label,proba_no,proba_yes"
    predicted = [line.split(",") for line in lines[1:]]
    proba = np.array([[float(p) for p in row[1:]] for row in predicted])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    truth = [row[2] for row in csv.reader(open(files["clf"]))][1:]
    assert np.mean([row[0] == t for row, t in zip(predicted, truth, strict=True)]) > 0.8


def test_task_auto_detection():
    assert cli._resolve_task("auto", ["a", "b"]) == "classification"
    assert cli._resolve_task("auto", ["0", "1", "1.0"]) == "classification"
    assert cli._resolve_task("auto", ["0.5", "1", "2"]) == "regression"
    assert cli._resolve_task("auto", [str(i) for i in range(cli.AUTO_MAX_CLASSES + 1)]) == "regression"
    assert cli._resolve_task("regression", ["0", "1"]) == "regression"
    assert cli._class_labels(["1", "1.0", "b", "2.5"]) == ["1", "1", "b", "2.5"]


def test_fit_stops_early_and_reports_it(files, tmp_path, capsys):
    args = ["fit", str(files["reg"]), "--target", "y", "--steps", "300", "--tol", "0.05", "--cv", "0"]
    assert cli.main([*args, "--out", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "stopped early after" in text
    steps = int(text.split("stopped early after ")[1].split()[0])
    assert steps < 300


def test_drop_missing_drops_the_rows(files, tmp_path, capsys):
    out = tmp_path / "m"
    assert (
        cli.main(
            [
                "fit",
                str(files["nan"]),
                "--target",
                "y",
                "--drop-missing",
                "--steps",
                "3",
                "--cv",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "(1 rows with missing values dropped)" in capsys.readouterr().out
    assert torch.load(out / "tensors.pt", weights_only=True)["train_inputs"].shape == (3, 2)


def test_separators_and_decimal_marks_are_detected_or_given(files, tmp_path):
    rows = regression_rows(12)
    reference = cli.load_training_data(str(files["reg"]), "y", "auto", False)
    text = {
        "semicolon": "a;b;c;y\n" + "".join(";".join(repr(v) for v in r) + "\n" for r in regression_rows(30)),
        "tab": "a\tb\tc\ty\n" + "".join("\t".join(repr(v) for v in r) + "\n" for r in regression_rows(30)),
        "comma_decimal": "a;b;c;y\n"
        + "".join(";".join(repr(v).replace(".", ",") for v in r) + "\n" for r in regression_rows(30)),
    }
    for name, content in text.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(content)
        decimal = "," if name == "comma_decimal" else "."
        data = cli.load_training_data(str(path), "y", "auto", False, decimal=decimal)
        assert data.features == reference.features and data.task == "regression", name
        np.testing.assert_array_equal(data.X, reference.X)
        np.testing.assert_array_equal(data.y, reference.y)
    # Detection counts fields outside quotes: a quoted comma does not split a semicolon file.
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('name;a;y\n"Smith, J";1;0.5\n"Doe, A";2;0.7\n"Roe, B";3;0.1\n')
    data = cli.load_training_data(str(quoted), "y", "auto", False, drop=["name"])
    assert data.features == ["a"] and data.X[:, 0].tolist() == [1.0, 2.0, 3.0]
    # A separator given is used as given (pipe), and named ones are understood.
    piped = tmp_path / "piped.csv"
    piped.write_text("a|y\n" + "".join(f"{r[0]!r}|{r[-1]!r}\n" for r in rows))
    args = cli.build_parser().parse_args(["fit", str(piped), "--target", "y", "--delimiter", "pipe"])
    assert args.delimiter == "|"
    assert cli.load_training_data(str(piped), "y", "auto", False, delimiter="|").X.shape == (12, 1)
    assert cli.build_parser().parse_args(["fit", "x.csv", "--target", "y", "--delimiter", "tab"]).delimiter == "\t"


def test_feature_selection_and_an_identifier_column(tmp_path):
    rows = regression_rows(20)
    path = write_csv(tmp_path / "ids.csv", ["id", "a", "b", "c", "y"], [[i + 1, *r] for i, r in enumerate(rows)])
    with pytest.warns(UserWarning, match="feature column 'id' counts the rows .*--drop id"):
        data = cli.load_training_data(str(path), "y", "auto", False)
    assert data.features == ["id", "a", "b", "c"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.load_training_data(str(path), "y", "auto", False, drop=["id"]).features == ["a", "b", "c"]
        picked = cli.load_training_data(str(path), "y", "auto", False, features=["c", "a"])
    assert picked.features == ["c", "a"]
    np.testing.assert_array_equal(picked.X, np.array(rows)[:, [2, 0]])
    # Only the columns used are checked: an empty cell in a dropped column does not stop the fit.
    holes = write_csv(tmp_path / "holes.csv", ["note", "a", "y"], [["", r[0], r[-1]] for r in rows])
    assert cli.load_training_data(str(holes), "y", "auto", False, drop=["note"]).X.shape == (20, 1)


def test_classification_targets_that_look_continuous_or_have_many_classes_are_warned_about(files, tmp_path):
    with pytest.warns(UserWarning, match="non-integer numbers .* --task regression"):
        cli.load_training_data(str(files["reg"]), "y", "classification", False)
    many = write_csv(tmp_path / "many.csv", ["a", "y"], [[float(i % 7), i] for i in range(80)])
    with pytest.warns(UserWarning, match="has 80 classes, more than 30"):
        cli.load_training_data(str(many), "y", "classification", False)
    with pytest.raises(InputError, match=r"has a single class \(2\.5\); classification needs 2") as info:
        cli.load_training_data(str(files["constant"]), "y", "classification", False)
    assert "np." not in str(info.value)


def test_predict_drop_missing_skips_and_names_the_rows(model_dir, files, forked, tmp_path):
    out = tmp_path / "pred.csv"
    holes = write_csv(tmp_path / "holes.csv", ["a", "b", "c"], [[1, 2, 3], [1, "", 3], [0.5, 0.1, 0.2], ["NaN", 1, 1]])
    result = forked("predict", str(model_dir), str(holes), "--drop-missing", "--std", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "skipped 2 row(s) with missing values at line(s) 3, 5" in result.stderr
    table = list(csv.DictReader(out.open()))
    assert [row["line"] for row in table] == ["2", "4"]
    full = load_model(model_dir).predict(np.array([[1.0, 2, 3], [0.5, 0.1, 0.2]]), return_std=True)
    assert [float(row["mean"]) for row in table] == full["mean"].tolist()


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    with cli.Progress(100, "fit", plain) as progress:
        for _ in range(100):
            progress.update()
    assert plain.getvalue().splitlines() == [f"fit: {k}/100" for k in range(10, 101, 10)]

    terminal = Terminal()
    with cli.Progress(100, "fit", terminal) as progress:
        for _ in range(100):
            progress.update()
        assert progress._bar.n == 100
    drawn = terminal.getvalue()
    assert drawn.startswith("\rfit:") and "|" in drawn and "fit: 10/100" not in drawn


def test_optimizer_steps_advance_the_progress():
    progress = cli.Progress(5, "fit", io.StringIO())
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    with cli.optimizer_steps(progress):
        for _ in range(3):
            optimizer.step()
    optimizer.step()  # after the block: not counted
    assert progress.count == 3


# --------------------------------------------------------------------------- --method


def test_method_is_passed_to_estimators_that_take_it():
    estimator = cli.make_estimator("regression", fit_args("--method", "svgp", "--n-inducing", "16"))
    if "method" in estimator.get_params():
        assert estimator.method == "svgp" and estimator.n_inducing == 16
    assert cli.make_estimator("classification", fit_args()).get_params()["optimizer"] == "adam"


def test_svgp_is_refused_by_estimators_without_a_method(monkeypatch):
    class Older(BaseEstimator):  # the estimators' parameters before the 'method' option
        def __init__(self, activation="relu", *, ard=False, optimizer="lbfgs", max_iter=100, tol=1e-6,
                     learning_rate=None, random_state=None):  # fmt: skip
            self.activation, self.ard, self.optimizer, self.max_iter = activation, ard, optimizer, max_iter
            self.tol, self.learning_rate, self.random_state = tol, learning_rate, random_state

    monkeypatch.setattr(deq_kernel.sklearn, "DEQGPRegressor", Older)
    assert "method" not in cli.make_estimator("regression", fit_args()).get_params()  # exact: fine
    with pytest.raises(InputError, match="--method svgp"):
        cli.make_estimator("regression", fit_args("--method", "svgp"))


# --------------------------------------------------------------------------- model files


def test_saving_replaces_a_model_only_when_the_new_one_is_complete(files, tmp_path, monkeypatch):
    model = fit_in_process(files["reg"], "y")
    target = tmp_path / "model"
    model.save(target)
    original = (target / "tensors.pt").read_bytes()

    def crash(self, directory, meta):
        (directory / "tensors.pt").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(SavedModel, "_write", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    assert (target / "tensors.pt").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left
    monkeypatch.undo()

    model.estimator.model_.likelihood.noise = 0.5  # a different model replaces the old one
    model.save(target)
    assert (target / "tensors.pt").read_bytes() != original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a model directory"):
        model.save(other)
    assert (other / "keep.txt").read_text() == "mine"


def broken_model(model_dir: Path, tmp_path: Path, how: str) -> Path:
    broken = tmp_path / f"broken-{how}"
    broken.mkdir()
    for name in ("model.json", "tensors.pt"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    meta = json.loads((broken / "model.json").read_text())
    if how == "newer":
        meta["format_version"] = FORMAT_VERSION + 1
        (broken / "model.json").write_text(json.dumps(meta))
    elif how == "json":
        (broken / "model.json").write_text('{"format": "deq-kernel model", ')
    elif how == "truncated":
        data = (broken / "tensors.pt").read_bytes()
        (broken / "tensors.pt").write_bytes(data[: len(data) // 2])
    elif how == "no-tensors":
        (broken / "tensors.pt").unlink()
    elif how == "unreadable":  # checksum right, content not a torch file
        import hashlib

        (broken / "tensors.pt").write_bytes(b"not a torch file")
        meta["tensors"]["sha256"] = hashlib.sha256(b"not a torch file").hexdigest()
        (broken / "model.json").write_text(json.dumps(meta))
    return broken


# --------------------------------------------------------------------------- bad input


BAD_INPUT = {
    "missing file": (["fit", "{tmp}/nowhere.csv", "--target", "y"], "does not exist"),
    "empty file": (["fit", "{empty}", "--target", "y"], "is empty"),
    "header only": (["fit", "{header_only}", "--target", "y"], "no data rows"),
    "missing target column": (["fit", "{reg}", "--target", "price"], "target column 'price' is not in"),
    "non-numeric feature": (["fit", "{text}", "--target", "y"], "column 'b' is not numeric ('high' at line 3)"),
    "NaN cell": (["fit", "{nan}", "--target", "y"], "column 'b' has a missing value (empty or NaN) at line 4"),
    "empty cell": (["fit", "{empty_cell}", "--target", "y"], "column 'b' has a missing value (empty or NaN) at line 3"),
    "single row": (["fit", "{single}", "--target", "y"], "1 usable data row"),
    "constant target": (["fit", "{constant}", "--target", "y", "--task", "regression"], "is constant"),
    "single class": (["fit", "{constant}", "--target", "y", "--task", "classification"], "single class"),
    "invalid option value": (["fit", "{reg}", "--target", "y", "--steps", "0"], "--steps"),
    "image shape and features": (
        ["fit", "{reg}", "--target", "y", "--image-shape", "2,2"],
        "--image-shape 2,2 has 4 values per image, but the data has 3 features",
    ),
    "bad image shape": (["fit", "{reg}", "--target", "y", "--image-shape", "3x0"], "expected H,W or C,H,W"),
    "even kernel size": (["fit", "{reg}", "--target", "y", "--kernel-size", "2"], "positive odd integer"),
    "readout without images": (["fit", "{reg}", "--target", "y", "--readout", "gap"], "--readout needs --image-shape"),
    "ard with images": (["fit", "{reg}", "--target", "y", "--image-shape", "1,3", "--ard"], "--ard cannot go with"),
    "model dir missing": (["predict", "{tmp}/no-model", "{reg}"], "does not exist"),
    "not a model dir": (["predict", "{tmp}", "{reg}"], "is not a deq-kernel model directory"),
    "lacking a training column": (["predict", "{model}", "{lacking}"], "lacks the training column(s) 'b'"),
    "newer format": (["predict", "{newer}", "{reg}"], f"format version {FORMAT_VERSION + 1}, newer than"),
    "corrupted json": (["predict", "{json}", "{reg}"], "not valid JSON"),
    "truncated tensors": (["predict", "{truncated}", "{reg}"], "does not match its checksum"),
    "missing tensors": (["predict", "{no-tensors}", "{reg}"], "tensors.pt is missing"),
    "unreadable tensors": (["predict", "{unreadable}", "{reg}"], "cannot read tensors.pt"),
    "bad widths": (["verify", "--widths", "64,x"], "comma-separated positive integers"),
    "weight variance past the bound": (["verify", "--weight-variance", "2.5"], "must be below 2"),
    "no benchmark script": (["bench"], "DEQ_KERNEL_BENCHMARK names"),
    # Output paths are checked before any work (they used to fail after the fit, with exit 1).
    "fit --out an existing file": (["fit", "{reg}", "--target", "y", "--out", "{reg}"], "is not a model directory"),
    "demo --out a file": (["demo", "--quick", "--out", "{reg}"], "is a file, not a directory"),
    "verify --out a file": (["verify", "--out", "{reg}"], "is a file, not a directory"),
    "predict --out a directory": (["predict", "{model}", "{reg}", "--out", "{tmp}"], "is a directory"),
    "one fold": (["fit", "{reg}", "--target", "y", "--cv", "1"], "a number of folds >= 2"),
    # Columns and separators: named, with the closest valid name or what to give instead.
    "misspelled target": (["fit", "{reg}", "--target", "yy"], "did you mean 'y'?"),
    "unknown feature": (["fit", "{reg}", "--target", "y", "--features", "a,bb"], "'bb' is not in"),
    "feature is the target": (["fit", "{reg}", "--target", "y", "--features", "a,y"], "names the target column 'y'"),
    "dropping the target": (["fit", "{reg}", "--target", "y", "--drop", "y"], "--drop names the target column"),
    "unknown dropped column": (["fit", "{reg}", "--target", "y", "--drop", "id"], "--drop column 'id' is not in"),
    "wrong delimiter": (
        ["fit", "{reg}", "--target", "y", "--delimiter", "semicolon"],
        "the header has one column when split at ';': give --delimiter",
    ),
    "decimal commas": (["fit", "{decimal_comma}", "--target", "y"], "a decimal comma? give --decimal ,"),
    "bad delimiter": (["fit", "{reg}", "--target", "y", "--delimiter", "ab"], "--delimiter"),
    "missing cell in predict": (["predict", "{model}", "{holes}"], "use --drop-missing to skip such rows"),
}
#: Cases refused before any work: nothing is printed on standard output.
BEFORE_ANY_WORK = (
    "fit --out an existing file",
    "demo --out a file",
    "verify --out a file",
    "predict --out a directory",
)


#: A warm process that runs each command it is sent in a forked child of itself: a real
#: process per command, with its own exit status, stdout and stderr, without paying for a new
#: interpreter (and the imports of torch, GPyTorch and scikit-learn) each time.
FORKING_RUNNER = """
import json, os, sys, traceback
from deq_kernel.cli import main

for request in sys.stdin:
    case = json.loads(request)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(case["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.environ.update(case["env"])
        os.chdir(case["cwd"])
        for module in case["hide"]:
            sys.modules[module] = None
        try:
            code = main(case["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """``forked(*argv, env=..., cwd=..., hide=...)``: run ``deq-kernel ARGV`` in a new process."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    runner = subprocess.Popen(
        [sys.executable, "-c", FORKING_RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
    )
    scratch = tmp_path_factory.mktemp("forked")
    count = 0

    def call(*argv: str, env: dict | None = None, cwd: Path | None = None, hide: tuple = ()):
        nonlocal count
        count += 1
        out, err = scratch / f"{count}.out", scratch / f"{count}.err"
        case = {"argv": list(argv), "env": env or {}, "cwd": str(cwd or scratch), "hide": list(hide)}
        runner.stdin.write(json.dumps({**case, "stdout": str(out), "stderr": str(err)}) + "\n")
        runner.stdin.flush()
        line = runner.stdout.readline()
        assert line, "the forking runner died"
        return subprocess.CompletedProcess(argv, json.loads(line), out.read_text(), err.read_text())

    yield call
    runner.stdin.close()
    runner.wait(timeout=60)


@pytest.fixture(scope="module")
def bad_input_results(files, model_dir, forked, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("bad")
    places = {name: str(path) for name, path in files.items()}
    places.update(tmp=str(tmp), model=str(model_dir))
    for how in ("newer", "json", "truncated", "no-tensors", "unreadable"):
        places[how] = str(broken_model(model_dir, tmp, how))
    results = {}
    for name, (args, _) in BAD_INPUT.items():
        env = {"DEQ_KERNEL_BENCHMARK": str(tmp / "missing.py")} if name == "no benchmark script" else {}
        results[name] = forked(*(a.format(**places) for a in args), env=env, cwd=tmp)
    return results


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_error_line(case, bad_input_results):
    result = bad_input_results[case]
    message = BAD_INPUT[case][1]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    if case in BEFORE_ANY_WORK:
        assert result.stdout == ""


def test_more_folds_than_the_rows_allow_are_limited_and_scored(files, tmp_path, forked):
    # 30 rows: at most 15 folds of two held-out rows each (one row per fold gave R^2 = nan).
    result = forked(
        "fit", str(files["reg"]), "--target", "y", "--steps", "3", "--cv", "1000", "--out", str(tmp_path / "m")
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "cross-validated R^2" in line)
    assert line.startswith("15-fold") and "nan" not in line and "limited by the rows" in line


def test_predictions_written_by_two_runs_at_once_do_not_collide(model_dir, files, tmp_path, monkeypatch):
    # Each write stages under a name of its own (a fixed ".NAME.tmp" was shared by both runs).
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "pred.csv"
    columns = [{"mean": np.full(200, float(k))} for k in range(6)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda c: cli.write_csv(c, str(out)), columns))
    text = out.read_text().splitlines()
    assert text[0] == "mean" and len(text) == 201 and len(set(text[1:])) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["pred.csv"]  # no staging file left


def test_bad_input_from_a_fresh_interpreter(files):
    """The same, end to end, for one case: ``python -m deq_kernel`` with a missing target column."""
    result = run("fit", str(files["reg"]), "--target", "price")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: target column 'price' is not in {str(files['reg'])!r} (columns: a, b, c, y)"
    ]


def test_unexpected_failure_exits_1_with_the_traceback_only_under_debug(tmp_path, forked):
    failing = tmp_path / "bench.py"
    failing.write_text("import sys\nsys.exit(3)\n")
    env = {"DEQ_KERNEL_BENCHMARK": str(failing)}
    result = forked("bench", env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: RuntimeError: the benchmark {failing} failed with exit status 3 (run with --debug for the traceback)"
    ]
    result = forked("bench", "--debug", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "RuntimeError: the benchmark" in result.stderr


# --------------------------------------------------------------------------- demo, verify, bench


def test_demo_prints_the_table_and_writes_the_plot(tmp_path, forked):
    result = forked("demo", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith(("diabetes ", "breast_cancer ")):
            data, _, rest = line.partition("  ")
            rows[(data, "DEQ" if "DEQ GP" in rest else "RBF")] = rest.split()
    assert set(rows) == {(d, m) for d in ("diabetes", "breast_cancer") for m in ("DEQ", "RBF")}
    # Held-out RMSE of the diabetes data: predicting the mean scores about 77; a GP about 57.
    for model in ("DEQ", "RBF"):
        cells = rows[("diabetes", model)]
        assert 45 < float(cells[cells.index("RMSE") + 1]) < 65
        cells = rows[("breast_cancer", model)]
        assert float(cells[cells.index("accuracy") + 1]) > 0.9
    assert "weight_variance=" in " ".join(rows[("diabetes", "DEQ")])
    assert "lengthscale=" in " ".join(rows[("diabetes", "RBF")])
    # Scores with their standard errors, the classifier's output scale, and the paired difference.
    for key, cells in rows.items():
        metric = cells.index("RMSE" if key[0] == "diabetes" else "accuracy")
        assert cells[metric + 2] == "+-" and 0 < float(cells[metric + 3]) < 10, cells
    assert "outputscale=" in " ".join(rows[("breast_cancer", "DEQ")])
    paired = [line for line in result.stdout.splitlines() if "of DEQ GP minus RBF GP" in line]
    assert [line.split(":")[0] for line in paired] == ["diabetes", "breast_cancer"]
    assert all("+-" in line and "paired over" in line for line in paired)
    assert "for classification, the log loss" in result.stdout
    png = tmp_path / "deq-kernel-demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_without_matplotlib_says_so_and_still_prints_the_table(tmp_path, forked):
    result = forked("demo", "--quick", "--out", str(tmp_path), hide=("matplotlib",))
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if "matplotlib" in line]
    assert skipped == ["plot skipped: matplotlib is not installed (pip install 'deq-kernel[plot]')"]
    assert "RBF GP" in result.stdout and "DEQ GP (relu)" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_verify_error_falls_with_width(tmp_path, forked):
    result = forked("verify", "--widths", "16,256", "--networks", "12", "--points", "4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    errors = {}
    for line in result.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("16", "256"):
            errors[int(cells[0])] = float(cells[2])
    # The network kernel's error falls like width^(-1/2): a factor of about 4 here.
    assert 2.5 < errors[16] / errors[256] < 6.5
    assert "log-log slope" in result.stdout
    assert (tmp_path / "deq-kernel-verify.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_prints_the_ratio_table(forked):
    if not (Path(cli.__file__).parents[1] / "benchmarks" / "bench_kernel.py").exists():
        pytest.skip("no source tree")
    result = forked("bench", "--quick", "--activations", "relu")
    assert result.returncode == 0, result.stderr
    assert "deq/rbf" in result.stdout
    assert [line.split()[:2] for line in result.stdout.splitlines() if line.startswith("relu")] == [
        ["relu", "float64"],
        ["relu", "float32"],
    ]
