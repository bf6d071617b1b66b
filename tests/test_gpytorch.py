"""DEQKernel in GPyTorch and BoTorch: GPyTorch's kernel suite, routing to the core, hyperparameters,
composition, lazy slicing, fitting, model selection, and real-data classification."""

from __future__ import annotations

import itertools
import math
import pickle
import unittest

import gpytorch
import numpy as np
import pytest
import torch
from gpytorch.constraints import GreaterThan, Interval, Positive
from gpytorch.kernels import AdditiveKernel, MaternKernel, ProductKernel, RBFKernel, ScaleKernel
from gpytorch.likelihoods import DirichletClassificationLikelihood, GaussianLikelihood
from gpytorch.priors import GammaPrior
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from linear_operator.utils.errors import NotPSDError

import deq_kernel
from deq_kernel import DEQKernel
from deq_kernel.gpytorch import (
    WEIGHT_VARIANCE_MARGIN,
    CholeskyMarginalLogLikelihood,
    ExactGPModel,
    FitWarning,
    fit_exact_gp,
)
from deq_kernel.model_selection import KernelRanking, default_candidates, rank_kernels

# --------------------------------------------------------------------------- GPyTorch's own suite


class TestDEQKernelRelu(BaseKernelTestCase, unittest.TestCase):
    """Closed-form dual (relu), with and without ARD."""

    seed = 0

    def create_kernel_no_ard(self, **kwargs):
        return DEQKernel("relu", **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return DEQKernel("relu", ard_num_dims=num_dims, **kwargs)


class TestDEQKernelTanh(BaseKernelTestCase, unittest.TestCase):
    """Quadrature dual (tanh), with and without ARD."""

    seed = 1

    def create_kernel_no_ard(self, **kwargs):
        return DEQKernel("tanh", **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return DEQKernel("tanh", ard_num_dims=num_dims, **kwargs)


# --------------------------------------------------------------------------- routing to the core


def _set(kernel, weight_variance, input_variance, bias_variance):
    kernel.weight_variance = weight_variance
    kernel.input_variance = input_variance
    kernel.bias_variance = bias_variance
    return kernel


@pytest.mark.parametrize("activation", ["relu", "erf", "tanh"])
def test_kernel_is_the_core_covariance(activation):
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    x2 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    iv = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    kernel = _set(DEQKernel(activation, ard_num_dims=4).double(), 0.4, iv, 0.3)
    hypers = dict(activation=activation, weight_variance=0.4, input_variance=iv, bias_variance=0.3)
    expected = deq_kernel.equilibrium_covariance(x1, x2, **hypers)
    torch.testing.assert_close(kernel(x1, x2).to_dense(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kernel(x1).to_dense(), deq_kernel.equilibrium_covariance(x1, **hypers))
    torch.testing.assert_close(kernel(x1, diag=True), deq_kernel.equilibrium_covariance(x1, diag=True, **hypers))
    x3 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kernel(x1, x3, diag=True), torch.diagonal(kernel(x1, x3).to_dense()))


def test_activation_options_reach_the_core():
    x = torch.randn(6, 3, dtype=torch.float64)
    kernel = _set(DEQKernel("leaky_relu", negative_slope=0.3).double(), 1.0, 1.0, 0.1)
    expected = deq_kernel.equilibrium_covariance(
        x, activation="leaky_relu", negative_slope=0.3, weight_variance=1.0, bias_variance=0.1
    )
    torch.testing.assert_close(kernel(x).to_dense(), expected)
    assert kernel.activation.weight_variance_bound == pytest.approx(2.0 / 1.09)


def test_equal_inputs_give_an_exactly_symmetric_matrix():
    x = torch.randn(30, 3, dtype=torch.float64)
    kernel = DEQKernel("erf").double()
    full = kernel(x, x.clone()).to_dense()  # equal values, distinct tensors: the symmetric path
    assert torch.equal(full, full.mT)


def test_gradients_reach_inputs_and_every_raw_parameter():
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    kernel = ScaleKernel(DEQKernel("relu", ard_num_dims=3)).double()
    kernel(x).to_dense().sum().backward()
    for name, p in kernel.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_raw_parameter_gradients_match_finite_differences():
    x = torch.randn(6, 2, dtype=torch.float64)
    kernel = _set(DEQKernel("relu", ard_num_dims=2).double(), 1.2, torch.tensor([0.7, 1.4]), 0.2)
    names = ["raw_weight_variance", "raw_input_variance", "raw_bias_variance"]
    raws = [getattr(kernel, n).detach().clone().requires_grad_(True) for n in names]

    def f(*raw):
        w = kernel.raw_weight_variance_constraint.transform(raw[0]).squeeze(-1)
        iv = kernel.raw_input_variance_constraint.transform(raw[1]).squeeze(-2)
        b = kernel.raw_bias_variance_constraint.transform(raw[2]).squeeze(-1)
        return deq_kernel.equilibrium_covariance(x, weight_variance=w, input_variance=iv, bias_variance=b)

    assert torch.autograd.gradcheck(f, raws)
    # and the kernel sends the same gradient to its own raw parameters
    kernel(x).to_dense().sum().backward()
    expected = torch.autograd.grad(f(*raws).sum(), raws)
    for name, grad in zip(names, expected, strict=True):
        torch.testing.assert_close(getattr(kernel, name).grad, grad)


# --------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(("activation", "initial"), [("relu", 1.0), ("tanh", 0.5), ("erf", math.pi / 8), ("step", 1.0)])
def test_defaults(activation, initial):
    kernel = DEQKernel(activation)
    assert kernel.weight_variance.item() == pytest.approx(initial, rel=1e-6)
    assert kernel.input_variance.shape == (1, 1) and kernel.input_variance.item() == pytest.approx(1.0)
    assert kernel.bias_variance.item() == pytest.approx(0.1)
    bound = deq_kernel.get_activation(activation).weight_variance_bound
    constraint = kernel.raw_weight_variance_constraint
    if math.isfinite(bound):
        assert isinstance(constraint, Interval)
        assert constraint.upper_bound.item() == pytest.approx(bound * (1 - WEIGHT_VARIANCE_MARGIN))
        assert constraint.upper_bound.item() < bound
    else:
        assert isinstance(constraint, Positive)
    assert not kernel.is_stationary
    assert not hasattr(kernel, "raw_outputscale")  # ScaleKernel owns the output scale


def test_the_optimiser_cannot_leave_the_well_posed_range():
    kernel = DEQKernel("relu")
    with torch.no_grad():
        kernel.raw_weight_variance.fill_(1e4)
    assert 0 < kernel.weight_variance.item() < 2.0
    kernel(torch.randn(5, 2)).to_dense()  # still evaluates


def test_setters_shapes_and_ard():
    kernel = DEQKernel("relu", ard_num_dims=3, batch_shape=torch.Size([2]))
    assert kernel.raw_weight_variance.shape == (2, 1)
    assert kernel.raw_input_variance.shape == (2, 1, 3)
    assert kernel.raw_bias_variance.shape == (2, 1)
    kernel.input_variance = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(kernel.input_variance, torch.tensor([0.5, 1.0, 2.0]).expand(2, 1, 3))
    kernel.weight_variance = torch.tensor([[0.5], [1.5]])
    torch.testing.assert_close(kernel.weight_variance, torch.tensor([[0.5], [1.5]]))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("weight_variance", 2.0),
        ("weight_variance", 1.99),
        ("weight_variance", 0.0),
        ("weight_variance", float("nan")),
        ("input_variance", -1.0),
        ("input_variance", 0.0),
        ("bias_variance", -0.5),
    ],
)
def test_setter_outside_the_range_raises(name, value):
    kernel = DEQKernel("relu")
    before = getattr(kernel, name).detach().clone()
    with pytest.raises(ValueError, match=name):
        setattr(kernel, name, value)
    torch.testing.assert_close(getattr(kernel, name), before)  # unchanged


def test_weight_variance_setter_names_the_activation_bound():
    with pytest.raises(ValueError, match=r"'tanh'.*weight_variance < 1"):
        DEQKernel("tanh").weight_variance = 1.2


def test_constraints_are_checked():
    with pytest.raises(ValueError, match="weight_variance_constraint"):
        DEQKernel("relu", weight_variance_constraint=Positive())  # reaches past 2
    with pytest.raises(ValueError, match="weight_variance_constraint"):
        DEQKernel("relu", weight_variance_constraint=Interval(0.0, 2.5))
    with pytest.raises(TypeError, match="input_variance_constraint"):
        DEQKernel("relu", input_variance_constraint="positive")
    with pytest.raises(ValueError, match="bias_variance_constraint"):
        DEQKernel("relu", bias_variance_constraint=GreaterThan(-1.0))
    kernel = DEQKernel("relu", weight_variance_constraint=Interval(0.5, 1.5))
    assert kernel.weight_variance.item() == pytest.approx(1.0)
    DEQKernel("step", weight_variance_constraint=Positive())  # no bound: accepted


def test_priors_are_registered_and_used():
    kernel = DEQKernel(
        "relu",
        weight_variance_prior=GammaPrior(2.0, 2.0),
        input_variance_prior=GammaPrior(3.0, 3.0),
        bias_variance_prior=GammaPrior(1.0, 10.0),
    )
    names = {name for name, *_ in kernel.named_priors()}
    assert names == {"weight_variance_prior", "input_variance_prior", "bias_variance_prior"}
    for name, _, prior, closure, setter in kernel.named_priors():
        value = closure(kernel)
        assert torch.isfinite(prior.log_prob(value)).all(), name
        setter(kernel, value * 0.5)
    assert kernel.weight_variance.item() == pytest.approx(0.5)
    with pytest.raises(TypeError, match="weight_variance_prior"):
        DEQKernel("relu", weight_variance_prior=0.5)


def test_bad_arguments_raise_with_their_names():
    with pytest.raises(ValueError, match="activation"):
        DEQKernel("no-such-activation")
    with pytest.raises(TypeError, match="foo"):
        DEQKernel("relu", foo=1.0)
    with pytest.raises(ValueError, match="ard_num_dims"):
        DEQKernel("relu", ard_num_dims=0)
    with pytest.raises(TypeError, match="ard_num_dims"):
        DEQKernel("relu", ard_num_dims=2.5)


def test_bad_inputs_raise_with_their_names():
    kernel = DEQKernel("relu", ard_num_dims=3)
    with pytest.raises(RuntimeError, match="ard_num_dims"):  # GPyTorch's own check (debug mode)
        kernel(torch.randn(4, 2)).to_dense()
    with gpytorch.settings.debug(False), pytest.raises(ValueError, match="ard_num_dims=3"):
        kernel(torch.randn(4, 2)).to_dense()
    x = torch.randn(4, 3)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x1.*NaN"):
        kernel(x).to_dense()
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel(torch.randn(4, 3), last_dim_is_batch=True)  # at once, not when evaluated
    with pytest.raises(ValueError, match="last_dim_is_batch"):
        kernel.forward(torch.randn(4, 3), torch.randn(4, 3), last_dim_is_batch=True)
    with pytest.raises(TypeError, match="x1"):
        DEQKernel("relu").forward(torch.randn(4, 3, dtype=torch.float16), torch.randn(4, 3, dtype=torch.float16))


# --------------------------------------------------------------------------- batches, dtypes, pickling


@pytest.mark.parametrize("batch_shape", [torch.Size([]), torch.Size([2]), torch.Size([3, 2])])
@pytest.mark.parametrize("ard", [False, True])
def test_batch_hyperparameters_match_per_batch_kernels(batch_shape, ard):
    d = 3
    g = torch.Generator().manual_seed(5)
    kernel = DEQKernel("relu", ard_num_dims=d if ard else None, batch_shape=batch_shape).double()
    numel = max(1, math.prod(batch_shape))
    w = torch.linspace(0.3, 1.7, numel, dtype=torch.float64).reshape(*batch_shape, 1)
    iv = torch.rand(*batch_shape, 1, d if ard else 1, generator=g, dtype=torch.float64) + 0.5
    b = torch.linspace(0.05, 0.5, numel, dtype=torch.float64).reshape(*batch_shape, 1)
    _set(kernel, w, iv, b)
    x = torch.randn(*batch_shape, 6, d, generator=g, dtype=torch.float64)
    full = kernel(x).to_dense()
    diag = kernel(x, diag=True)
    assert full.shape == (*batch_shape, 6, 6) and diag.shape == (*batch_shape, 6)
    for index in np.ndindex(*batch_shape):
        single = _set(DEQKernel("relu", ard_num_dims=d if ard else None).double(), w[index], iv[index], b[index])
        torch.testing.assert_close(full[index], single(x[index]).to_dense())
        torch.testing.assert_close(diag[index], single(x[index], diag=True))


def test_non_batch_kernel_broadcasts_over_batched_inputs():
    kernel = DEQKernel("erf").double()
    x = torch.randn(3, 2, 5, 2, dtype=torch.float64)
    full = kernel(x).to_dense()
    assert full.shape == (3, 2, 5, 5)
    torch.testing.assert_close(full[2, 1], kernel(x[2, 1]).to_dense())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_dtype(dtype):
    kernel = ScaleKernel(DEQKernel("relu", ard_num_dims=2)).to(dtype=dtype)
    assert kernel.dtype == dtype
    assert all(p.dtype == dtype for p in kernel.parameters())
    x = torch.randn(5, 2, dtype=dtype)
    out = kernel(x).to_dense()
    assert out.dtype == dtype
    reference = ScaleKernel(DEQKernel("relu", ard_num_dims=2)).double()(x.double()).to_dense()
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_pickle_round_trip(activation):
    kernel = ScaleKernel(DEQKernel(activation, ard_num_dims=2, weight_variance_prior=GammaPrior(2.0, 4.0))).double()
    kernel.base_kernel.weight_variance = 0.3
    x = torch.randn(6, 2, dtype=torch.float64)
    clone = pickle.loads(pickle.dumps(kernel))
    torch.testing.assert_close(clone(x).to_dense(), kernel(x).to_dense())
    assert clone.base_kernel.weight_variance.item() == pytest.approx(0.3)
    assert clone.base_kernel.activation.name == activation


# --------------------------------------------------------------------------- composition and laziness


def test_composition_with_scale_additive_and_product_kernels():
    x = torch.randn(9, 3, dtype=torch.float64)
    deq = _set(DEQKernel("relu").double(), 1.3, 0.8, 0.2)
    rbf = RBFKernel().double()
    scaled = ScaleKernel(deq).double()
    scaled.outputscale = 2.5
    k_deq, k_rbf = deq(x).to_dense(), rbf(x).to_dense()
    torch.testing.assert_close(scaled(x).to_dense(), 2.5 * k_deq)
    torch.testing.assert_close(AdditiveKernel(deq, rbf)(x).to_dense(), k_deq + k_rbf)
    torch.testing.assert_close(ProductKernel(deq, rbf)(x).to_dense(), k_deq * k_rbf)
    torch.testing.assert_close((deq + rbf)(x, diag=True), torch.diagonal(k_deq + k_rbf))
    # active_dims: a DEQ kernel on two of the three columns
    part = _set(DEQKernel("relu", active_dims=[0, 2]).double(), 1.3, 0.8, 0.2)
    torch.testing.assert_close(part(x).to_dense(), deq(x[:, [0, 2]]).to_dense())


class _Recorder(DEQKernel):
    """Records the shapes that forward is called with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def forward(self, x1, x2, diag=False, **params):
        self.calls.append((tuple(x1.shape), tuple(x2.shape), diag))
        return super().forward(x1, x2, diag=diag, **params)


def test_lazy_slicing_computes_only_the_rows_it_needs():
    x = torch.randn(40, 3, dtype=torch.float64)
    kernel = _Recorder("relu").double()
    lazy = kernel(x)
    assert kernel.calls == []  # nothing computed yet
    block = lazy[5:9, 20:27].to_dense()
    assert kernel.calls == [((4, 3), (7, 3), False)]
    torch.testing.assert_close(block, DEQKernel("relu").double()(x).to_dense()[5:9, 20:27])


def test_exact_gp_prediction_never_forms_the_joint_matrix():
    g = torch.Generator().manual_seed(0)
    train_x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    train_y = train_x.sum(-1).sin()
    test_x = torch.randn(7, 2, generator=g, dtype=torch.float64)
    recorder = _Recorder("relu")
    model = ExactGPModel(train_x, train_y, GaussianLikelihood(), covar_module=ScaleKernel(recorder)).double()
    model.eval()
    with torch.no_grad():
        posterior = model(test_x)
        posterior.mean, posterior.variance
    sizes = {(a[0], b[0]) for a, b, _ in recorder.calls}
    assert sizes <= {(7, 30), (30, 30), (7, 7)}  # the (train + test) joint matrix is never evaluated
    assert (7, 30) in sizes and (30, 30) in sizes


# --------------------------------------------------------------------------- fitting


def _regression_data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.relu(x[:, 0]) - 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def _lml(model):
    """Total log marginal likelihood at the model's current hyperparameters."""
    model.train()
    model.likelihood.train()
    x, y = model.train_inputs[0], model.train_targets
    with torch.no_grad():
        value = CholeskyMarginalLogLikelihood(model.likelihood, model)(model(x), y).sum()
    return float(value) * y.shape[-1]


def test_cholesky_marginal_likelihood_equals_gpytorchs():
    x, y = _regression_data()
    for build in (
        lambda: ExactGPModel(x, y, GaussianLikelihood(), ard=True).double(),
        lambda: _dirichlet_model(x, (y > 0).long()),
    ):
        model = build()
        model.train()
        values, grads = [], []
        for cls in (gpytorch.mlls.ExactMarginalLogLikelihood, CholeskyMarginalLogLikelihood):
            model.zero_grad()
            with gpytorch.settings.max_cholesky_size(10_000):
                value = cls(model.likelihood, model)(model(x), model.train_targets).sum()
            value.backward()
            values.append(value.item())
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        assert values[0] == pytest.approx(values[1], rel=1e-12)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def _dirichlet_model(x, labels, **kernel_kwargs):
    likelihood = DirichletClassificationLikelihood(labels, learn_additional_noise=True, dtype=torch.float64)
    num_classes = likelihood.num_classes
    covar = ScaleKernel(DEQKernel("relu", **kernel_kwargs), batch_shape=torch.Size([num_classes]))
    return ExactGPModel(
        x, likelihood.transformed_targets, likelihood, covar_module=covar, batch_shape=torch.Size([num_classes])
    ).double()


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_fit_exact_gp_raises_the_marginal_likelihood(optimizer):
    x, y = _regression_data()
    model = ExactGPModel(x, y, GaussianLikelihood()).double()
    before = _lml(model)
    result = fit_exact_gp(model, optimizer=optimizer, max_iter=60, patience=5)
    assert not model.training and not model.likelihood.training
    assert result.log_marginal_likelihood > before + 5.0
    assert result.log_marginal_likelihood == pytest.approx(_lml(model), rel=1e-9)  # the kept point
    assert result.log_marginal_likelihood == pytest.approx(max(result.history))
    assert 1 <= result.n_iter <= 60 and result.n_evaluations == len(result.history)
    # The fitted values by name, as the model holds them, and in the repr (the history is not).
    base = model.covar_module.base_kernel
    fitted = result.hyperparameters
    assert fitted["covar_module.base_kernel.weight_variance"] == base.weight_variance.item()
    assert fitted["likelihood.noise_covar.noise"] == model.likelihood.noise.item()
    assert fitted["covar_module.outputscale"] == model.covar_module.outputscale.item()
    text = repr(result)
    assert f"weight_variance={base.weight_variance.item():.4g}" in text and "history" not in text


def test_adam_stops_early():
    x, y = _regression_data()
    model = ExactGPModel(x, y, GaussianLikelihood()).double()
    result = fit_exact_gp(model, optimizer="adam", max_iter=2000, tol=1e-3, patience=3)
    assert result.converged and result.n_iter < 2000


def test_fit_exact_gp_survives_failed_evaluations(monkeypatch):
    x, y = _regression_data()
    model = ExactGPModel(x, y, GaussianLikelihood()).double()
    calls = {"n": 0}
    original = CholeskyMarginalLogLikelihood.forward

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise NotPSDError("not positive definite")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CholeskyMarginalLogLikelihood, "forward", flaky)
    with pytest.warns(FitWarning, match="could not be evaluated"):
        result = fit_exact_gp(model, optimizer="adam", max_iter=50)
    assert result.n_evaluations == 3 and math.isfinite(result.log_marginal_likelihood)
    monkeypatch.setattr(CholeskyMarginalLogLikelihood, "forward", lambda *a, **k: (_ for _ in ()).throw(NotPSDError()))
    with pytest.raises(RuntimeError, match="initial point"):
        fit_exact_gp(ExactGPModel(x, y, GaussianLikelihood()).double())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "sgd"}, "optimizer"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1.0}, "tol"),
        ({"patience": 0}, "patience"),
        ({"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_fit_exact_gp_bad_arguments(kwargs, match):
    x, y = _regression_data(10)
    with pytest.raises(ValueError, match=match):
        fit_exact_gp(ExactGPModel(x, y, GaussianLikelihood()).double(), **kwargs)


def test_float32_training():
    x, y = _regression_data()
    model = ExactGPModel(x.float(), y.float(), GaussianLikelihood())
    result = fit_exact_gp(model, max_iter=30)
    assert math.isfinite(result.log_marginal_likelihood)
    assert model.covar_module.base_kernel.weight_variance.dtype == torch.float32


def test_hyperparameter_recovery_from_a_deq_gp_prior():
    """Data drawn from the DEQ-GP prior: the fit beats the true hyperparameters and RBF in marginal likelihood."""
    n, noise = 500, 0.05
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    truth = {"weight_variance": 1.5, "input_variance": 1.0, "bias_variance": 0.2}
    k = deq_kernel.equilibrium_covariance(x, activation="relu", **truth)
    y = torch.linalg.cholesky(k + noise * torch.eye(n, dtype=torch.float64)) @ torch.randn(
        n, generator=g, dtype=torch.float64
    )

    at_truth = ExactGPModel(x, y, GaussianLikelihood()).double()
    _set(at_truth.covar_module.base_kernel, **truth)
    at_truth.covar_module.outputscale = 1.0
    at_truth.likelihood.noise = noise
    at_truth.mean_module.constant = 0.0
    lml_truth = _lml(at_truth)

    fitted = ExactGPModel(x, y, GaussianLikelihood()).double()
    result = fit_exact_gp(fitted)
    rbf = ExactGPModel(x, y, GaussianLikelihood(), covar_module=ScaleKernel(RBFKernel())).double()
    lml_rbf = fit_exact_gp(rbf).log_marginal_likelihood

    assert result.log_marginal_likelihood >= lml_truth
    assert result.log_marginal_likelihood > lml_rbf + 10.0
    assert fitted.likelihood.noise.item() == pytest.approx(noise, rel=0.25)


# --------------------------------------------------------------------------- model selection


def test_rank_kernels_table():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 2, generator=g, dtype=torch.float64)
    k = deq_kernel.equilibrium_covariance(x, weight_variance=1.5, bias_variance=0.1)
    f = torch.linalg.cholesky(k + 1e-8 * torch.eye(90, dtype=torch.float64)) @ torch.randn(
        90, generator=g, dtype=torch.float64
    )
    y = f + 0.05 * torch.randn(90, generator=g, dtype=torch.float64)
    candidates = {"DEQ(relu)": DEQKernel("relu"), "RBF": lambda: RBFKernel(), "Matern-1/2": MaternKernel(nu=0.5)}
    original = candidates["DEQ(relu)"].weight_variance.item()
    table = rank_kernels(x[:60], y[:60], candidates, test_x=x[60:], test_y=f[60:], max_iter=40)

    assert isinstance(table, KernelRanking) and len(table) == 3
    assert [row.rank for row in table] == [1, 2, 3]
    lmls = [row.log_marginal_likelihood for row in table]
    assert lmls == sorted(lmls, reverse=True)
    assert table.best is table[0] and table.best.name == "DEQ(relu)"
    deq_row = next(row for row in table if row.name == "DEQ(relu)")
    assert {"weight_variance", "input_variance", "bias_variance", "outputscale", "noise"} <= set(
        deq_row.hyperparameters
    )
    assert deq_row.n_parameters == 6
    assert all(row.test_rmse is not None and row.test_rmse < 1.0 and row.test_nlpd is not None for row in table)
    assert candidates["DEQ(relu)"].weight_variance.item() == original  # candidates are copied
    text = str(table)
    assert text.splitlines()[0].split()[:3] == ["rank", "kernel", "log"]
    assert all(name in text for name in ("DEQ(relu)", "RBF", "Matern-1/2", "weight_variance="))
    # a fitted model comes with each row
    with torch.no_grad():
        assert table.best.model(x[60:]).mean.shape == (30,)


def test_rank_kernels_to_pandas():
    x, y = _regression_data(30)
    table = rank_kernels(x, y, {"RBF": RBFKernel()}, max_iter=5)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            table.to_pandas()
    else:
        frame = table.to_pandas()
        assert list(frame.index) == [1] and frame.loc[1, "name"] == "RBF"


def test_rank_kernels_bad_input():
    x, y = _regression_data(20)
    with pytest.raises(ValueError, match="train_x"):
        rank_kernels(x, y[:10])
    with pytest.raises(ValueError, match="together"):
        rank_kernels(x, y, test_x=x)
    with pytest.raises(TypeError, match="not a gpytorch Kernel"):
        rank_kernels(x, y, {"bad": lambda: "rbf"})
    with pytest.raises(ValueError, match="at least one"):
        rank_kernels(x, y, {})
    assert set(default_candidates()) == {"DEQ(relu)", "DEQ(erf)", "DEQ(sin)", "RBF", "Matern-5/2"}


# --------------------------------------------------------------------------- real data


def test_digits_dirichlet_classification():
    """Exact GP classification with the Dirichlet likelihood on scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=500, random_state=0, stratify=y)
    scaler = StandardScaler().fit(X_train)
    x_train, x_test = (torch.as_tensor(scaler.transform(a)) for a in (X_train, X_test))
    model = _dirichlet_model(x_train, torch.as_tensor(y_train))
    fit_exact_gp(model)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
        predicted = model(x_test).mean.argmax(0).numpy()  # (num_classes, n) latent means
    accuracy = float(np.mean(predicted == y_test))
    assert accuracy >= 0.97, accuracy


# --------------------------------------------------------------------------- BoTorch


def test_botorch_bayesian_optimisation_on_hartmann6():
    pytest.importorskip("botorch", reason="BoTorch is an optional extra (pip install 'deq-kernel[botorch]')")
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from botorch.test_functions import Hartmann
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(0)
    problem = Hartmann(dim=6, negate=True)
    bounds = torch.stack([torch.zeros(6), torch.ones(6)]).double()
    X = torch.rand(10, 6, dtype=torch.float64)
    Y = problem(X).unsqueeze(-1)
    for iteration in range(3):
        model = SingleTaskGP(X, Y, covar_module=ScaleKernel(DEQKernel("relu", ard_num_dims=6)))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        assert isinstance(model.covar_module.base_kernel, DEQKernel)
        sampler = SobolQMCNormalSampler(torch.Size([64]), seed=iteration)
        acqf = qLogNoisyExpectedImprovement(model, X_baseline=X, sampler=sampler)

        # gradients flow through the kernel to the q candidate points
        start = torch.rand(4, 2, 6, dtype=torch.float64, requires_grad=True)
        values = acqf(start)
        values.sum().backward()
        assert torch.isfinite(start.grad).all() and (start.grad.abs().sum(dim=(-2, -1)) > 0).all()

        candidates, value = optimize_acqf(
            acqf, bounds=bounds, q=2, num_restarts=4, raw_samples=64, options={"maxiter": 50, "batch_limit": 4}
        )
        assert candidates.shape == (2, 6) and (candidates >= 0).all() and (candidates <= 1).all()
        assert value.item() >= values.max().item() - 1e-9  # gradient ascent beat random starting points
        X = torch.cat([X, candidates])
        Y = torch.cat([Y, problem(candidates).unsqueeze(-1)])
    assert X.shape == (16, 6)


# --------------------------------------------------------------------------- kernel="ntk"


def test_ntk_kernel_is_the_core_ntk():
    torch.manual_seed(3)
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    kernel = DEQKernel("tanh", kernel="ntk", ard_num_dims=3).double()
    kernel.weight_variance, kernel.input_variance, kernel.bias_variance = 0.4, torch.tensor([0.5, 1.0, 2.0]), 0.3
    hypers = dict(
        activation="tanh", weight_variance=0.4, input_variance=torch.tensor([0.5, 1.0, 2.0]), bias_variance=0.3
    )
    with torch.no_grad():
        expected = deq_kernel.equilibrium_covariance(x1, x2, output="ntk", **hypers)
        assert torch.allclose(kernel(x1, x2).to_dense(), expected, rtol=1e-10, atol=0)
        assert torch.allclose(
            kernel(x1, diag=True), deq_kernel.equilibrium_covariance(x1, diag=True, output="ntk", **hypers)
        )
        nngp = DEQKernel("tanh", ard_num_dims=3).double()
        nngp.load_state_dict(kernel.state_dict())
        assert not torch.allclose(nngp(x1).to_dense(), kernel(x1).to_dense())
    # ScaleKernel's outputscale is the output variance of the NTK
    scaled = ScaleKernel(kernel).double()
    scaled.outputscale = 2.5
    with torch.no_grad():
        theta = deq_kernel.equilibrium_covariance(x1, output="ntk", output_variance=2.5, **hypers)
        assert torch.allclose(scaled(x1).to_dense(), theta, rtol=1e-10)


def test_ntk_kernel_gradients_pickle_and_model():
    torch.manual_seed(4)
    x = torch.randn(8, 2, dtype=torch.float64)
    y = torch.sin(x[:, 0])
    model = ExactGPModel(x, y, GaussianLikelihood(), kernel="ntk").double()
    assert model.covar_module.base_kernel.kernel == "ntk"
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    loss = -mll(model(x), y)
    loss.backward()
    base = model.covar_module.base_kernel
    for p in (base.raw_weight_variance, base.raw_input_variance, base.raw_bias_variance):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    restored = pickle.loads(pickle.dumps(base))
    assert restored.kernel == "ntk"
    with torch.no_grad():
        assert torch.equal(restored(x).to_dense(), base(x).to_dense())
    result = fit_exact_gp(model, max_iter=20)
    assert math.isfinite(result.log_marginal_likelihood)


def test_ntk_kernel_bad_values():
    for bad in ("NTK", "tangent", None, 1):
        with pytest.raises(ValueError, match="kernel must be one of 'nngp', 'ntk'"):
            DEQKernel(kernel=bad)
    with pytest.raises(ValueError, match="step"):
        DEQKernel("step", kernel="ntk")


def test_the_cholesky_marginal_likelihood_refuses_second_derivatives():
    # Its closed-form gradient is not differentiable: d^2/d raw_noise^2 came out -0.0949
    # where GPyTorch's own marginal likelihood gives 0.000153 (RBF, n = 12).
    torch.manual_seed(0)
    x = torch.randn(12, 2, dtype=torch.float64)
    y = torch.sin(x[:, 0])
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = ExactGPModel(x, y, likelihood, covar_module=gpytorch.kernels.RBFKernel().double()).double()
    model.train()
    raw = likelihood.noise_covar.raw_noise
    for mll_class, fails in ((CholeskyMarginalLogLikelihood, True), (gpytorch.mlls.ExactMarginalLogLikelihood, False)):
        mll = mll_class(likelihood, model)
        (grad,) = torch.autograd.grad(mll(model(x), y), raw, create_graph=not fails)
        if fails:
            with pytest.raises(RuntimeError, match="first derivatives only"):
                torch.autograd.grad(mll(model(x), y), raw, create_graph=True)
        else:
            assert torch.isfinite(torch.autograd.grad(grad.sum(), raw)[0]).all()


def test_non_finite_hyperparameters_raise_an_error_fitting_routines_catch():
    # An optimiser step that left the range (NaN raw parameters) raised a plain ValueError,
    # which BoTorch's fit_gpytorch_mll does not catch: the whole BO loop died. It is now also
    # linear_operator's NotPSDError, the numerical failure the fitting routines retry on.
    from deq_kernel.gpytorch import NonFiniteHyperparameterError

    kernel = DEQKernel().double()
    x = torch.randn(5, 2, dtype=torch.float64)
    for name in ("raw_weight_variance", "raw_input_variance", "raw_bias_variance"):
        clone = pickle.loads(pickle.dumps(kernel))
        with torch.no_grad():
            getattr(clone, name).fill_(float("nan"))
        for error in (NonFiniteHyperparameterError, ValueError, NotPSDError):
            with pytest.raises(error, match="hyperparameters must be finite"):
                clone(x).to_dense()
    # fit_exact_gp reads it as a failed point and keeps the best one seen.
    y = torch.sin(x[:, 0])
    model = ExactGPModel(x, y, GaussianLikelihood()).double()
    calls = {"n": 0}
    forward = DEQKernel.forward

    def sometimes_nan(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise NonFiniteHyperparameterError("hyperparameters must be finite (simulated)")
        return forward(self, *args, **kwargs)

    with unittest.mock.patch.object(DEQKernel, "forward", sometimes_nan):
        result = fit_exact_gp(model, max_iter=10)
    assert math.isfinite(result.log_marginal_likelihood) and calls["n"] > 3


def test_hyperparameters_a_users_constraint_allows_are_checked_once_with_the_cores_messages():
    # The kernel checks its hyperparameters itself (one synchronisation) and hands them to the
    # core unchecked. Constraints that allow negative variances or the bound are refused when
    # it is built; one registered afterwards (GPyTorch's register_constraint) may still let the
    # weight variance reach the bound, which the call refuses with the core's message.
    x = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="must not allow negative values"):
        DEQKernel(input_variance_constraint=Interval(-1.0, 1.0))
    at_bound = DEQKernel("erf").double()
    at_bound.register_constraint("raw_weight_variance", Interval(0.0, 2.0))
    at_bound.double()
    at_bound.weight_variance = torch.tensor(math.pi / 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight_variance must be < 0\.785398 for activation 'erf'"):
        at_bound(x).to_dense()
    # In range, the kernel is the public function's.
    fine = DEQKernel("erf").double()
    hypers = {
        name: getattr(fine, name).detach().reshape(())
        for name in ("weight_variance", "input_variance", "bias_variance")
    }
    expected = deq_kernel.equilibrium_covariance(x, activation="erf", **hypers)
    assert torch.equal(fine(x).to_dense().detach(), expected)


def test_botorch_batched_models_fantasies_and_shape_errors():
    pytest.importorskip("botorch", reason="BoTorch is an optional extra (pip install 'deq-kernel[botorch]')")
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.sampling import SobolQMCNormalSampler

    torch.manual_seed(0)
    X = torch.rand(3, 10, 2, dtype=torch.float64)
    Y = X.sum(-1, keepdim=True)
    batch = torch.Size([3])
    covar = ScaleKernel(DEQKernel(ard_num_dims=2, batch_shape=batch), batch_shape=batch)
    gp = SingleTaskGP(X, Y, covar_module=covar)
    fit_gpytorch_mll(gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp))
    test = torch.rand(3, 4, 2, dtype=torch.float64)
    assert gp.posterior(test).mean.shape == (3, 4, 1)
    fantasy = gp.fantasize(torch.rand(3, 2, 2, dtype=torch.float64), sampler=SobolQMCNormalSampler(torch.Size([4])))
    assert fantasy.posterior(test).mean.shape == (4, 3, 4, 1)
    two = SingleTaskGP(X[0], torch.cat([Y[0], -Y[0]], -1), covar_module=ScaleKernel(DEQKernel(ard_num_dims=2)))
    assert two.posterior(test[0]).mean.shape == (4, 2)
    with pytest.raises(ValueError, match="ard_num_dims=3, got inputs with 2 features"):
        SingleTaskGP(X[0], Y[0], covar_module=ScaleKernel(DEQKernel(ard_num_dims=3))).posterior(test[0]).mean
    with pytest.raises(ValueError, match=r"batch_shape=\(5,\), which the batch dimensions \(3,\) of x1"):
        DEQKernel(batch_shape=torch.Size([5])).double()(X).to_dense()


_QUADRATURE = ("tanh", "sigmoid", "softplus", "silu")
#: Raw values from -1e3 to 1e3 reach both ends of every constraint (variances at 0, the weight
#: variance at its upper constraint): where BO fits were seen to end up.
_RAW_FULL = (-1e3, -30.0, 0.0, 30.0, 1e3)


@pytest.mark.parametrize(
    ("activation", "raws"),
    [(a, _RAW_FULL) for a in deq_kernel.ACTIVATIONS if a not in _QUADRATURE]
    + [(a, (-1e3, 0.0)) for a in _QUADRATURE]
    # The quadrature activations at large variances (raw 30 and 1e3: input variances of 30 and
    # 1000) take 40-110 s each on 2 cores: the long run only.
    + [pytest.param(a, _RAW_FULL, marks=pytest.mark.slow, id=f"{a}-full") for a in _QUADRATURE],
)
def test_marginal_likelihood_and_gradient_are_finite_across_the_constrained_range(activation, raws, request):
    if raws is _RAW_FULL and activation in _QUADRATURE:
        request.getfixturevalue("slow_selected")
    torch.manual_seed(0)
    x = torch.rand(12, 3, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0]) + x[:, 1]
    names = ("raw_weight_variance", "raw_input_variance", "raw_bias_variance")
    for ard, raw, which in itertools.product((False, True), raws, (*names, "all")):
        likelihood = GaussianLikelihood().double()
        model = ExactGPModel(x, y, likelihood, activation=activation, ard=ard).double()
        base = model.covar_module.base_kernel
        with torch.no_grad():
            for name in names if which == "all" else (which,):
                getattr(base, name).fill_(raw)
        model.train()
        loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
        loss.backward()
        case = (activation, ard, raw, which)
        assert math.isfinite(loss.item()), case
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None), case


def test_lbfgs_out_of_evaluations_is_not_reported_converged(monkeypatch):
    # L-BFGS stops below max_iter both when it meets its tolerances and when its evaluation
    # budget runs out; only the first is convergence.
    original = torch.optim.LBFGS

    class Starved(original):
        def __init__(self, params, **options):
            super().__init__(params, **{**options, "max_eval": 4})

    torch.manual_seed(0)
    x = torch.randn(20, 2, dtype=torch.float64)
    y = torch.sin(2 * x[:, 0])
    model = ExactGPModel(x, y, GaussianLikelihood()).double()
    monkeypatch.setattr(torch.optim, "LBFGS", Starved)
    result = fit_exact_gp(model, max_iter=50)
    assert result.n_iter < 50 and result.n_evaluations <= 5
    assert not result.converged
    monkeypatch.setattr(torch.optim, "LBFGS", original)
    model = ExactGPModel(x, y, GaussianLikelihood()).double()
    assert fit_exact_gp(model, max_iter=200, tol=1e-4).converged  # tolerances met: converged


def test_a_state_saved_from_another_activation_is_refused_and_nothing_is_loaded():
    # An erf state loaded into a relu kernel brought erf's weight-variance bound with it.
    relu, erf = DEQKernel("relu"), DEQKernel("erf")
    before = {k: v.clone() for k, v in relu.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"DEQKernel\(activation='relu'\) has a weight_variance constraint .*1\.98"):
        relu.load_state_dict(erf.state_dict())
    assert all(torch.equal(before[k], v) for k, v in relu.state_dict().items())
    with pytest.raises(RuntimeError, match="saved from a kernel with another activation"):
        ScaleKernel(DEQKernel("relu")).load_state_dict(ScaleKernel(DEQKernel("tanh")).state_dict())
    # The same activation loads, through a ScaleKernel too.
    saved = DEQKernel("erf")
    saved.weight_variance, saved.bias_variance = 0.3, 0.7
    erf.load_state_dict(saved.state_dict())
    assert erf.weight_variance.item() == pytest.approx(0.3) and erf.bias_variance.item() == pytest.approx(0.7)
