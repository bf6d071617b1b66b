"""equilibrium_covariance against the Picard reference, its properties, gradients and errors."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from conftest import rel_err
from reference import CLOSED_FORMS, closed_form_dual, picard_kernel

import deq_kernel
from deq_kernel import ACTIVATIONS, equilibrium_covariance
from deq_kernel import functional as functional_module

CLOSED = [
    ("relu", 1.0, {}),
    ("relu", 1.9, {}),  # near the bound 2
    ("leaky_relu", 1.5, {"negative_slope": 0.2}),
    ("abs", 0.95, {}),
    ("identity", 0.8, {}),
    ("step", 3.0, {}),
    ("erf", 0.75, {}),  # bound pi/4 = 0.785
    ("sin", 0.9, {}),
    ("cos", 1.9, {}),
    ("gelu", 1.0, {}),
]
QUADRATURE = [("tanh", 0.95, {}), ("sigmoid", 8.0, {}), ("softplus", 1.2, {}), ("silu", 1.0, {})]


def _reference(x1, x2, name, w, kwargs, **hyper):
    slope = kwargs.get("negative_slope", 0.0)
    return picard_kernel(x1, x2, activation=name, weight_variance=w, slope=slope, **hyper)


@pytest.mark.parametrize("name,w,kwargs", CLOSED)
@pytest.mark.parametrize("bias", [0.0, 0.4])
@pytest.mark.parametrize("ard", [False, True])
def test_closed_forms_match_picard_reference(rng, name, w, kwargs, bias, ard):
    x1 = rng.normal(size=(7, 3))
    x2 = rng.normal(size=(4, 3))
    iv = np.array([0.5, 1.5, 2.0]) if ard else 1.3
    hyper = dict(input_variance=iv, bias_variance=bias, output_variance=0.8)
    for output in ("nngp", "preactivation"):
        ref_full = _reference(x1, None, name, w, kwargs, output=output, **hyper)
        ref_cross = _reference(x1, x2, name, w, kwargs, output=output, **hyper)
        ours_full = equilibrium_covariance(x1, activation=name, weight_variance=w, output=output, **hyper, **kwargs)
        ours_cross = equilibrium_covariance(
            x1, x2, activation=name, weight_variance=w, output=output, **hyper, **kwargs
        )
        assert rel_err(ours_full, ref_full) <= 1e-10
        assert rel_err(ours_cross, ref_cross) <= 1e-10


@pytest.mark.parametrize("name,w,kwargs", QUADRATURE)
@pytest.mark.parametrize("bias,ard", [(0.0, False), (0.3, True)])
def test_quadrature_activations_match_picard_reference(rng, name, w, kwargs, bias, ard):
    x1 = rng.normal(size=(5, 2))
    x2 = rng.normal(size=(2, 2))
    iv = np.array([0.7, 1.6]) if ard else 1.0
    hyper = dict(input_variance=iv, bias_variance=bias)
    ref = _reference(np.vstack([x1, x2]), None, name, w, kwargs, **hyper)
    ours = equilibrium_covariance(np.vstack([x1, x2]), activation=name, weight_variance=w, **hyper)
    assert rel_err(ours, ref) <= 1e-8
    cross = equilibrium_covariance(x1, x2, activation=name, weight_variance=w, **hyper)
    assert rel_err(cross, ref[:5, 5:]) <= 1e-8


def test_relu_at_weight_variance_just_below_bound(rng):
    x = rng.normal(size=(6, 4))
    ours = equilibrium_covariance(x, weight_variance=1.99, bias_variance=0.1)
    assert rel_err(ours, picard_kernel(x, weight_variance=1.99, bias_variance=0.1)) <= 1e-10


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_diag_paths_agree_with_full_matrix(rng, name):
    x1 = torch.as_tensor(rng.normal(size=(6, 3)))
    x2 = torch.as_tensor(rng.normal(size=(6, 3)))
    kw = dict(activation=name, weight_variance=0.5, bias_variance=0.2)
    full = equilibrium_covariance(x1, **kw)
    assert torch.equal(full.diagonal(), equilibrium_covariance(x1, diag=True, **kw))
    cross = equilibrium_covariance(x1, x2, **kw)
    assert torch.allclose(cross.diagonal(), equilibrium_covariance(x1, x2, diag=True, **kw), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_symmetric_positive_definite_for_distinct_inputs(rng, name):
    """Symmetric, and strictly positive definite for distinct inputs (Gao et al., Theorem 4.5)."""
    x = torch.as_tensor(rng.normal(size=(12, 3)))
    k = equilibrium_covariance(x, activation=name, weight_variance=0.5, bias_variance=0.1)
    assert torch.equal(k, k.mT)
    eig = torch.linalg.eigvalsh(k)
    if name == "identity":  # a linear kernel on 3 features has rank 3 + 1 (bias)
        assert eig.min() > -1e-12 * eig.max()
    else:
        assert eig.min() > 1e-8 * eig.max()


@pytest.mark.parametrize("name", ["relu", "erf", "tanh", "sin", "gelu"])
def test_zero_weight_variance_is_the_one_layer_kernel(rng, name):
    """With no feedback the equilibrium is one layer: K* = s, k = E[phi(u) phi(v)] under s."""
    x = rng.normal(size=(5, 3))
    k = equilibrium_covariance(x, activation=name, weight_variance=0.0, bias_variance=0.3, output_variance=1.7)
    s = x @ x.T / 3 + 0.3
    dg = np.diag(s)
    if name in CLOSED_FORMS:
        expected = 1.7 * closed_form_dual(name, dg[:, None], dg[None, :], s)
    else:
        from reference import FUNCTIONS, quadrature_dual

        expected = 1.7 * quadrature_dual(FUNCTIONS[name], dg[:, None], dg[None, :], s, h=0.05)
    assert rel_err(k, expected) <= 1e-10
    pre = equilibrium_covariance(x, activation=name, weight_variance=0.0, bias_variance=0.3, output="preactivation")
    assert rel_err(pre, s) <= 1e-14


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "tanh", "erf"])
def test_batches_equal_per_item_results(rng, name):
    x = torch.as_tensor(rng.normal(size=(3, 2, 5, 4)))
    w = torch.tensor([0.3, 0.6], dtype=torch.float64)  # one per entry of the last batch dim
    iv = torch.as_tensor(rng.uniform(0.5, 2.0, size=(2, 4)))  # ARD, per batch entry
    k = equilibrium_covariance(x, activation=name, weight_variance=w, input_variance=iv, bias_variance=0.1)
    kd = equilibrium_covariance(x, activation=name, weight_variance=w, input_variance=iv, bias_variance=0.1, diag=True)
    assert k.shape == (3, 2, 5, 5) and kd.shape == (3, 2, 5)
    for i in range(3):
        for j in range(2):
            single = equilibrium_covariance(
                x[i, j], activation=name, weight_variance=float(w[j]), input_variance=iv[j], bias_variance=0.1
            )
            assert torch.allclose(k[i, j], single, rtol=1e-12, atol=1e-14)
            assert torch.allclose(kd[i, j], single.diagonal(), rtol=1e-12, atol=1e-14)


def test_hyperparameter_batch_broadcasts_over_unbatched_inputs(rng):
    x = torch.as_tensor(rng.normal(size=(4, 2)))
    x2 = torch.as_tensor(rng.normal(size=(3, 2)))
    w = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    k = equilibrium_covariance(x, x2, weight_variance=w)
    assert k.shape == (3, 4, 3)
    for i in range(3):
        assert torch.allclose(k[i], equilibrium_covariance(x, x2, weight_variance=float(w[i])), rtol=1e-13)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh", "step", "gelu"])
def test_float32_agrees_with_float64(rng, name):
    x = rng.normal(size=(20, 5))
    kw = dict(activation=name, weight_variance=0.7, bias_variance=0.1)
    k64 = equilibrium_covariance(torch.as_tensor(x), **kw)
    k32 = equilibrium_covariance(torch.as_tensor(x, dtype=torch.float32), **kw)
    assert k32.dtype == torch.float32
    assert rel_err(k32.double(), k64) <= 1e-5


def test_relu_float32_near_bound_agrees_with_float64(rng):
    x = rng.normal(size=(20, 5))
    k64 = equilibrium_covariance(torch.as_tensor(x), weight_variance=1.9)
    k32 = equilibrium_covariance(torch.as_tensor(x, dtype=torch.float32), weight_variance=1.9)
    assert rel_err(k32.double(), k64) <= 1e-5


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "step", "erf", "cos", "gelu", "tanh", "softplus"])
def test_gradcheck_hyperparameters_and_inputs(rng, name):
    x1 = torch.as_tensor(rng.normal(size=(4, 3)), dtype=torch.float64).requires_grad_()
    x2 = torch.as_tensor(rng.normal(size=(3, 3)), dtype=torch.float64).requires_grad_()
    w = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    iv = torch.tensor([0.7, 1.2, 1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ov = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def cross(x1, x2, w, iv, b, ov):
        return equilibrium_covariance(
            x1, x2, activation=name, weight_variance=w, input_variance=iv, bias_variance=b, output_variance=ov
        )

    def sym(x1, w, iv, b, ov):
        return equilibrium_covariance(
            x1, activation=name, weight_variance=w, input_variance=iv, bias_variance=b, output_variance=ov
        )

    def pre(x1, w, iv, b):
        return equilibrium_covariance(
            x1, activation=name, weight_variance=w, input_variance=iv, bias_variance=b, output="preactivation"
        )

    def diag(x1, x2, w, b):
        return equilibrium_covariance(x1[:3], x2, activation=name, weight_variance=w, bias_variance=b, diag=True)

    assert torch.autograd.gradcheck(cross, (x1, x2, w, iv, b, ov))
    assert torch.autograd.gradcheck(sym, (x1, w, iv, b, ov))
    assert torch.autograd.gradcheck(pre, (x1, w, iv, b))
    assert torch.autograd.gradcheck(diag, (x1, x2, w, b))


@pytest.mark.parametrize("name", ["relu", "tanh"])
def test_gradients_at_zero_bias_and_near_bound(rng, name):
    """Zero bias requiring a gradient (the two-operand product), and 1/(1 - w V_c) near the bound."""
    x = torch.as_tensor(rng.normal(size=(4, 2)), dtype=torch.float64).requires_grad_()
    w = torch.tensor(1.9 if name == "relu" else 0.97, dtype=torch.float64, requires_grad=True)
    iv = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def f(x, w, iv, b):
        return equilibrium_covariance(x, activation=name, weight_variance=w, bias_variance=b, input_variance=iv)

    assert torch.autograd.gradcheck(lambda x, w, iv: f(x, w, iv, torch.zeros((), dtype=torch.float64)), (x, w, iv))
    # Bias variances cannot go negative: compare with a one-sided difference at 0.
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    k = f(x.detach(), w.detach(), iv.detach(), b)
    (grad,) = torch.autograd.grad(k.sum(), b)
    h = 1e-7
    fd = (f(x.detach(), w.detach(), iv.detach(), torch.tensor(h, dtype=torch.float64)).sum() - k.sum()) / h
    assert float(grad) == pytest.approx(float(fd.detach()), rel=1e-5)


def test_gradcheck_batched_weight_variance(rng):
    x = torch.as_tensor(rng.normal(size=(2, 4, 3)), dtype=torch.float64).requires_grad_()
    w = torch.tensor([0.4, 1.5], dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return equilibrium_covariance(x, weight_variance=w, bias_variance=0.1)

    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("name", ["relu", "tanh", "erf", "sigmoid", "cos", "step"])
def test_zero_input_without_bias_is_not_nan(name):
    x = torch.tensor([[0.0, 0.0], [1.0, -0.5], [0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    w = 0.5
    for output in ("nngp", "preactivation"):
        k = equilibrium_covariance(x, activation=name, weight_variance=w, output=output)
        assert torch.isfinite(k).all()
        if name in ("relu", "tanh", "erf"):  # phi(0) = 0: everything with the zero point vanishes
            assert torch.equal(k[0], torch.zeros(3, dtype=torch.float64))
            assert torch.equal(k[:, 0], torch.zeros(3, dtype=torch.float64))
        k.sum().backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None


def test_array_likes_become_float64_and_tensors_keep_dtype():
    k = equilibrium_covariance([[1, 0], [0, 1]])
    assert k.dtype == torch.float64
    k32 = equilibrium_covariance(torch.eye(2, dtype=torch.float32))
    assert k32.dtype == torch.float32
    assert torch.allclose(k32.double(), k, rtol=1e-6)


def test_mixed_precision_is_promoted():
    x1 = torch.randn(3, 2, dtype=torch.float32)
    x2 = torch.randn(2, 2, dtype=torch.float64)
    assert equilibrium_covariance(x1, x2).dtype == torch.float64


def test_docstring_example_runs():
    result = doctest.testmod(functional_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1 and result.failed == 0


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(bad):
    x = np.ones((3, 2))
    x[1, 0] = bad
    with pytest.raises(ValueError, match="x1 contains NaN or infinite values"):
        equilibrium_covariance(x)
    with pytest.raises(ValueError, match="x2 contains NaN or infinite values"):
        equilibrium_covariance(np.ones((3, 2)), x)


def test_feature_dimension_mismatch():
    with pytest.raises(ValueError, match=r"x2 must have the same number of features as x1 \(d=3\)"):
        equilibrium_covariance(np.ones((3, 3)), np.ones((2, 4)))


@pytest.mark.parametrize("shape", [(5,), ()])
def test_fewer_than_two_dimensions(shape):
    with pytest.raises(ValueError, match="x1 must have shape"):
        equilibrium_covariance(np.ones(shape))


@pytest.mark.parametrize("name", ["weight_variance", "input_variance", "bias_variance", "output_variance"])
@pytest.mark.parametrize("value", [-0.1, np.nan, np.inf])
def test_negative_or_non_finite_variances(name, value):
    with pytest.raises(ValueError, match=f"{name} must be finite and non-negative"):
        equilibrium_covariance(np.ones((2, 2)), **{name: value})


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_weight_variance_at_or_past_bound(name):
    bound = deq_kernel.get_activation(name).weight_variance_bound
    if not np.isfinite(bound):
        pytest.skip("the step activation has no bound (its pair equation has one root for any w)")
    for w in (bound, bound * 1.5):
        with pytest.raises(ValueError, match=f"weight_variance must be < .* for activation '{name}'"):
            equilibrium_covariance(np.ones((2, 2)), activation=name, weight_variance=w)
    w_tensor = torch.tensor([0.1, bound])
    with pytest.raises(ValueError, match="weight_variance must be <"):
        equilibrium_covariance(torch.ones(2, 2, 2), activation=name, weight_variance=w_tensor)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(
        ValueError, match="relu, leaky_relu, abs, identity, step, erf, gelu, sin, cos, tanh, sigmoid, softplus, silu"
    ):
        equilibrium_covariance(np.ones((2, 2)), activation="swish")


def test_ard_vector_of_wrong_length():
    with pytest.raises(ValueError, match=r"input_variance must be a scalar or have last dimension 1 or d=3"):
        equilibrium_covariance(np.ones((2, 3)), input_variance=[1.0, 2.0])


def test_hyperparameter_batch_that_does_not_broadcast():
    with pytest.raises(ValueError, match="weight_variance of shape \\(3,\\) does not broadcast"):
        equilibrium_covariance(torch.ones(2, 4, 2), weight_variance=torch.tensor([0.1, 0.2, 0.3]))


def test_invalid_output_and_diag_and_types():
    with pytest.raises(ValueError, match="output must be one of 'nngp', 'preactivation'"):
        equilibrium_covariance(np.ones((2, 2)), output="kernel")
    with pytest.raises(TypeError, match="diag must be a bool"):
        equilibrium_covariance(np.ones((2, 2)), diag=1)
    with pytest.raises(TypeError, match="x1 must be numeric"):
        equilibrium_covariance([["a", "b"]])
    with pytest.raises(TypeError, match="x1 must be float32 or float64"):
        equilibrium_covariance(torch.ones(2, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match="weight_variance must be a number or a tensor"):
        equilibrium_covariance(np.ones((2, 2)), weight_variance=True)
    with pytest.raises(ValueError, match="with diag=True, x2 must have as many points as x1"):
        equilibrium_covariance(np.ones((3, 2)), np.ones((2, 2)), diag=True)
    with pytest.raises(ValueError, match="at least one feature"):
        equilibrium_covariance(np.ones((3, 0)))


@pytest.mark.parametrize("activation", ["relu", "erf", "tanh", "sin"])
@pytest.mark.parametrize("case", ["dense", "blocks", "batched", "ntk", "inputs"])
def test_second_derivatives_raise_instead_of_being_wrong(activation, case):
    # The implicit gradients are first derivatives only; differentiating them again used to
    # return 0 (finite differences: 42.04) or a wrong number. Every path now raises.
    torch.manual_seed(0)
    n = 600 if case == "blocks" else 6
    x = torch.randn(2, n, 3, dtype=torch.float64) if case == "batched" else torch.randn(n, 3, dtype=torch.float64)
    w = torch.tensor(0.4, dtype=torch.float64)
    output = "ntk" if case == "ntk" else "nngp"

    def in_w(w):
        return equilibrium_covariance(x, activation=activation, weight_variance=w, bias_variance=0.1, output=output)

    with pytest.raises(RuntimeError, match="first derivatives only"):
        if case == "inputs":
            torch.autograd.functional.hessian(
                lambda x: equilibrium_covariance(
                    x, activation=activation, weight_variance=0.0, bias_variance=0.1
                ).sum(),
                x,
            )
        else:
            torch.autograd.functional.hessian(lambda w: in_w(w).sum(), w)
    # First derivatives are unaffected.
    w_ = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(in_w(w_).sum(), w_)
    step = 1e-6
    fd = (in_w(w + step).sum() - in_w(w - step).sum()) / (2 * step)
    assert float(grad) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("name", deq_kernel.ACTIVATIONS)
def test_one_default_weight_variance_everywhere(name):
    # Half the activation's bound (1 without one): the functional default of 1 used to raise
    # for tanh, erf, sin, abs and identity, while DEQKernel took half the bound and DEQ 0.5.
    from deq_kernel.sklearn import DEQ, DEQGPRegressor

    act = deq_kernel.get_activation(name)
    expected = 0.5 * act.weight_variance_bound if math.isfinite(act.weight_variance_bound) else 1.0
    assert act.default_weight_variance == expected
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    by_default = equilibrium_covariance(x, activation=name, bias_variance=0.1)
    explicit = equilibrium_covariance(x, activation=name, weight_variance=expected, bias_variance=0.1)
    torch.testing.assert_close(by_default, explicit, rtol=0, atol=0)
    # (DEQKernel's parameters start in float32, like every GPyTorch module's.)
    assert float(deq_kernel.DEQKernel(name).weight_variance) == pytest.approx(expected, rel=1e-7)
    assert np.exp(DEQ(name).theta[-1]) == pytest.approx(expected, rel=1e-15)
    np.testing.assert_allclose(DEQ(name)(x.numpy()), explicit.numpy(), rtol=1e-12)
    initial = DEQGPRegressor(name)._initial_values(None, 2)["weight_variance"]
    assert initial == pytest.approx(expected, rel=1e-15)


def test_integer_inputs_become_float64_whether_tensors_or_lists():
    # Integer tensors used to become the default dtype (float32) while integer lists became float64.
    rows = [[1, 2], [3, -1], [0, 4]]
    from_list = equilibrium_covariance(rows)
    from_tensor = equilibrium_covariance(torch.tensor(rows))
    assert from_list.dtype == from_tensor.dtype == torch.float64
    torch.testing.assert_close(from_tensor, from_list, rtol=0, atol=0)
    assert equilibrium_covariance(torch.tensor(rows, dtype=torch.float32)).dtype == torch.float32


def test_torch_func_transforms_are_refused_with_what_to_use_instead():
    # vmap failed deep inside ("data-dependent control flow") and torch.func.grad with a remark
    # about setup_context, neither naming the library nor the alternative.
    from deq_kernel import conv_equilibrium_covariance

    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"equilibrium_covariance does not run under torch.func.*batch of inputs"):
        torch.func.vmap(lambda a: equilibrium_covariance(a, weight_variance=1.0))(x)
    with pytest.raises(RuntimeError, match=r"torch.func transforms.*torch.autograd.grad"):
        torch.func.grad(lambda w: equilibrium_covariance(x[0], weight_variance=w).sum())(
            torch.tensor(1.0, dtype=torch.float64)
        )
    images = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"conv_equilibrium_covariance does not run under torch\.func"):
        torch.func.vmap(lambda a: conv_equilibrium_covariance(a, weight_variance=0.5))(images)
    # Outside a transform, the batch is the way: the same matrices as one call per element.
    batched = equilibrium_covariance(x, weight_variance=1.0)
    assert torch.allclose(batched[1], equilibrium_covariance(x[1], weight_variance=1.0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_no_warnings_with_gradients_at_any_scale(rng, name):
    """The library warns only about what the user did (no torch warning from its own code):
    erf's O(n) test for pairs near correlation one read a variance that required a gradient
    with ``float()``, and torch warned on every call of every GPyTorch model."""
    import warnings

    outputs = ("nngp", "preactivation") + (("ntk",) if name != "step" else ())
    for scale in (1.0, 1e3):
        x = (torch.as_tensor(rng.normal(size=(12, 3))) * scale).requires_grad_(True)
        hyper = dict(
            weight_variance=torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
            input_variance=torch.ones(3, dtype=torch.float64, requires_grad=True),
            bias_variance=torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for output in outputs:
                kw = dict(activation=name, output=output, **hyper)
                total = equilibrium_covariance(x, **kw).sum() + equilibrium_covariance(x, x[:5].detach(), **kw).sum()
                total.backward()
        assert not caught, [str(w.message) for w in caught]
