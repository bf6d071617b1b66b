"""deq_kernel.dask on a LocalCluster of two worker processes on the loopback interface."""

from __future__ import annotations

import ctypes
import platform
import sys
import time

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import deq_kernel  # noqa: E402
from deq_kernel import dask as deq_dask  # noqa: E402
from deq_kernel.sklearn import DEQGPClassifier, DEQGPRegressor  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(7)
    X = r.normal(size=(400, 5))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] + 0.05 * r.normal(size=400)
    return X, y


@pytest.fixture(scope="module")
def regressor(data):
    """An exact GP at its initial hyperparameters (prediction is what is tested, not fitting)."""
    X, y = data
    return DEQGPRegressor(optimizer=None).fit(X, y)


def test_kernel_matrix_is_lazy_blockwise_and_equals_the_in_memory_matrix(client, data):
    X, _ = data
    Z = X[:150] + 0.3
    iv = np.array([0.5, 1.0, 1.5, 2.0, 2.5])
    hypers = {"weight_variance": 1.4, "input_variance": iv, "bias_variance": 0.2}
    Xd = da.from_array(X, chunks=(100, 5))
    K = deq_dask.kernel_matrix(Xd, **hypers)
    assert isinstance(K, da.Array) and K.numblocks == (4, 4) and K.dtype == np.float64
    expected = deq_kernel.equilibrium_covariance(X, **hypers).numpy()
    np.testing.assert_allclose(K.compute(), expected, rtol=0, atol=1e-12 * np.abs(expected).max())

    # Rectangular, with features split over two chunks (gathered into each task) and another activation.
    Xf, Zf = da.from_array(X, chunks=(150, (2, 3))), da.from_array(Z, chunks=(50, (2, 3)))
    K = deq_dask.kernel_matrix(Xf, Zf, activation="erf", weight_variance=0.5, bias_variance=0.1)
    assert K.numblocks == (3, 3)
    expected = deq_kernel.equilibrium_covariance(X, Z, activation="erf", weight_variance=0.5, bias_variance=0.1)
    np.testing.assert_allclose(K.compute(), expected.numpy(), rtol=0, atol=1e-12 * float(expected.abs().max()))


def test_kernel_matrix_bad_input(data):
    X, _ = data
    Xd = da.from_array(X, chunks=(100, (2, 3)))
    with pytest.raises(ValueError, match="Z must be chunked like X along the features"):
        deq_dask.kernel_matrix(Xd, da.from_array(X, chunks=(100, 5)))
    with pytest.raises(TypeError, match="X must hold float32, float64 or integer values, got dtype <U"):
        deq_dask.kernel_matrix(da.from_array(X.astype(str)))
    with pytest.raises(TypeError, match="Z must hold"):
        deq_dask.kernel_matrix(Xd, da.from_array(X.astype(complex)))
    with pytest.raises(ValueError, match="Z must have as many features as X"):
        deq_dask.kernel_matrix(Xd, da.from_array(X[:, :3]))
    with pytest.raises(ValueError, match="X must be 2-D"):
        deq_dask.kernel_matrix(da.from_array(X[0]))
    with pytest.raises(ValueError, match="weight_variance"):
        deq_dask.kernel_matrix(Xd, weight_variance=2.5)  # past the relu bound, refused before any task
    # Integers are read as float64.
    ints = da.from_array(np.arange(12).reshape(4, 3), chunks=2)
    assert deq_dask.kernel_matrix(ints).dtype == np.float64


def test_distributed_prediction_equals_in_memory_prediction(client, data, regressor):
    X, y = data
    X_new = np.random.default_rng(1).normal(size=(1000, 5))
    Xd = da.from_array(X_new, chunks=(250, 5))
    for reg in (regressor, DEQGPRegressor(method="svgp", n_inducing=32, epochs=1, random_state=0).fit(X, y)):
        mean, std = deq_dask.predict(reg, Xd, return_std=True)
        assert isinstance(mean, da.Array) and mean.numblocks == (4,)
        # One task per block, and the estimator is a single key of the graph.
        graph = dict(mean.__dask_graph__())
        assert sum(str(key).startswith("deq-estimator-") for key in graph) == 1
        mean, std = client.compute([mean, std], sync=True)
        expected_mean, expected_std = reg.predict(X_new, return_std=True)
        np.testing.assert_allclose(mean, expected_mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(std, expected_std, rtol=0, atol=1e-10)

    labels = (y > 0).astype(int) + (y > 1)
    for clf in (
        DEQGPClassifier(optimizer=None, random_state=0).fit(X, labels),
        DEQGPClassifier(method="svgp", n_inducing=16, epochs=1, random_state=0).fit(X, y > 0),
    ):
        proba = deq_dask.predict_proba(clf, Xd)
        assert proba.shape == (1000, len(clf.classes_))
        np.testing.assert_allclose(proba.compute(), clf.predict_proba(X_new), rtol=0, atol=1e-10)
        np.testing.assert_array_equal(deq_dask.predict(clf, Xd).compute(), clf.predict(X_new))


def _mapped_bytes_of_a_4_mib_temporary():
    """Bytes glibc maps afresh (outside its heaps) to allocate one 4 MiB array, in the calling process."""
    fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in fields]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblkhd
    temporary = np.ones(1 << 19)
    mapped = mallinfo2().hblkhd - before
    del temporary
    return mapped


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc's allocator"
)
def test_mean_and_std_of_a_block_come_from_one_prediction(data, regressor, monkeypatch):
    # Computed together (or as unoptimised delayed parts), every block is predicted once.
    calls = []
    predict_block = deq_dask._predict_block

    def counted(x, estimator, kind):
        calls.append(x.shape[0])
        return predict_block(x, estimator, kind)

    monkeypatch.setattr(deq_dask, "_predict_block", counted)
    Xd = da.from_array(np.random.default_rng(2).normal(size=(300, 5)), chunks=(100, 5))
    mean, std = deq_dask.predict(regressor, Xd, return_std=True)
    dask.compute(mean, std, scheduler="synchronous")
    assert calls == [100, 100, 100]
    calls.clear()
    parts = [p for column in (mean, std) for p in column.to_delayed(optimize_graph=False)]
    dask.compute(*parts, scheduler="synchronous")
    assert sorted(calls) == [100, 100, 100]


def test_worker_block_temporaries_reuse_freed_memory(data, regressor):
    """A nanny's worker maps every temporary of a megabyte or more, until a task of deq_kernel.dask runs."""
    X, _ = data
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with distributed.Client(cluster, set_as_default=False) as fresh:
        probe = _mapped_bytes_of_a_4_mib_temporary
        # The worker's other threads allocate and free too, and one free between the probe's two
        # readings shows as less: the largest of three probes is the temporary's own mapping.
        mapped = max(fresh.submit(probe, pure=False).result() for _ in range(3))
        assert mapped >= 4 << 20  # MALLOC_TRIM_THRESHOLD_ pinned it
        mean = fresh.compute(deq_dask.predict(regressor, da.from_array(X, chunks=(100, 5)))).result()
        np.testing.assert_allclose(mean, regressor.predict(X), rtol=0, atol=1e-10)
        assert fresh.submit(probe, pure=False).result() == 0
    cluster.close()


def test_prediction_over_a_dask_dataframe(client, data, regressor):
    dd = pytest.importorskip("dask.dataframe")
    pd = pytest.importorskip("pandas")
    X, _ = data
    reg = regressor
    frame = pd.DataFrame(X[:300], columns=list("abcde"), index=np.arange(1000, 1300))
    ddf = dd.from_pandas(frame, npartitions=3)
    out = deq_dask.predict(reg, ddf, return_std=True).compute()
    mean, std = reg.predict(X[:300], return_std=True)
    assert list(out.columns) == ["mean", "std"] and list(out.index) == list(frame.index)
    np.testing.assert_allclose(out["mean"], mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["std"], std, rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match="numeric columns only, got non-numeric columns \\['e'\\]"):
        deq_dask.predict(reg, dd.from_pandas(frame.assign(e="text"), npartitions=2))
    with pytest.raises(ValueError, match="X has 4 columns"):
        deq_dask.predict(reg, ddf[["a", "b", "c", "d"]])


def test_prediction_bad_input(data):
    X, y = data
    with pytest.raises(ValueError, match="estimator must be fitted"):
        deq_dask.predict(DEQGPRegressor(), da.from_array(X))
    reg = DEQGPRegressor(optimizer=None).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="X has 3 features, but the estimator was fitted with 5"):
        deq_dask.predict(reg, da.from_array(X[:, :3]))
    with pytest.raises(TypeError, match="X must hold"):
        deq_dask.predict(reg, da.from_array(X.astype(object), chunks=100))
    with pytest.raises(TypeError, match="estimator must have predict_proba"):
        deq_dask.predict_proba(reg, da.from_array(X))


def _clustered(r, n):
    """A dense bulk and 40 small, far-off clusters: data that uniform landmarks cover badly."""
    bulk = r.normal(scale=0.3, size=(n - 400, 4)) + np.array([2.0, 0.0, 0.0, 0.0])
    small = np.repeat(3 * r.normal(size=(40, 4)), 10, axis=0) + 0.05 * r.normal(size=(400, 4))
    return r.permutation(np.concatenate([bulk, small]))


def test_conjugate_gradients_match_cholesky_at_n_5000(client):
    r = np.random.default_rng(3)
    n = 5000
    X = _clustered(r, n)
    y = np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * r.normal(size=n)
    hypers = {"weight_variance": 1.2, "bias_variance": 0.1}
    K = deq_kernel.equilibrium_covariance(X, **hypers).numpy()
    K[np.diag_indices(n)] += 0.01
    expected = np.linalg.solve(K, y)
    Xd = da.from_array(X, chunks=(1250, 4))
    results = {
        name: deq_dask.solve(
            Xd, y, noise=0.01, tol=1e-10, preconditioner_rank=300, preconditioner=name, client=client, **hypers
        )
        for name in deq_dask.PRECONDITIONERS
    }
    for name, result in results.items():
        assert result.converged, (name, result.iterations, result.residual)
        assert np.linalg.norm(result.solution - expected) <= 1e-6 * np.linalg.norm(expected), name
        # The reported residual is the true one, recomputed from the solution.
        true = np.linalg.norm(y - K @ result.solution) / np.linalg.norm(y)
        assert result.residual == pytest.approx(true, rel=0, abs=1e-12), name
        assert result.residual <= 1e-10
    # Greedy landmarks reach the small clusters that uniform draws mostly miss.
    pivoted, uniform = results["pivoted_cholesky"].iterations, results["uniform"].iterations
    assert pivoted < uniform, (pivoted, uniform)


def _pivoted_cholesky_in_memory(K, rank):
    """Partial pivoted Cholesky of a matrix held whole (Harbrecht, Peters and Schneider, 2012)."""
    residual = np.diag(K).copy()
    factor, pivots = np.zeros((K.shape[0], rank)), []
    for step in range(rank):
        pivot = int(np.argmax(residual))
        pivots.append(pivot)
        factor[:, step] = (K[:, pivot] - factor[:, :step] @ factor[pivot, :step]) / np.sqrt(residual[pivot])
        residual = np.diag(K) - np.sum(factor[:, : step + 1] ** 2, axis=1)
    return factor, pivots


def test_pivoted_cholesky_factor_equals_the_in_memory_factorisation(client, data):
    X, _ = data
    hypers = {"weight_variance": 1.2, "bias_variance": 0.1}
    blocks = client.scatter([X[:150], X[150:300], X[300:]])
    slices = [slice(0, 150), slice(150, 300), slice(300, 400)]
    params = deq_dask._kernel_params("relu", 1.2, 1.0, 0.1, 1.0, "nngp", {}, 5)
    factor = deq_dask._pivoted_cholesky(blocks, slices, params, 30, client, 0)
    K = deq_kernel.equilibrium_covariance(X, **hypers).numpy()
    expected, pivots = _pivoted_cholesky_in_memory(K, 30)
    np.testing.assert_allclose(factor, expected, rtol=0, atol=1e-9)
    # F F^T is the Nystrom approximation on the pivots.
    nystrom = K[:, pivots] @ np.linalg.solve(K[np.ix_(pivots, pivots)], K[pivots])
    np.testing.assert_allclose(factor @ factor.T, nystrom, rtol=0, atol=1e-8)

    # Five distinct points repeated: rank five, and the factorisation stops there.
    repeated = np.repeat(X[:5], 20, axis=0)
    factor = deq_dask._pivoted_cholesky(client.scatter([repeated]), [slice(0, 100)], params, 30, client, 0)
    assert factor.shape == (100, 5)
    K = deq_kernel.equilibrium_covariance(repeated, **hypers).numpy()
    np.testing.assert_allclose(factor @ factor.T, K, rtol=0, atol=1e-10 * np.abs(K).max())


def test_solve_bad_input(data):
    X, y = data
    Xd = da.from_array(X, chunks=100)
    with pytest.raises(ValueError, match="noise must be a positive number"):
        deq_dask.solve(Xd, y, noise=0.0)
    with pytest.raises(ValueError, match=r"y must have shape \(400,\)"):
        deq_dask.solve(Xd, y[:10], noise=0.1)
    with pytest.raises(TypeError, match="y must be numeric"):
        deq_dask.solve(Xd, y.astype(str), noise=0.1)
    with pytest.raises(ValueError, match="preconditioner_rank must be an integer >= 0"):
        deq_dask.solve(Xd, y, noise=0.1, preconditioner_rank=-1)
    with pytest.raises(ValueError, match="preconditioner must be one of 'pivoted_cholesky', 'uniform', got 'qr'"):
        deq_dask.solve(Xd, y, noise=0.1, preconditioner="qr")


def _wait_until_running(client, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not any(client.processing().values()):
        if time.monotonic() > deadline:
            raise TimeoutError("no task started")
        time.sleep(0.05)


def test_a_worker_lost_mid_computation_loses_nothing(client, regressor):
    reg = regressor
    X_new = np.random.default_rng(2).normal(size=(2000, 5))
    mean = deq_dask.predict(reg, da.from_array(X_new, chunks=(100, 5)))
    expected = reg.predict(X_new)

    # One worker is restarted (its process killed and replaced) while the blocks run: its tasks
    # are rescheduled, and the estimator, a key of the graph, is sent again where it is needed.
    future = client.compute(mean, retries=2)
    _wait_until_running(client)
    victim = next(iter(client.scheduler_info()["workers"]))
    client.restart_workers([victim])
    np.testing.assert_allclose(future.result(timeout=120), expected, rtol=0, atol=1e-10)

    # A whole-cluster restart drops every result held; the same lazy collection computes again.
    client.restart()
    np.testing.assert_allclose(client.compute(mean, retries=2).result(timeout=120), expected, rtol=0, atol=1e-10)


def test_get_client(client):
    assert deq_dask.get_client(client) is client
    assert deq_dask.get_client() is client  # the current default client
    start = time.monotonic()
    with pytest.raises(OSError, match=r"client: cannot reach a dask scheduler at 'tcp://127\.0\.0\.1:9'"):
        deq_dask.get_client("tcp://127.0.0.1:9", timeout=1)
    assert time.monotonic() - start < 30
    with pytest.raises(TypeError, match=r"client must be a distributed\.Client, a scheduler address or None"):
        deq_dask.get_client(8786)


def test_embedded_local_cluster_on_loopback(monkeypatch):
    """Without a default client, one LocalCluster of worker processes on 127.0.0.1 is started once."""

    def no_default():
        raise ValueError("No clients found")

    monkeypatch.setattr(distributed, "default_client", no_default)
    monkeypatch.setattr(deq_dask, "_embedded", {})
    embedded = deq_dask.get_client(n_workers=1)
    try:
        assert deq_dask.get_client() is embedded
        assert embedded.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = embedded.scheduler_info()["workers"]
        assert all(address.startswith("tcp://127.0.0.1:") for address in workers)
        assert all(info["nthreads"] == 1 for info in workers.values())
    finally:
        deq_dask._close_embedded()


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r'pip install "deq-kernel\[dask\]"'):
        deq_dask.kernel_matrix(np.zeros((2, 2)))


def test_the_allocator_of_the_users_own_process_is_never_changed(monkeypatch):
    # MALLOC_TRIM_THRESHOLD_ in the user's own environment (not a dask worker): no mallopt.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    deq_dask._unpin_mmap_threshold.cache_clear()
    try:
        assert deq_dask._unpin_mmap_threshold() is False
    finally:
        deq_dask._unpin_mmap_threshold.cache_clear()


def test_threaded_schedulers_give_the_serial_predictions(data, regressor):
    # Dask's threaded scheduler (8 threads) and a distributed worker with 4 threads: each block
    # is predicted on its own thread, at the same time as the others.
    X, _ = data
    X_new = np.random.default_rng(2).normal(size=(800, 5))
    Xd = da.from_array(X_new, chunks=(100, 5))
    expected_mean, expected_std = regressor.predict(X_new, return_std=True)
    mean, std = deq_dask.predict(regressor, Xd, return_std=True)
    threaded = da.compute(mean, std, scheduler="threads", num_workers=8)
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None)
    with distributed.Client(cluster) as c:
        clustered = c.compute([mean, std], sync=True)
    cluster.close()
    kernel = deq_dask.kernel_matrix(Xd, X)
    for got_mean, got_std in (threaded, clustered):
        np.testing.assert_allclose(got_mean, expected_mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got_std, expected_std, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        kernel.compute(scheduler="threads", num_workers=8),
        deq_kernel.equilibrium_covariance(X_new, X).numpy(),
        rtol=0,
        atol=1e-12,
    )
