"""Sparse variational GPs: deq_kernel.variational and the estimators' method="svgp"."""

from __future__ import annotations

import math
import pickle

import gpytorch
import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import deq_kernel
import deq_kernel.equilibrium.dense
import deq_kernel.equilibrium.pairs
from deq_kernel import settings
from deq_kernel.sklearn import DEQGPClassifier, DEQGPRegressor
from deq_kernel.variational import SVGPModel, fit_svgp, predict_latent

HYPERPARAMETERS = {"weight_variance": 1.0, "input_variance": 1.0, "bias_variance": 0.1}


def _deq_prior_data(distinct=2000, replicates=10, n_test=500, noise=0.01, d=3, seed=0):
    """Targets drawn from the DEQ-GP prior at ``distinct`` inputs, each observed ``replicates`` times.

    The function is drawn exactly (one Cholesky factorisation of the kernel matrix of the
    distinct training and test inputs). Replicated inputs make the exact GP on all
    ``distinct * replicates`` training points exact and cheap too: it equals the GP on the
    distinct inputs with the replicates' mean as target and noise / replicates as noise.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(distinct + n_test, d, generator=g, dtype=torch.float64)
    K = deq_kernel.equilibrium_covariance(x, **HYPERPARAMETERS)
    f = torch.linalg.cholesky(K + 1e-10 * torch.eye(len(x), dtype=torch.float64)) @ torch.randn(
        len(x), generator=g, dtype=torch.float64
    )
    x_train = x[:distinct].repeat(replicates, 1)
    y_train = f[:distinct].repeat(replicates) + math.sqrt(noise) * torch.randn(
        distinct * replicates, generator=g, dtype=torch.float64
    )
    y_test = f[distinct:] + math.sqrt(noise) * torch.randn(n_test, generator=g, dtype=torch.float64)
    # The exact GP posterior mean at the test inputs, from the sufficient statistics.
    y_mean = y_train.reshape(replicates, distinct).mean(0)
    K_train = K[:distinct, :distinct] + (noise / replicates) * torch.eye(distinct, dtype=torch.float64)
    alpha = torch.cholesky_solve(y_mean.unsqueeze(-1), torch.linalg.cholesky(K_train)).squeeze(-1)
    exact_mean = K[distinct:, :distinct] @ alpha
    return x_train.numpy(), y_train.numpy(), x[distinct:].numpy(), y_test.numpy(), f[distinct:].numpy(), exact_mean


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def test_svgp_matches_the_exact_gp_on_deq_prior_data():
    """n = 20000 (2000 distinct inputs, 10 replicates), held-out RMSE within 10% of the exact GP.

    Apples to apples: both use the prior the data were drawn from (hyperparameters fixed at their
    true values, ``optimizer=None``), and both condition on all 20000 points; the SVGP learns
    its 512 inducing inputs and variational distribution.
    """
    X, y, X_test, y_test, f_test, exact_mean = _deq_prior_data()
    assert X.shape == (20_000, 3)
    reg = DEQGPRegressor(
        method="svgp",
        optimizer=None,
        normalize_y=False,
        noise=0.01,
        n_inducing=512,
        batch_size=4096,
        epochs=1,
        random_state=0,
        **HYPERPARAMETERS,
    ).fit(X, y)
    mean, std = reg.predict(X_test, return_std=True)
    exact_rmse, svgp_rmse = _rmse(exact_mean, y_test), _rmse(mean, y_test)
    assert svgp_rmse <= 1.10 * exact_rmse, (svgp_rmse, exact_rmse, _rmse(mean, f_test), _rmse(exact_mean, f_test))
    # The hyperparameters were held; the inducing inputs moved.
    kernel = reg.model_.covar_module.base_kernel
    assert float(kernel.weight_variance) == pytest.approx(1.0)
    assert float(reg.model_.likelihood.noise) == pytest.approx(0.01)
    assert reg.n_iter_ == math.ceil(20_000 / 4096)
    # Calibration: the latent errors are of the size of the predicted standard deviation.
    z = (mean - f_test) / std
    assert 0.3 < float(np.sqrt(np.mean(z**2))) < 3.0


def test_digits_classification():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0, stratify=y)
    clf = DEQGPClassifier(method="svgp", n_inducing=64, batch_size=2048, epochs=40, learning_rate=0.1, random_state=0)
    model = make_pipeline(StandardScaler(), clf).fit(X_train, y_train)
    assert model.score(X_test, y_test) >= 0.95
    proba = model.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert clf.model_.num_tasks == 10
    assert isinstance(clf.model_.likelihood, gpytorch.likelihoods.SoftmaxLikelihood)


def test_binary_classification_with_a_bernoulli_likelihood():
    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0, stratify=y)
    clf = DEQGPClassifier(method="svgp", n_inducing=128, batch_size=256, epochs=20, learning_rate=0.05, random_state=0)
    model = make_pipeline(StandardScaler(), clf).fit(X_train, y_train)
    assert model.score(X_test, y_test) >= 0.94
    assert isinstance(clf.model_.likelihood, gpytorch.likelihoods.BernoulliLikelihood)
    # Probit link: E[Phi(f)] = Phi(mean / sqrt(1 + variance)), the columns in the order of classes_.
    x = torch.as_tensor(model[0].transform(X_test[:5]))
    mean, variance = predict_latent(clf.model_, x)
    expected = torch.special.ndtr(mean / torch.sqrt(1 + variance)).numpy()
    np.testing.assert_allclose(model.predict_proba(X_test[:5])[:, 1], expected, rtol=1e-12)


def _toy(n=600, seed=0):
    r = np.random.default_rng(seed)
    X = r.normal(size=(n, 3))
    return X, np.sin(X[:, 0]) + 0.5 * X[:, 1] + 0.05 * r.normal(size=n)


def test_rectangular_blocks_take_the_table_path_under_the_callers_compile_setting(monkeypatch):
    """Each step's K(Z, X_batch) goes to the relu table kernel, unsymmetrised; fit_svgp keeps the compile setting.

    (It used to force ``settings.compile(True)``: a tanh fit then waited 40 s for the compiler
    on its first step. The default ``"auto"`` compiles in the background once it pays.)
    """
    calls = []
    original = deq_kernel.equilibrium.pairs.homogeneous_kernel

    def spy(act, lhs, rhs, *args, **kwargs):
        calls.append((lhs.shape[-2], rhs.shape[-2], kwargs["symmetric"], settings.compile.value()))
        return original(act, lhs, rhs, *args, **kwargs)

    monkeypatch.setattr(deq_kernel.equilibrium.pairs, "homogeneous_kernel", spy)
    monkeypatch.setattr(deq_kernel.equilibrium.dense, "DENSE_PAIRS", 0)  # these small blocks would take it
    X, y = _toy(300)
    x, t = torch.as_tensor(X), torch.as_tensor(y)
    model = SVGPModel(x[:32].clone(), gpytorch.likelihoods.GaussianLikelihood()).double()
    fit_svgp(model, x, t, epochs=1, batch_size=100, initialize=False)
    assert (32, 100, False, "auto") in calls  # K(Z, X_batch): rectangular
    assert (32, 32, True, "auto") in calls  # K(Z, Z): symmetric path
    for choice in (False, True):
        with settings.compile(choice):
            calls.clear()
            fit_svgp(model, x, t, epochs=1, batch_size=100, initialize=False)
            assert calls and all(call[3] is choice for call in calls)  # an explicit choice is kept


def test_regressor_options_progress_and_reproducibility(capsys):
    X, y = _toy()
    options = {"method": "svgp", "n_inducing": 32, "batch_size": 200, "epochs": 3, "random_state": 0}
    reg = DEQGPRegressor(**options).fit(X, y)
    assert capsys.readouterr().err == ""  # silent by default
    assert reg.score(X, y) > 0.9
    assert isinstance(reg.model_, SVGPModel) and reg.model_.inducing_points.shape == (32, 3)
    again = DEQGPRegressor(**options).fit(X, y)
    np.testing.assert_array_equal(reg.predict(X[:20]), again.predict(X[:20]))
    mean, std = reg.predict(X[:20], return_std=True)
    mean2, cov = reg.predict(X[:20], return_cov=True)
    np.testing.assert_allclose(mean, mean2, rtol=1e-10)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), std, rtol=1e-6)
    assert np.isfinite(reg.log_marginal_likelihood_value_) and reg.n_iter_ == 9
    assert repr(reg.kernel_).startswith("0.")  # ConstantKernel * DEQ + WhiteKernel, as with method="exact"

    DEQGPRegressor(**{**options, "verbose": True, "epochs": 2}).fit(X, y)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]  # stderr is not a terminal

    small = DEQGPRegressor(**{**options, "n_inducing": 10_000}).fit(X[:50], y[:50])
    assert small.model_.inducing_points.shape[0] == 50  # no more inducing points than samples
    restored = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(restored.predict(X[:5]), reg.predict(X[:5]))


def test_optimizer_none_holds_the_hyperparameters():
    X, y = _toy(300)
    reg = DEQGPRegressor(
        method="svgp", optimizer=None, n_inducing=16, epochs=2, weight_variance=0.7, noise=0.2, random_state=0
    )
    reg.fit(X, y)
    assert float(reg.model_.covar_module.base_kernel.weight_variance) == pytest.approx(0.7)
    assert float(reg.model_.likelihood.noise) == pytest.approx(0.2)
    learned = DEQGPRegressor(method="svgp", n_inducing=16, epochs=2, weight_variance=0.7, random_state=0).fit(X, y)
    assert float(learned.model_.covar_module.base_kernel.weight_variance) != pytest.approx(0.7)


@pytest.mark.parametrize("Estimator", [DEQGPRegressor, DEQGPClassifier])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("method", "sparse", r"'method' parameter of \w+ must be a str among \{'(exact|svgp)', '(exact|svgp)'\}"),
        ("n_inducing", 0, r"'n_inducing' parameter of \w+ must be an int in the range \[1, inf\)"),
        ("batch_size", 2.5, r"'batch_size' parameter of \w+ must be an int in the range \[1, inf\)"),
        ("epochs", 0, r"'epochs' parameter of \w+ must be an int in the range \[1, inf\)"),
    ],
)
def test_bad_svgp_options(Estimator, option, value, message):
    X, y = _toy(20)
    y = y > 0 if Estimator is DEQGPClassifier else y
    with pytest.raises(ValueError, match=message):
        Estimator(**{"method": "svgp", option: value}).fit(X, y)


def test_model_and_fit_bad_input():
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    with pytest.raises(ValueError, match="inducing_points must be a tensor of shape"):
        SVGPModel(torch.zeros(5), likelihood)
    with pytest.raises(TypeError, match="likelihood must be"):
        SVGPModel(torch.zeros(5, 2), object())
    with pytest.raises(ValueError, match="num_tasks must be"):
        SVGPModel(torch.zeros(5, 2), likelihood, num_tasks=0)
    model = SVGPModel(torch.zeros(5, 2, dtype=torch.float64), likelihood).double()
    x, y = torch.zeros(10, 2, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        fit_svgp(model, x, y, learning_rate=0)
    with pytest.raises(ValueError, match="the same n"):
        fit_svgp(model, x, y[:5])
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit_svgp(model, x, y, epochs=True)
