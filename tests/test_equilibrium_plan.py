"""The plan (deq_kernel.equilibrium.plan): which solver serves a call, forcing one, and the settings that steer it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deq_kernel import equilibrium_covariance, get_activation, settings
from deq_kernel.equilibrium import SOLVERS, pairs, plan
from deq_kernel.sklearn import DEQ


def _chosen(monkeypatch, *args, **kwargs) -> list[str]:
    """The names of the solvers chosen during one call."""
    names = []
    choose = plan.choose

    def spy(*a, **k):
        names.append(choose(*a, **k).name)
        return next(s for s in SOLVERS if s.name == names[-1])

    monkeypatch.setattr(plan, "choose", spy)
    equilibrium_covariance(*args, **kwargs)
    monkeypatch.setattr(plan, "choose", choose)
    return names


def test_the_solver_order_is_the_documented_one():
    assert [s.name for s in SOLVERS] == ["dense", "table", "arcsine", "series", "general"]


@pytest.mark.parametrize(
    ("activation", "n", "batch", "expected"),
    [
        ("relu", 40, (), "dense"),
        ("relu", 400, (), "table"),
        ("abs", 40, (3,), "dense"),
        ("erf", 40, (), "dense"),
        ("erf", 400, (), "arcsine"),
        ("tanh", 40, (), "series"),
        ("gelu", 60, (), "series"),
        ("tanh", 20, (2,), "general"),  # batched: the series solver takes one matrix
        ("sin", 30, (), "general"),
        ("step", 30, (), "general"),
    ],
)
def test_each_call_gets_the_first_solver_that_serves_it(rng, monkeypatch, activation, n, batch, expected):
    x = torch.as_tensor(rng.normal(size=(*batch, n, 3)))
    w = 0.5 * min(get_activation(activation).weight_variance_bound, 2.0)
    weights = torch.full(batch, w, dtype=torch.float64) if batch else w
    assert _chosen(monkeypatch, x, activation=activation, weight_variance=weights, bias_variance=0.1) == [expected]


def test_the_ntk_and_elementwise_pairs_are_planned_too(rng, monkeypatch):
    x = torch.as_tensor(rng.normal(size=(30, 3)))
    z = torch.as_tensor(rng.normal(size=(30, 3)))
    assert set(_chosen(monkeypatch, x, activation="relu", output="ntk")) == {"dense"}
    assert _chosen(monkeypatch, x, z, activation="tanh", weight_variance=0.5, diag=True) == ["general"]


def test_a_forced_solver_that_cannot_serve_says_why(rng):
    x = torch.as_tensor(rng.normal(size=(10, 3)))
    with settings.pair_solver("table"), pytest.raises(ValueError, match="not positively homogeneous"):
        equilibrium_covariance(x, activation="tanh", weight_variance=0.5)
    with settings.pair_solver("series"), pytest.raises(ValueError, match="has no Hermite series"):
        equilibrium_covariance(x, activation="relu")
    with settings.pair_solver("dense"), pytest.raises(ValueError, match="no one-product pair equation"):
        equilibrium_covariance(x, activation="sin", weight_variance=0.5)
    with pytest.raises(ValueError, match="pair_solver must be one of 'auto', 'dense', 'table'"):
        settings.pair_solver("fast")


@pytest.mark.parametrize("name", [s.name for s in SOLVERS])
def test_every_solver_gives_the_same_numbers(rng, name):
    activation = {"arcsine": "erf", "series": "softplus"}.get(name, "relu")
    x = torch.as_tensor(rng.normal(size=(30, 3)))
    kw = dict(activation=activation, weight_variance=0.6, bias_variance=0.2)
    with settings.pair_solver("general"):
        reference = equilibrium_covariance(x, **kw)
    with settings.pair_solver(name):
        ours = equilibrium_covariance(x, **kw)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-11 * float(reference.abs().max()))


def test_broadcast_shapes_agrees_with_torch():
    for shapes in [((3, 1), (1, 4)), ((), (2, 3)), ((5, 1, 1), (4, 1), (1,)), ((2,), (2,))]:
        assert pairs.broadcast_shapes(*shapes) == torch.broadcast_shapes(*shapes)
    with pytest.raises(RuntimeError):
        pairs.broadcast_shapes((2, 3), (4, 3))


@pytest.mark.parametrize(("raw", "expected"), [("1", "True"), ("false", "False"), ("auto", "auto")])
def test_the_compile_default_comes_from_the_environment(raw, expected):
    env = dict(os.environ, DEQ_KERNEL_COMPILE=raw)
    code = "import deq_kernel; print(deq_kernel.settings.compile.value())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_a_bad_compile_environment_variable_is_named():
    env = dict(os.environ, DEQ_KERNEL_COMPILE="sometimes")
    out = subprocess.run([sys.executable, "-c", "import deq_kernel"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "DEQ_KERNEL_COMPILE must be auto, 1, true, 0 or false" in out.stderr


@pytest.mark.parametrize(
    ("activation", "input_variance"),
    [("relu", 1.3), ("relu", np.array([0.5, 1.0, 2.0])), ("leaky_relu", 0.7), ("erf", 1.3), ("erf", 1e12)],
)
def test_scikit_learn_gradients_by_the_dense_solver_equal_the_general_solvers(rng, activation, input_variance):
    # erf at input_variance 1e12 is past its arcsine variable: the dense solver refuses and
    # the general solver serves the call.
    X = rng.normal(size=(25, 3))
    kernel = DEQ(activation=activation, weight_variance=0.5, input_variance=input_variance, bias_variance=0.2)
    K, gradient = kernel(X, eval_gradient=True)
    hypers = kernel._hyperparameter_tensors(3)
    free = [h.name for h in kernel.hyperparameters if not h.fixed]
    K_pairs, jacobian = kernel._jacobian_by_pairs(torch.as_tensor(X), hypers, free, "general")
    scale = torch.cat([hypers[name].reshape(-1) for name in free])
    assert np.allclose(K, K_pairs.numpy(), rtol=1e-14, atol=1e-14 * np.abs(K).max())
    assert np.allclose(gradient, (jacobian * scale).numpy(), rtol=0, atol=1e-12 * np.abs(gradient).max())
