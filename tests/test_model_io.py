"""Saved models come back as the same model: a property test over estimator settings.

Each drawn estimator is fitted on a small problem, then round-tripped through a model
directory (:class:`~deq_kernel.model_io.SavedModel` and :func:`~deq_kernel.model_io.load_model`),
pickle and joblib; predictions must agree bit for bit and the fitted attributes exactly.
"""

from __future__ import annotations

import json
import pickle

import joblib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deq_kernel import get_activation
from deq_kernel.model_io import InputError, SavedModel, load_model
from deq_kernel.sklearn import DEQGPClassifier, DEQGPRegressor

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(36, 3))
_Y = np.sin(_X[:, 0]) + 0.5 * _X[:, 1]
_X_NEW = _RNG.normal(size=(9, 3))


def _saved(estimator, classification: bool) -> SavedModel:
    targets = (_Y > 0).astype(np.int64) if classification else _Y
    estimator.fit(_X, targets)
    return SavedModel(
        estimator=estimator,
        task="classification" if classification else "regression",
        target="y",
        features=["a", "b", "c"],
        feature_mean=np.zeros(3),
        feature_scale=np.ones(3),
        classes=["no", "yes"] if classification else None,
        train_inputs=_X,
        train_targets=targets,
    )


def _outputs(estimator) -> list[np.ndarray]:
    if isinstance(estimator, DEQGPClassifier):
        return [estimator.predict_proba(_X_NEW)]
    return [*estimator.predict(_X_NEW, return_std=True), estimator.predict(_X_NEW, return_std=True, latent=True)[1]]


def _same_fit(a, b) -> None:
    for out_a, out_b in zip(_outputs(a), _outputs(b), strict=True):
        assert np.array_equal(out_a, out_b)
    assert repr(a.kernel_) == repr(b.kernel_)
    assert a.log_marginal_likelihood_value_ == b.log_marginal_likelihood_value_
    assert a.n_iter_ == b.n_iter_


def _same_params(a, b) -> None:
    pa, pb = a.get_params(), b.get_params()
    assert pa.keys() == pb.keys()
    for name, value in pa.items():
        other = pb[name]
        if isinstance(value, np.random.RandomState):
            assert isinstance(other, np.random.RandomState)
            assert all(np.array_equal(x, y) for x, y in zip(value.get_state(), other.get_state(), strict=True))
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, other) and value.dtype == other.dtype
        else:
            assert type(value) is type(other) and repr(value) == repr(other), name


_activations = st.sampled_from(["relu", "erf", "tanh", "leaky_relu", "object"])
_random_states = st.sampled_from([None, 3, "RandomState"])


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    classification=st.booleans(),
    activation=_activations,
    kernel=st.sampled_from(["nngp", "ntk"]),
    ard=st.booleans(),
    method=st.sampled_from(["exact", "exact", "svgp"]),
    numpy_scalars=st.booleans(),
    random_state=_random_states,
)
def test_saved_models_come_back_the_same(
    tmp_path_factory, classification, activation, kernel, ard, method, numpy_scalars, random_state
):
    options = {"negative_slope": 0.2} if activation == "leaky_relu" else None
    act = get_activation("tanh") if activation == "object" else activation
    state = np.random.RandomState(7) if random_state == "RandomState" else random_state
    params = dict(activation=act, kernel=kernel, ard=ard, method=method, random_state=state, activation_kwargs=options)
    params.update(max_iter=np.int64(4) if numpy_scalars else 4, bias_variance=np.float32(0.2) if numpy_scalars else 0.2)
    if method == "svgp":
        params.update(n_inducing=12, epochs=2, batch_size=16)
    if classification:
        estimator = DEQGPClassifier(**params, max_fit_samples=None)
    else:
        estimator = DEQGPRegressor(**params, noise=np.float32(0.05) if numpy_scalars else 0.05)
    model = _saved(estimator, classification)
    directory = tmp_path_factory.mktemp("model") / "saved"
    model.save(directory)
    loaded = load_model(directory).estimator
    _same_fit(estimator, loaded)
    _same_params(estimator, loaded)
    _same_fit(estimator, pickle.loads(pickle.dumps(estimator)))
    joblib.dump(estimator, directory.parent / "model.joblib")
    _same_fit(estimator, joblib.load(directory.parent / "model.joblib"))


def test_a_setting_a_directory_cannot_hold_is_refused_at_save_time(tmp_path):
    model = _saved(DEQGPRegressor(activation=torch.tanh, max_iter=3), classification=False)
    with pytest.raises(InputError, match=r"cannot save the estimator setting activation=.*pickle or joblib"):
        model.save(tmp_path / "model")
    assert not (tmp_path / "model").exists() and list(tmp_path.iterdir()) == []
    # An activation object built directly (not by name) has no description either.
    from deq_kernel.activations import PiecewiseLinear

    model = _saved(DEQGPRegressor(activation=PiecewiseLinear(0.3), max_iter=3), classification=False)
    with pytest.raises(InputError, match="activation object not built by name"):
        model.save(tmp_path / "model")


def test_a_loaded_model_reports_the_saved_fit_not_the_initial_values(tmp_path):
    model = _saved(DEQGPRegressor("tanh", max_iter=15, random_state=0), classification=False)
    model.save(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    loaded = load_model(tmp_path / "model").estimator
    initial = DEQGPRegressor("tanh", optimizer=None).fit(_X, _Y)
    assert repr(loaded.kernel_) == repr(model.estimator.kernel_) != repr(initial.kernel_)
    assert loaded.log_marginal_likelihood_value_ == meta["fitted"]["log_marginal_likelihood_value_"]
    assert loaded.log_marginal_likelihood_value_ != initial.log_marginal_likelihood_value_
    assert loaded.get_params()["optimizer"] == "lbfgs" and loaded.get_params()["max_iter"] == 15


def test_models_of_the_first_format_version_still_load(tmp_path):
    model = _saved(DEQGPRegressor(max_iter=3, input_variance=np.array([1.0, 2.0, 3.0]), ard=True), False)
    model.save(tmp_path / "model")
    path = tmp_path / "model" / "model.json"
    meta = json.loads(path.read_text())
    # Version 1 wrote JSON-native parameters only, and no fitted section.
    meta["format_version"] = 1
    meta["estimator"]["params"]["input_variance"] = [1.0, 2.0, 3.0]
    del meta["fitted"]
    path.write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "model").estimator
    assert np.array_equal(loaded.predict(_X_NEW), model.estimator.predict(_X_NEW))


@pytest.mark.parametrize("shape", [(1, 1, 3), [3, 1], (np.int64(1), np.int64(3))])
def test_convolutional_models_come_back_the_same(tmp_path, shape):
    """``image_shape`` (a tuple, a list or numpy integers) survives the model directory as it was given."""
    estimator = DEQGPRegressor(image_shape=shape, kernel_size=1, max_iter=3, noise=0.05)
    model = _saved(estimator, classification=False)
    model.save(tmp_path / "saved")
    loaded = load_model(tmp_path / "saved").estimator
    _same_fit(estimator, loaded)
    _same_params(estimator, loaded)
    assert type(loaded.image_shape) is type(shape)


def test_read_csv_holds_a_large_file_compactly(tmp_path):
    """The cells are kept as UTF-8 bytes column by column, the file streamed in chunks of rows.

    Held as Python strings (and the file's text, its lines and two copies of its rows at
    once), this file took 9.1x its size after reading and 15.3x at the peak.
    """
    import tracemalloc

    from deq_kernel.model_io import numeric_columns, read_csv

    values = np.random.default_rng(0).normal(size=(12000, 5))
    path = tmp_path / "large.csv"
    labels = np.where(values[:, 0] > 0, "  café ", "thé")
    with path.open("w", encoding="utf-8") as f:
        f.write("a,b,c,d,e,label\n")
        for row, label in zip(values, labels, strict=True):
            f.write(",".join(f"{v:.17g}" for v in row) + f",{label}\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        table = read_csv(path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held <= 2 * size and peak <= 8 * size, (held / size, peak / size)
    assert len(table) == 12000 and table.lines[0] == 2 and table.lines[-1] == 12001
    assert np.array_equal(numeric_columns(table, ["a", "b", "c", "d", "e"]), values)  # exact: 17 digits
    assert table.column("label") == [label.strip() for label in labels]
    assert len(table.select(values[:, 0] > 0)) == int((values[:, 0] > 0).sum())
