"""The convolutional DEQ kernel (flatten readout): against an independent recursion over every
pixel pair, the fully connected kernel (kernel_size=1), finite convolutional DEQs, gradients
and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import conv_picard_kernel

from deq_kernel import ConvergenceError, conv_equilibrium_covariance, equilibrium_covariance, settings
from deq_kernel.equilibrium import conv

HYPERS = dict(input_variance=1.3, bias_variance=0.2, output_variance=0.7)


@pytest.fixture
def images(rng):
    return rng.normal(size=(3, 2, 4, 5))


@pytest.mark.parametrize(("activation", "weight_variance"), [("relu", 1.0), ("erf", 0.5), ("relu", 1.9)])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_matches_plain_iteration_over_every_pixel_pair(images, activation, weight_variance, kernel_size):
    # relu at 1.9 is near its bound (2): the plain iteration's rate is about 0.95 there.
    ref = conv_picard_kernel(
        images, kernel_size=kernel_size, activation=activation, weight_variance=weight_variance, tol=1e-15, **HYPERS
    )
    ours = conv_equilibrium_covariance(
        images, kernel_size=kernel_size, activation=activation, weight_variance=weight_variance, **HYPERS
    )
    assert ours.dtype == torch.float64
    assert np.allclose(ours.numpy(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    assert torch.equal(ours, ours.mT)


@pytest.mark.parametrize(("activation", "weight_variance"), [("relu", 1.0), ("erf", 0.5)])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_pooled_readout_matches_plain_iteration(images, activation, weight_variance, kernel_size):
    kw = dict(kernel_size=kernel_size, activation=activation, weight_variance=weight_variance, **HYPERS)
    ref = conv_picard_kernel(images, readout="gap", tol=1e-15, **kw)
    ours = conv_equilibrium_covariance(images, readout="gap", **kw)
    assert np.allclose(ours.numpy(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
    assert torch.equal(ours, ours.mT)
    z = torch.as_tensor(images[:2] * 0.5)
    joint = conv_equilibrium_covariance(np.concatenate([images, z.numpy()]), readout="gap", **kw)
    cross = conv_equilibrium_covariance(images, z, readout="gap", **kw)
    assert torch.allclose(cross, joint[:3, 3:], rtol=0, atol=1e-13)
    for second in (None, z[:1].expand(3, -1, -1, -1)):
        full = conv_equilibrium_covariance(images, second, readout="gap", **kw)
        diag = conv_equilibrium_covariance(images, second, readout="gap", diag=True, **kw)
        assert torch.allclose(diag, full.diagonal(), rtol=0, atol=1e-13)


def test_pooled_readout_gradients(rng):
    x = torch.as_tensor(rng.normal(size=(2, 1, 3, 3))).requires_grad_(True)
    w = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    kernel = lambda x, w, b: conv_equilibrium_covariance(x, readout="gap", weight_variance=w, bias_variance=b)  # noqa: E731
    assert torch.autograd.gradcheck(kernel, (x, w, b))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_kernel_size_one_is_the_fully_connected_kernel_averaged_over_pixels(rng, activation):
    x = torch.as_tensor(rng.normal(size=(4, 3, 3, 2)))
    w = 0.8 if activation == "relu" else 0.4
    ours = conv_equilibrium_covariance(x, kernel_size=1, activation=activation, weight_variance=w, **HYPERS)
    pixels = x.permute(2, 3, 0, 1).reshape(6, 4, 3)  # (pixel, image, channel)
    fc = equilibrium_covariance(pixels, activation=activation, weight_variance=w, **HYPERS).mean(0)
    assert torch.allclose(ours, fc, rtol=0, atol=1e-12 * float(fc.abs().max()))


def test_cross_matrix_is_the_block_of_the_joint_matrix_and_layouts_agree(rng):
    x = torch.as_tensor(rng.normal(size=(4, 2, 3, 3)))
    z = torch.as_tensor(rng.normal(size=(2, 2, 3, 3)))
    joint = conv_equilibrium_covariance(torch.cat([x, z]), **HYPERS)
    cross = conv_equilibrium_covariance(x, z, **HYPERS)
    assert torch.allclose(cross, joint[:4, 4:], rtol=0, atol=1e-14)
    flat = conv_equilibrium_covariance(x.reshape(4, -1), z.reshape(2, -1), image_shape=(2, 3, 3), **HYPERS)
    assert torch.equal(flat, cross)
    one = torch.as_tensor(rng.normal(size=(3, 1, 3, 4)))
    both = conv_equilibrium_covariance(one.reshape(3, -1), image_shape=(3, 4), **HYPERS)
    assert torch.equal(both, conv_equilibrium_covariance(one, **HYPERS))


def test_tiles_do_not_change_the_matrix(rng):
    x = torch.as_tensor(rng.normal(size=(7, 1, 4, 4)))
    whole = conv_equilibrium_covariance(x, **HYPERS)
    with settings.max_block_size(3 * 3 * 16):  # tiles of 3 x 3 images
        tiled = conv_equilibrium_covariance(x, **HYPERS)
    assert torch.allclose(tiled, whole, rtol=0, atol=1e-14)
    assert torch.equal(tiled, tiled.mT)


def test_the_diagonal_is_the_images_own_variance(rng):
    # k(x, x) = output_variance * mean_p D(q(p)): for relu D(q) = q / 2, with q the solution
    # of the linear system q = (w / 2) A q + s.
    x = torch.as_tensor(rng.normal(size=(2, 1, 3, 3)))
    k = conv_equilibrium_covariance(x, weight_variance=1.2, **HYPERS)
    average = conv.patch_average(torch.eye(9, dtype=torch.float64).reshape(9, 3, 3), 3).reshape(9, 9).T
    s = 1.3 * conv.patch_average((x * x).sum(1), 3).reshape(2, 9) + 0.2
    q = torch.linalg.solve(torch.eye(9, dtype=torch.float64) - 0.6 * average, s.T).T
    assert torch.allclose(k.diagonal(), 0.7 * (q / 2).mean(-1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("activation", ["relu", "erf", "tanh"])
def test_gradients_are_the_implicit_function_theorems(rng, activation):
    x = torch.as_tensor(rng.normal(size=(3, 1, 3, 3))).requires_grad_(True)
    z = torch.as_tensor(rng.normal(size=(2, 1, 3, 3))).requires_grad_(True)
    hypers = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.5, 1.2, 0.3, 0.8)]

    def kernel(x, z, w, iv, b, ov):
        return conv_equilibrium_covariance(
            x, z, activation=activation, weight_variance=w, input_variance=iv, bias_variance=b, output_variance=ov
        )

    assert torch.autograd.gradcheck(kernel, (x, z, *hypers))
    symmetric = lambda x, w, b: kernel(x, None, w, hypers[1], b, hypers[3])  # noqa: E731
    assert torch.autograd.gradcheck(symmetric, (x, hypers[0], hypers[2]))


def test_gradients_near_the_weight_variance_bound(rng):
    # relu at weight_variance 1.9 (bound 2): the adjoint iteration contracts at about 0.95.
    x = torch.as_tensor(rng.normal(size=(2, 1, 3, 3))).requires_grad_(True)
    w = torch.tensor(1.9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: conv_equilibrium_covariance(x, weight_variance=w, **HYPERS), (x, w))


def _finite_network_kernels(x: torch.Tensor, width: int, networks: int, kernel_size: int, gen) -> torch.Tensor:
    """Flatten-readout covariances of finite weight-tied convolutional relu DEQs, one per network."""
    n, c = x.shape[:2]
    w, u, b = 0.5, HYPERS["input_variance"], HYPERS["bias_variance"]
    pad = kernel_size // 2
    out = []
    for _ in range(networks):
        weights = torch.randn(width, width, kernel_size, kernel_size, generator=gen, dtype=x.dtype)
        weights *= math.sqrt(w / (width * kernel_size**2))
        inputs = torch.randn(width, c, kernel_size, kernel_size, generator=gen, dtype=x.dtype)
        inputs *= math.sqrt(u / (c * kernel_size**2))
        bias = torch.randn(width, generator=gen, dtype=x.dtype) * math.sqrt(b)
        drive = F.conv2d(x, inputs, padding=pad) + bias.reshape(1, -1, 1, 1)
        h = torch.zeros(n, width, *x.shape[2:], dtype=x.dtype)
        for _ in range(500):
            new = torch.relu(F.conv2d(h, weights, padding=pad) + drive)
            done = bool((new - h).abs().max() < 1e-12)
            h = new
            if done:
                break
        else:
            raise AssertionError("the finite network's fixed point was not reached")
        features = h.reshape(n, -1)
        out.append(features @ features.T / features.shape[1])
    return torch.stack(out)


def test_finite_convolutional_deqs_approach_the_kernel(rng):
    # The readout's covariance averaged over random networks: within its Monte Carlo error of
    # the kernel at width 128, and its spread across networks falls with width (like
    # width^-1/2; weight sharing across pixels keeps it large at small width).
    x = torch.as_tensor(rng.normal(size=(2, 1, 4, 4)))
    kernel = conv_equilibrium_covariance(x, weight_variance=0.5, **{**HYPERS, "output_variance": 1.0})
    gen = torch.Generator().manual_seed(0)
    narrow = _finite_network_kernels(x, 16, 60, 3, gen)
    wide = _finite_network_kernels(x, 128, 60, 3, gen)
    z = (wide.mean(0) - kernel) / (wide.std(0) / math.sqrt(len(wide)))
    assert float(z.abs().max()) < 4.5
    assert float((wide.std(0) / kernel).max()) < 0.6 * float((narrow.std(0) / kernel).max())


def test_float32_images_are_solved_in_float64(rng):
    x = rng.normal(size=(3, 1, 3, 3))
    k64 = conv_equilibrium_covariance(x, **HYPERS)
    k32 = conv_equilibrium_covariance(torch.as_tensor(x, dtype=torch.float32), **HYPERS)
    assert k32.dtype == torch.float32
    assert torch.allclose(k32.double(), k64, rtol=1e-6, atol=0)


def test_an_iteration_cap_too_low_raises(images):
    with settings.max_iterations(3), pytest.raises(ConvergenceError, match="pair fixed point did not converge"):
        conv_equilibrium_covariance(images, activation="erf", **HYPERS)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(kernel_size=2), ValueError, "kernel_size must be a positive odd integer, got 2"),
        (dict(kernel_size=0), ValueError, "kernel_size must be a positive odd integer"),
        (dict(kernel_size=-3), ValueError, "kernel_size must be a positive odd integer"),
        (dict(kernel_size=True), ValueError, "kernel_size must be a positive odd integer"),
        (dict(kernel_size=3.0), ValueError, "kernel_size must be a positive odd integer"),
        (dict(readout="max"), ValueError, "readout must be one of 'flatten', 'gap', got 'max'"),
        (dict(output="preactivation"), ValueError, "output must be 'nngp' or 'ntk' for the convolutional kernel"),
        (dict(output="ntk", activation="step"), ValueError, "the step activation has no neural tangent kernel"),
        (dict(image_shape=(2, 4, 4)), ValueError, r"x1 has images of shape \(2, 4, 5\), but image_shape is"),
        (dict(image_shape=(2, 0, 5)), ValueError, "image_shape must be"),
        (dict(image_shape=5), TypeError, "image_shape must be a tuple"),
        (dict(weight_variance=2.5), ValueError, "weight_variance must be < 2"),
        (dict(bias_variance=-1.0), ValueError, "bias_variance must be finite and non-negative"),
        (dict(input_variance=[1.0, 2.0]), ValueError, "input_variance must be a scalar for the convolutional kernel"),
        (dict(negative_slop=0.1), TypeError, "negative_slop"),
    ],
)
def test_bad_arguments_are_named(images, kwargs, error, match):
    with pytest.raises(error, match=match):
        conv_equilibrium_covariance(images, **kwargs)


def test_flat_rows_need_a_matching_image_shape(images):
    flat = images.reshape(3, -1)
    with pytest.raises(ValueError, match=r"pass image_shape=\(C, H, W\) or \(H, W\)"):
        conv_equilibrium_covariance(flat)
    with pytest.raises(ValueError, match="image_shape \\(1, 4, 4\\) has 16 values per image, but x1 has 40 features"):
        conv_equilibrium_covariance(flat, image_shape=(4, 4))
    with pytest.raises(ValueError, match="x2 has images of shape"):
        conv_equilibrium_covariance(images, images[:, :1])
    with pytest.raises(ValueError, match="x1 must be images"):
        conv_equilibrium_covariance(images[0])


def test_threads_get_the_serial_result(rng):
    from concurrent.futures import ThreadPoolExecutor

    x = torch.as_tensor(rng.normal(size=(5, 1, 3, 3)))
    serial = conv_equilibrium_covariance(x, activation="erf", **HYPERS)

    def run(factor: float) -> torch.Tensor:
        with settings.max_block_size(9 * 4):  # each thread its own setting: tiles of 2 x 2 images
            return conv_equilibrium_covariance(x, activation="erf", **HYPERS) * factor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [1.0] * 8))
    for out in results:
        assert torch.allclose(out, serial, rtol=0, atol=1e-14)


def test_diag_is_the_matrix_diagonal(rng):
    x = torch.as_tensor(rng.normal(size=(4, 2, 3, 3)))
    z = torch.as_tensor(rng.normal(size=(4, 2, 3, 3)))
    for second in (None, z):
        full = conv_equilibrium_covariance(x, second, activation="erf", **HYPERS)
        diag = conv_equilibrium_covariance(x, second, activation="erf", diag=True, **HYPERS)
        assert diag.shape == (4,)
        assert torch.allclose(diag, full.diagonal(), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="with diag=True, x2 must have as many images as x1"):
        conv_equilibrium_covariance(x, z[:2], diag=True)
    with pytest.raises(TypeError, match="diag must be a bool"):
        conv_equilibrium_covariance(x, diag=1)


# --------------------------------------------------------------------------- GPyTorch


def test_gpytorch_kernel_is_the_function_on_flat_rows(rng):
    import gpytorch

    from deq_kernel.gpytorch import ConvDEQKernel

    x = torch.as_tensor(rng.normal(size=(5, 2 * 3 * 3)))
    z = torch.as_tensor(rng.normal(size=(3, 2 * 3 * 3)))
    kernel = ConvDEQKernel("erf", image_shape=(2, 3, 3)).double()
    kernel.weight_variance, kernel.input_variance, kernel.bias_variance = 0.4, 1.3, 0.2
    covar = gpytorch.kernels.ScaleKernel(kernel).double()
    covar.outputscale = 0.7
    # The values the constraints give back (the setters round through float32 raw values).
    hypers = dict(
        weight_variance=float(kernel.weight_variance),
        input_variance=float(kernel.input_variance),
        bias_variance=float(kernel.bias_variance),
        output_variance=float(covar.outputscale),
    )
    expected = conv_equilibrium_covariance(x, z, image_shape=(2, 3, 3), activation="erf", **hypers)
    assert torch.allclose(covar(x, z).to_dense(), expected, rtol=1e-12, atol=0)
    own = conv_equilibrium_covariance(x, image_shape=(2, 3, 3), activation="erf", **hypers)
    assert torch.allclose(covar(x).to_dense(), own, rtol=1e-12, atol=0)
    assert torch.allclose(covar(x, diag=True), own.diagonal(), rtol=1e-12, atol=0)
    assert "image_shape=(2, 3, 3), kernel_size=3, readout='flatten'" in repr(kernel)
    pooled = ConvDEQKernel("erf", image_shape=(2, 3, 3), readout="gap").double()
    pooled.weight_variance = 0.4
    hypers["weight_variance"] = float(pooled.weight_variance)
    hypers.update(input_variance=float(pooled.input_variance), bias_variance=float(pooled.bias_variance))
    hypers.pop("output_variance")
    expected = conv_equilibrium_covariance(x, z, image_shape=(2, 3, 3), activation="erf", readout="gap", **hypers)
    assert torch.allclose(pooled(x, z).to_dense(), expected, rtol=1e-12, atol=0)


def test_gpytorch_kernel_batches_entry_by_entry(rng):
    from deq_kernel.gpytorch import ConvDEQKernel

    x = torch.as_tensor(rng.normal(size=(2, 4, 9)))
    kernel = ConvDEQKernel("relu", image_shape=(3, 3), batch_shape=torch.Size([2])).double()
    kernel.weight_variance = torch.tensor([[0.5], [1.5]], dtype=torch.float64)
    out = kernel(x).to_dense()
    assert out.shape == (2, 4, 4)
    for entry in range(2):
        hypers = dict(
            weight_variance=float(kernel.weight_variance[entry]),
            input_variance=float(kernel.input_variance[entry]),
            bias_variance=float(kernel.bias_variance[entry]),
        )
        one = conv_equilibrium_covariance(x[entry], image_shape=(3, 3), **hypers)
        assert torch.allclose(out[entry], one, rtol=1e-12, atol=0)


def test_gpytorch_kernel_fits_by_marginal_likelihood_and_pickles(rng):
    import pickle

    import gpytorch

    from deq_kernel.gpytorch import ConvDEQKernel, ExactGPModel, fit_exact_gp

    x = torch.as_tensor(rng.uniform(size=(24, 9)))
    y = torch.sin(3 * x[:, 4]) + x.mean(-1)
    covar = gpytorch.kernels.ScaleKernel(ConvDEQKernel("relu", image_shape=(3, 3)))
    model = ExactGPModel(x, y, gpytorch.likelihoods.GaussianLikelihood(), covar_module=covar).double()
    before = [p.detach().clone() for p in model.parameters()]
    result = fit_exact_gp(model, max_iter=15)
    assert math.isfinite(result.log_marginal_likelihood)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True))
    kernel = model.covar_module.base_kernel
    again = pickle.loads(pickle.dumps(kernel))
    assert torch.equal(again(x).to_dense(), kernel(x).to_dense())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image_shape=(3, 3), ard_num_dims=9), "ConvDEQKernel has one input variance"),
        (dict(image_shape=None), "ConvDEQKernel needs image_shape"),
        (dict(image_shape=(3, 3), kernel_size=4), "kernel_size must be a positive odd integer"),
        (dict(image_shape=(3, 3), readout="max"), "readout must be one of 'flatten', 'gap'"),
    ],
)
def test_gpytorch_kernel_bad_arguments(kwargs, match):
    from deq_kernel.gpytorch import ConvDEQKernel

    with pytest.raises(ValueError, match=match):
        ConvDEQKernel("relu", **kwargs)


def test_gpytorch_kernel_names_a_feature_count_that_does_not_fit(rng):
    from deq_kernel.gpytorch import ConvDEQKernel

    kernel = ConvDEQKernel("relu", image_shape=(3, 3)).double()
    with pytest.raises(ValueError, match=r"image_shape \(1, 3, 3\) has 9 values per image, but x1 has 8 features"):
        kernel(torch.as_tensor(rng.normal(size=(4, 8)))).to_dense()


# --------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_tangents_are_the_reverse_mode_gradients(rng, readout, activation):
    # dK/dtheta from the tangent equations, contracted with a weight matrix, against the
    # reverse-mode gradient of the same contraction (implicit function theorem both ways).
    from deq_kernel import get_activation

    x = torch.as_tensor(rng.normal(size=(5, 2, 3, 3)))
    hypers = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.6, 1.3, 0.2)]
    weights = torch.as_tensor(rng.normal(size=(5, 5)))
    kernel = conv_equilibrium_covariance(
        x,
        activation=activation,
        readout=readout,
        weight_variance=hypers[0],
        input_variance=hypers[1],
        bias_variance=hypers[2],
    )
    reverse = torch.autograd.grad((kernel * weights).sum(), hypers)
    with settings.max_block_size(2 * 2 * 9 * (9 if readout == "gap" else 1) * 3):  # several tiles
        value, tangents = conv.conv_kernel_tangents(get_activation(activation), x, *hypers, 3, readout)
    assert torch.allclose(value, kernel.detach(), rtol=0, atol=1e-13)
    for k in range(3):
        forward = (tangents[..., k] * weights).sum()
        assert torch.allclose(forward, reverse[k], rtol=1e-10, atol=1e-13)


def test_scikit_learn_kernel_values_gradients_and_api(rng):
    from sklearn.base import clone

    from deq_kernel.sklearn import ConvDEQ

    X = rng.uniform(size=(6, 2 * 3 * 3))
    kernel = ConvDEQ(image_shape=(2, 3, 3), activation="erf", weight_variance=0.5, input_variance=1.3)
    K, gradient = kernel(X, eval_gradient=True)
    expected = conv_equilibrium_covariance(
        X, image_shape=(2, 3, 3), activation="erf", weight_variance=0.5, input_variance=1.3, bias_variance=0.1
    )
    np.testing.assert_allclose(K, expected.numpy(), rtol=0, atol=1e-14)
    assert gradient.shape == (6, 6, 3)
    # d K / d log(theta), theta in alphabetical order (bias, input, weight), by central differences.
    for k, name in enumerate(("bias_variance", "input_variance", "weight_variance")):
        h = 1e-5
        up = kernel.clone_with_theta(kernel.theta + h * np.eye(3)[k])(X)
        down = kernel.clone_with_theta(kernel.theta - h * np.eye(3)[k])(X)
        np.testing.assert_allclose(gradient[..., k], (up - down) / (2 * h), rtol=0, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(kernel.diag(X), np.diag(K), rtol=0, atol=1e-14)
    Y = rng.uniform(size=(3, 18))
    np.testing.assert_allclose(kernel(X, Y), kernel(np.vstack([X, Y]))[:6, 6:], rtol=0, atol=1e-13)
    again = clone(kernel)
    assert again.get_params() == kernel.get_params() and kernel.get_params()["kernel"] == "nngp"
    assert repr(again).startswith("ConvDEQ(image_shape=(2, 3, 3), kernel_size=3, readout='flatten'")
    fixed = ConvDEQ(image_shape=(2, 3, 3), bias_variance_bounds="fixed")
    assert fixed(X, eval_gradient=True)[1].shape == (6, 6, 2)


@pytest.mark.parametrize(("activation", "readout"), [("relu", "flatten"), ("tanh", "flatten"), ("erf", "gap")])
def test_scikit_learn_tangent_kernel_values_and_gradients(rng, activation, readout):
    """ConvDEQ(kernel="ntk"): the convolutional NTK, its gradient from the tangent equations.

    Against reverse-mode autograd through the GPyTorch path's implicit adjoints (an independent
    computation of the same derivatives) to rounding, and against central differences.
    """
    from deq_kernel.sklearn import ConvDEQ

    X = rng.uniform(size=(5, 2 * 3 * 3))
    X[3] = X[1]  # an exact copy: correlation 1 between two images, where E' is least smooth
    hypers = dict(weight_variance=0.5, input_variance=1.3, bias_variance=0.2)
    kernel = ConvDEQ(image_shape=(2, 3, 3), readout=readout, activation=activation, kernel="ntk", **hypers)
    K, gradient = kernel(X, eval_gradient=True)
    options = dict(image_shape=(2, 3, 3), readout=readout, activation=activation, output="ntk")
    x = torch.as_tensor(X)

    def ntk(log_theta):
        b, iv, w = log_theta.exp()
        return conv_equilibrium_covariance(x, weight_variance=w, input_variance=iv, bias_variance=b, **options)

    theta = torch.tensor(kernel.theta)
    np.testing.assert_allclose(K, ntk(theta).numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(K[1, 3], K[1, 1], rtol=1e-12, atol=0)  # 1e-8 off before copies started at c = q
    jacobian = torch.autograd.functional.jacobian(ntk, theta).numpy()
    np.testing.assert_allclose(gradient, jacobian, rtol=0, atol=1e-12)
    for k in range(3):
        h = 1e-5
        up, down = (kernel.clone_with_theta(kernel.theta + sign * h * np.eye(3)[k])(X) for sign in (1, -1))
        np.testing.assert_allclose(gradient[..., k], (up - down) / (2 * h), rtol=0, atol=1e-8)
    nngp = ConvDEQ(image_shape=(2, 3, 3), readout=readout, activation=activation, **hypers)(X)
    assert float(np.linalg.eigvalsh(K - nngp).min()) > -1e-12  # training v alone gives the NNGP
    assert "kernel='ntk'" in repr(kernel)


@pytest.mark.parametrize("seed", range(8))
def test_tangent_kernel_of_exact_copies_is_that_of_an_image_with_itself(seed):
    """Copies meet at correlation 1, where relu's E' has an infinite slope: no digits are lost there."""
    x = torch.as_tensor(np.random.default_rng(seed).uniform(size=(4, 1, 4, 4)))
    x[2] = x[0]
    kw = dict(activation="relu", weight_variance=0.6, output="ntk", input_variance=1.3, bias_variance=0.2)
    k = conv_equilibrium_covariance(x, **kw)
    cross = conv_equilibrium_covariance(x[:2], x[2:], **kw)
    own = k[0, 0]
    for value in (k[0, 2], k[2, 0], cross[0, 0]):
        # Started anywhere but at c = q, three of these eight seeds were 1.1e-8 to 1.7e-8 off.
        assert abs(float(value - own)) <= 1e-13 * float(own)


def test_scikit_learn_regression_fits_by_marginal_likelihood(rng):
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel

    from deq_kernel.sklearn import ConvDEQ

    X = rng.uniform(size=(20, 9))
    y = np.sin(3 * X[:, 4]) + X.mean(-1)
    kernel = ConstantKernel() * ConvDEQ(image_shape=(3, 3), weight_variance_bounds=(1e-3, 1.5)) + WhiteKernel()
    gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(X, y)
    assert gp.log_marginal_likelihood_value_ > gp.log_marginal_likelihood(gp.kernel.theta)


def test_scikit_learn_kernel_errors(rng):
    from deq_kernel.sklearn import ConvDEQ

    X = rng.uniform(size=(4, 9))
    with pytest.raises(ValueError, match="ConvDEQ has one input variance"):
        ConvDEQ(image_shape=(3, 3), input_variance=np.ones(9))(X)
    with pytest.raises(ValueError, match=r"image_shape \(1, 4, 4\) has 16 values per image, but x1 has 9"):
        ConvDEQ(image_shape=(4, 4))(X)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        ConvDEQ(image_shape=(3, 3), kernel_size=2)(X, eval_gradient=True)


# --------------------------------------------------------------------------- neural tangent kernel


@pytest.mark.parametrize("activation", ["relu", "erf", "tanh"])
def test_tangent_kernel_size_one_is_the_fully_connected_ntk_averaged_over_pixels(rng, activation):
    x = torch.as_tensor(rng.normal(size=(4, 3, 3, 2)))
    z = torch.as_tensor(rng.normal(size=(2, 3, 3, 2)))
    w = 0.8 if activation == "relu" else 0.4
    kw = dict(activation=activation, weight_variance=w, output="ntk", **HYPERS)
    pixels, pz = (t.permute(2, 3, 0, 1).reshape(6, len(t), 3) for t in (x, z))
    for second, pixels2 in ((None, None), (z, pz)):
        ours = conv_equilibrium_covariance(x, second, kernel_size=1, **kw)
        fc = equilibrium_covariance(pixels, pixels2, **kw).mean(0)
        assert torch.allclose(ours, fc, rtol=0, atol=1e-12 * float(fc.abs().max()))


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_tangent_kernel_contains_the_nngp_and_has_its_diagonal_and_gradients(rng, readout):
    x = torch.as_tensor(rng.normal(size=(5, 1, 3, 3)))
    kw = dict(activation="erf", weight_variance=0.6, readout=readout, **HYPERS)
    ntk = conv_equilibrium_covariance(x, output="ntk", **kw)
    nngp = conv_equilibrium_covariance(x, **kw)
    assert torch.equal(ntk, ntk.mT)
    assert float(torch.linalg.eigvalsh(ntk - nngp).min()) > -1e-12  # training v alone gives the NNGP
    diag = conv_equilibrium_covariance(x, output="ntk", diag=True, **kw)
    assert torch.allclose(diag, ntk.diagonal(), rtol=1e-13, atol=0)
    xs = x[:2].clone().requires_grad_(True)
    w = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    tangent = lambda x, w: conv_equilibrium_covariance(  # noqa: E731
        x, activation="relu", weight_variance=w, readout=readout, output="ntk", **HYPERS
    )
    assert torch.autograd.gradcheck(tangent, (xs, w))


def test_gpytorch_tangent_kernel(rng):
    from deq_kernel.gpytorch import ConvDEQKernel

    x = torch.as_tensor(rng.normal(size=(4, 9)))
    kernel = ConvDEQKernel("erf", image_shape=(3, 3), kernel="ntk").double()
    hypers = dict(
        weight_variance=float(kernel.weight_variance),
        input_variance=float(kernel.input_variance),
        bias_variance=float(kernel.bias_variance),
    )
    expected = conv_equilibrium_covariance(x, image_shape=(3, 3), activation="erf", output="ntk", **hypers)
    assert torch.allclose(kernel(x).to_dense(), expected, rtol=1e-12, atol=0)
    assert "kernel='ntk'" in repr(kernel)


def _finite_tangent_kernels(x: torch.Tensor, width: int, networks: int, gen) -> torch.Tensor:
    """Empirical NTKs (all parameters, NTK parameterisation) of finite weight-tied conv relu DEQs
    with the flatten readout, through the fixed point by its adjoint equation."""
    n, c, h, wd = x.shape
    k, w, u, b, v = 3, 0.5, HYPERS["input_variance"], HYPERS["bias_variance"], 1.0
    cw, cu, cv = math.sqrt(w / (width * k * k)), math.sqrt(u / (c * k * k)), math.sqrt(v / (width * h * wd))
    out = []
    for _ in range(networks):
        w0 = torch.randn(width, width, k, k, generator=gen, dtype=x.dtype, requires_grad=True)
        u0 = torch.randn(width, c, k, k, generator=gen, dtype=x.dtype, requires_grad=True)
        b0 = torch.randn(width, generator=gen, dtype=x.dtype, requires_grad=True)
        v0 = torch.randn(width, h, wd, generator=gen, dtype=x.dtype)
        features = []
        for i in range(n):
            drive = F.conv2d(x[i : i + 1], cu * u0, padding=1) + (math.sqrt(b) * b0).reshape(1, -1, 1, 1)
            with torch.no_grad():
                state = torch.zeros(1, width, h, wd, dtype=x.dtype)
                for _ in range(500):
                    new = torch.relu(F.conv2d(state, cw * w0, padding=1) + drive)
                    done = bool((new - state).abs().max() < 1e-13)
                    state = new
                    if done:
                        break
            state = state.requires_grad_(True)
            mapped = torch.relu(F.conv2d(state, cw * w0, padding=1) + drive)
            direct = cv * v0.unsqueeze(0)
            adjoint = direct.clone()  # df/dh* = v (I - J)^-1, by its fixed point
            for _ in range(500):
                new = direct + torch.autograd.grad(mapped, state, adjoint, retain_graph=True)[0]
                done = bool((new - adjoint).abs().max() < 1e-13)
                adjoint = new
                if done:
                    break
            grads = torch.autograd.grad(mapped, [w0, u0, b0], adjoint)
            features.append(torch.cat([g.reshape(-1) for g in grads] + [(cv * state.detach()).reshape(-1)]))
        features = torch.stack(features)
        out.append(features @ features.T)
    return torch.stack(out)


def test_finite_convolutional_deqs_have_the_tangent_kernel(rng):
    # Empirical NTKs of 30 finite networks of width 96: their mean within its Monte Carlo
    # error of the kernel, and clearly away from a kernel with a 10% larger tangent part.
    x = torch.as_tensor(rng.normal(size=(2, 1, 3, 3)))
    kw = dict(weight_variance=0.5, input_variance=HYPERS["input_variance"], bias_variance=HYPERS["bias_variance"])
    ntk = conv_equilibrium_covariance(x, output="ntk", **kw)
    nngp = conv_equilibrium_covariance(x, **kw)
    empirical = _finite_tangent_kernels(x, 96, 30, torch.Generator().manual_seed(0))
    error = empirical.std(0) / math.sqrt(len(empirical))
    assert float(((empirical.mean(0) - ntk) / error).abs().max()) < 4.5
    wrong = nngp + 1.1 * (ntk - nngp)
    assert float(((empirical.mean(0) - wrong) / error).abs().max()) > 4.5


def test_saved_and_reloaded_kernels_give_the_same_matrices(rng, tmp_path):
    import pickle

    import joblib
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel

    from deq_kernel.gpytorch import ConvDEQKernel
    from deq_kernel.sklearn import ConvDEQ

    X = rng.uniform(size=(12, 9))
    y = X.sum(-1)
    kernel = ConstantKernel(0.5) * ConvDEQ(image_shape=(3, 3), readout="gap", activation="erf") + WhiteKernel(0.1)
    gp = GaussianProcessRegressor(kernel, optimizer=None).fit(X, y)
    joblib.dump(gp, tmp_path / "gp.joblib")
    again = joblib.load(tmp_path / "gp.joblib")
    mean, std = gp.predict(X[:4], return_std=True)
    mean2, std2 = again.predict(X[:4], return_std=True)
    assert np.array_equal(mean, mean2) and np.array_equal(std, std2)
    assert repr(pickle.loads(pickle.dumps(kernel))) == repr(kernel)

    x = torch.as_tensor(X)
    module = ConvDEQKernel("erf", image_shape=(3, 3), kernel="ntk").double()
    module.weight_variance = 0.6
    fresh = ConvDEQKernel("erf", image_shape=(3, 3), kernel="ntk").double()
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh(x).to_dense(), module(x).to_dense())


def test_finite_convolutional_deqs_at_widths_64_to_512(rng):
    # At each width the networks' mean covariance is within its Monte Carlo error of the
    # kernel, and one network's spread falls with width like width^-1/2 (within 30%).
    x = torch.as_tensor(rng.normal(size=(2, 1, 4, 4)))
    kernel = conv_equilibrium_covariance(x, weight_variance=0.5, **{**HYPERS, "output_variance": 1.0})
    gen = torch.Generator().manual_seed(1)
    spreads = []
    for width, networks in ((64, 100), (256, 50), (512, 25)):
        draws = _finite_network_kernels(x, width, networks, 3, gen)
        z = (draws.mean(0) - kernel) / (draws.std(0) / math.sqrt(networks))
        assert float(z.abs().max()) < 4.5, width
        spreads.append(float((draws.std(0) / kernel).max()))
    slope = np.polyfit(np.log([64, 256, 512]), np.log(spreads), 1)[0]
    assert -0.65 < slope < -0.35, (slope, spreads)


# --------------------------------------------------------------------------- the scikit-learn estimators


def _tiny_images(rng, n=24):
    """``n`` random 1 x 4 x 4 images as flat rows, and a smooth target of them."""
    X = rng.uniform(size=(n, 16))
    return X, X[:, :8].sum(1) - X[:, 8:].sum(1)


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_regressor_with_image_shape_is_the_gp_of_the_convolutional_kernel(rng, readout):
    from deq_kernel.sklearn import ConvDEQ, DEQGPRegressor

    X, y = _tiny_images(rng)
    hypers = dict(weight_variance=0.8, input_variance=1.5, bias_variance=0.2)
    options = dict(image_shape=(4, 4), readout=readout)
    reg = DEQGPRegressor(optimizer=None, noise=0.05, **options, **hypers).fit(X[:18], y[:18])
    assert isinstance(reg.kernel_.k1.k2, ConvDEQ) and reg.kernel_.k1.k2.image_shape == (1, 4, 4)
    assert reg.kernel_.k1.k2.readout == readout
    # The posterior mean, from the kernel computed directly (targets standardised as in the fit).
    x_train, x_test = torch.tensor(X[:18]), torch.tensor(X[18:])
    k = conv_equilibrium_covariance(x_train, **options, **hypers)
    k_star = conv_equilibrium_covariance(x_test, x_train, **options, **hypers)
    mu, sd = y[:18].mean(), y[:18].std()
    alpha = torch.linalg.solve(k + 0.05 * torch.eye(18, dtype=k.dtype), torch.tensor((y[:18] - mu) / sd))
    np.testing.assert_allclose(reg.predict(X[18:]), (k_star @ alpha).numpy() * sd + mu, rtol=1e-11, atol=1e-11)
    if readout == "gap":
        return
    # log_marginal_likelihood(theta) recomputes with the convolutional kernel.
    fitted = DEQGPRegressor(image_shape=(4, 4), max_iter=5).fit(X, y)
    assert fitted.log_marginal_likelihood(fitted.kernel_.theta) == pytest.approx(
        fitted.log_marginal_likelihood_value_, rel=1e-9
    )


def test_regressor_with_image_shape_and_the_tangent_kernel(rng, tmp_path):
    from deq_kernel.model_io import SavedModel, load_model
    from deq_kernel.sklearn import ConvDEQ, DEQGPRegressor

    X, y = _tiny_images(rng)
    hypers = dict(weight_variance=0.6, input_variance=1.5, bias_variance=0.2)
    options = dict(image_shape=(4, 4), activation="erf")
    reg = DEQGPRegressor(optimizer=None, noise=0.05, kernel="ntk", **options, **hypers).fit(X[:18], y[:18])
    assert isinstance(reg.kernel_.k1.k2, ConvDEQ) and reg.kernel_.k1.k2.kernel == "ntk"
    x_train, x_test = torch.tensor(X[:18]), torch.tensor(X[18:])
    k = conv_equilibrium_covariance(x_train, output="ntk", **options, **hypers)
    k_star = conv_equilibrium_covariance(x_test, x_train, output="ntk", **options, **hypers)
    mu, sd = y[:18].mean(), y[:18].std()
    alpha = torch.linalg.solve(k + 0.05 * torch.eye(18, dtype=k.dtype), torch.tensor((y[:18] - mu) / sd))
    np.testing.assert_allclose(reg.predict(X[18:]), (k_star @ alpha).numpy() * sd + mu, rtol=1e-11, atol=1e-11)
    # Fitted by marginal likelihood: log_marginal_likelihood(theta) recomputes with the tangent
    # kernel, and a saved model comes back with it, predicting the same numbers.
    fitted = DEQGPRegressor(kernel="ntk", max_iter=4, **options).fit(X[:18], y[:18])
    assert fitted.log_marginal_likelihood(fitted.kernel_.theta) == pytest.approx(
        fitted.log_marginal_likelihood_value_, rel=1e-9
    )
    features = [f"p{i}" for i in range(16)]
    saved = SavedModel(fitted, "regression", "y", features, np.zeros(16), np.ones(16), None, X[:18], y[:18])
    saved.save(tmp_path / "model")
    again = load_model(tmp_path / "model").estimator
    assert again.kernel == "ntk" and again.kernel_.k1.k2.kernel == "ntk"
    assert np.array_equal(again.predict(X[18:]), fitted.predict(X[18:]))


def test_classifier_with_image_shape(rng):
    from deq_kernel.sklearn import ConvDEQ, DEQGPClassifier

    X, y = _tiny_images(rng, 30)
    labels = (y > np.median(y)).astype(int)
    clf = DEQGPClassifier(image_shape=(1, 4, 4), max_iter=3).fit(X, labels)
    assert isinstance(clf.kernel_, ConvDEQ) and clf.kernel_.image_shape == (1, 4, 4)
    assert clf.predict_proba(X).shape == (30, 2)
    assert clf.score(X, labels) > 0.7


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(image_shape=(3, 4)), "image_shape \\(3, 4\\) has 12 values per image, but X has 16 features"),
        (dict(image_shape=(4, 4), ard=True), "ard=True is not available with image_shape"),
        (dict(image_shape=(4, 4), kernel_size=2), "kernel_size must be a positive odd integer"),
        (dict(image_shape=(4, 4), readout="max"), "'readout' parameter"),
        (dict(image_shape=(4, 4), input_variance=[1.0, 2.0]), "input_variance must be a scalar with image_shape"),
        (dict(image_shape=(0, 4)), "image_shape"),
    ],
)
def test_estimators_reject_bad_image_options(rng, options, message):
    from deq_kernel.sklearn import DEQGPRegressor

    X, y = _tiny_images(rng, 6)
    with pytest.raises(ValueError, match=message):
        DEQGPRegressor(optimizer=None, **options).fit(X, y)


@pytest.mark.parametrize("options", [dict(kernel_size=5), dict(readout="gap")])
def test_estimators_refuse_image_options_without_image_shape(rng, options):
    """Without image_shape the kernel is the fully connected one: a kernel_size or readout would be ignored."""
    from deq_kernel.sklearn import DEQGPRegressor

    X, y = _tiny_images(rng, 6)
    with pytest.raises(ValueError, match="need image_shape"):
        DEQGPRegressor(optimizer=None, **options).fit(X, y)
