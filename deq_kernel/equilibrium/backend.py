"""Where elementwise kernels run: fused by ``torch.compile`` when it pays and works, else eager.

The pair computations are long chains of elementwise operations over ``n x m`` arrays.
Eagerly, each operation is a pass over memory; compiled, the chain becomes one fused,
vectorised loop, two to three times faster. But compilation is expensive: tens of seconds
per kernel the first time on a machine, and still several seconds in every new process
(tracing and loading, even when inductor's disk cache holds the code). So
``settings.compile("auto")`` never makes a call wait for it. The kernels of pair arrays of
at least :data:`COMPILE_MIN_ELEMENTS` entries run eagerly; once a process has spent
:data:`COMPILE_AFTER_SECONDS` in them (a long fit, a large prediction), the signatures it
uses are compiled in the background, by one low-priority worker thread, and each is used
from the call after it is ready. Short jobs therefore never pay for compilation, and long
ones are compiled while they run. ``settings.compile(True)`` compiles at once (the call
waits); ``False`` never compiles.

Every distinct signature (the function, and its arguments' dtypes, dimensions, size-1
dimensions and constants) is compiled as its own function, so that the library never needs
more than dynamo's default number of recompilations of one function and never changes
dynamo's settings, which belong to the process. A signature whose compilation fails is run
eagerly from then on (one warning per device); results agree to rounding either way.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .. import settings

__all__ = [
    "COMPILE_MIN_ELEMENTS",
    "OutputTooLargeError",
    "available_memory",
    "block_elements",
    "check_output_fits",
    "fused",
    "may_compile",
    "wait_compiled",
]

#: Smallest pair array for which ``settings.compile("auto")`` compiles.
COMPILE_MIN_ELEMENTS = 1 << 22
#: Default block sizes (pair entries handled at once), eager and compiled: eager
#: temporaries are a dozen arrays of a block, compiled kernels have none. On a CPU a
#: block should stay near the cache; on a GPU it should fill the device.
BLOCK_ELEMENTS = {"cpu": (1 << 18, 1 << 22), "cuda": (1 << 24, 1 << 27)}
#: Failed compilations on a device, without a success, after which it is no longer tried there.
GIVE_UP_AFTER = 3
#: Seconds of eager kernels (of large pair arrays) after which ``"auto"`` starts compiling.
COMPILE_AFTER_SECONDS = 20.0


def may_compile(elements: int, device: torch.device) -> bool:
    """Whether :func:`fused` may run the kernels of a pair array of ``elements`` entries compiled.

    ``False`` means they always run eagerly, so that they may use data-dependent control flow.
    """
    mode = settings.compile.value()
    if mode is False or not hasattr(torch, "compile"):
        return False
    if mode == "auto" and elements < COMPILE_MIN_ELEMENTS:
        return False
    return not compile_failed(device.type)


def block_elements(total: int, device: torch.device) -> int:
    """Pair entries to handle per block: ``settings.max_block_size``, else a default."""
    chosen = settings.max_block_size.value()
    if chosen is not None:
        return chosen
    eager, compiled = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])
    return compiled if may_compile(total, device) else eager


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a compiled function specialises on: tensors' dtype, device, dimensions and size-1 dimensions."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.device.type, a.dim(), tuple(size == 1 for size in a.shape), a.requires_grad))
        elif isinstance(a, (bool, int, float, str, type(None))):
            key.append((type(a), a))
        else:
            key.append(type(a))
    return tuple(key)


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo counts recompilations per code object."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _Variant:
    """One signature of one function: its compiled form and whether it is ready."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self.state = "new"  # -> "queued" -> "ready" or "failed"
        self.done = threading.Event()

    @property
    def compiled(self) -> Callable[..., Any]:
        # Made on first use: creating it imports the compiler stack, which costs a second or two.
        if self._compiled is None:
            self._compiled = torch.compile(_own_copy(self.fn), dynamic=True)
        return self._compiled


#: Signatures kept (the least recently added beyond it are forgotten; their code stays cached on disk).
MAX_VARIANTS = 256

_lock = threading.Lock()
_variants: OrderedDict[tuple[Any, ...], _Variant] = OrderedDict()
_failures: dict[str, int] = {}
_succeeded: set[str] = set()
_warned: set[str] = set()
_jobs: queue.Queue = queue.Queue()
_worker: threading.Thread | None = None
_eager_seconds = 0.0


def compile_failed(device_type: str) -> bool:
    """True once compilation has failed :data:`GIVE_UP_AFTER` times on this device type without a success."""
    return device_type not in _succeeded and _failures.get(device_type, 0) >= GIVE_UP_AFTER


def _record(variant: _Variant, device_type: str, error: BaseException | None) -> None:
    with _lock:
        if error is None:
            variant.state = "ready"
            _succeeded.add(device_type)
        else:
            variant.state = "failed"
            _failures[device_type] = _failures.get(device_type, 0) + 1
            first = device_type not in _warned
            _warned.add(device_type)
    variant.done.set()
    if error is not None and first:
        warnings.warn(
            f"torch.compile is unavailable on {device_type} ({type(error).__name__}: {error}); "
            "deq_kernel continues with eager kernels",
            RuntimeWarning,
            stacklevel=4,
        )


def _work() -> None:
    """The background worker: compile queued signatures one at a time, at the lowest priority."""
    with contextlib.suppress(AttributeError, OSError):  # Linux: a thread has a niceness of its own
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    while True:
        variant, device_type, args = _jobs.get()
        try:
            variant.compiled(*args)
        except Exception as exc:  # any failure means: run this signature eagerly
            _record(variant, device_type, exc)
        else:
            _record(variant, device_type, None)
        finally:
            _jobs.task_done()


def _enqueue(variant: _Variant, device_type: str, args: tuple[Any, ...]) -> None:
    global _worker
    # The worker runs the function once on copies (the block's own arrays are written to),
    # with the same strides, so that the compiled function's guards hold for the real calls.
    copies = tuple(_copy(a) if isinstance(a, torch.Tensor) else a for a in args)
    with _lock:
        if variant.state != "new":
            return
        variant.state = "queued"
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, name="deq_kernel-compile", daemon=True)
            _worker.start()
    _jobs.put((variant, device_type, copies))


def _copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t.detach())


def wait_compiled(timeout: float | None = None) -> bool:
    """Block until every queued background compilation has finished (or ``timeout`` seconds); True if none is left.

    For benchmarks and tests that want the compiled kernels; a program never needs to call it.
    """
    with _lock:
        pending = [v for v in _variants.values() if v.state == "queued"]
    return all(v.done.wait(timeout) for v in pending)


def fused(fn: Callable[..., Any], total: int, device: torch.device) -> Callable[..., Any]:
    """``fn`` itself, or a callable that runs its compiled form when ``settings.compile`` asks for it and it is ready.

    ``total`` is the size of the whole pair array the call belongs to.
    """
    if not may_compile(total, device):
        return fn
    background = settings.compile.value() == "auto"

    def run(*args: Any) -> Any:
        key = (fn, *_signature(args))
        with _lock:
            variant = _variants.get(key)
            if variant is None:
                variant = _variants[key] = _Variant(fn)
                while len(_variants) > MAX_VARIANTS:
                    _variants.popitem(last=False)
        if variant.state == "ready":
            try:
                return variant.compiled(*args)
            except Exception as exc:  # a recompilation for unforeseen arguments failed
                _record(variant, device.type, exc)
                return fn(*args)
        if variant.state == "failed" or compile_failed(device.type):
            return fn(*args)
        if background:
            global _eager_seconds
            if _eager_seconds >= COMPILE_AFTER_SECONDS:
                _enqueue(variant, device.type, args)
            start = time.perf_counter()
            out = fn(*args)
            _eager_seconds += time.perf_counter() - start  # a race here only shifts the threshold
            return out
        with _lock:  # compile here, now (settings.compile(True))
            mine = variant.state == "new"
            if mine:
                variant.state = "queued"
        if not mine:
            variant.done.wait()
            return variant.compiled(*args) if variant.state == "ready" else fn(*args)
        try:
            out = variant.compiled(*args)
        except Exception as exc:  # compiler missing or failing: this signature runs eagerly
            _record(variant, device.type, exc)
            return fn(*args)
        _record(variant, device.type, None)
        return out

    return run


#: Outputs up to this size are not checked against the free memory.
SMALL_OUTPUT_BYTES = 1 << 26


class OutputTooLargeError(ValueError, MemoryError):
    """The requested kernel matrix alone would not fit in the memory of its device.

    A ``ValueError`` (the request is too large for the arguments given) and a
    ``MemoryError`` (what it guards against), raised before anything is allocated.
    """


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, if it has one."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        return max(int(limit) - used, 0)
    except (OSError, ValueError):
        return None


def _host_free() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes a new tensor on ``device`` can still take, or None where that is unknown.

    CPU: the smaller of the host's available memory and what is left under a cgroup
    limit. CUDA: the free device memory plus what PyTorch's caching allocator holds
    unused.
    """
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free + cached)
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    known = [m for m in (_host_free(), _cgroup_free()) if m is not None]
    return min(known) if known else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_output_fits(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, working: torch.dtype | None = None
) -> None:
    """Raise :class:`OutputTooLargeError` if a tensor of ``shape`` cannot fit on ``device``.

    Called before any allocation, so that an impossible request fails at once with a
    clear message instead of swapping the machine or killing the process. ``working``: the
    result is computed in that dtype first and then converted (both are held at once).
    """
    elements = 1
    for size in shape:
        elements *= int(size)
    needed = elements * torch.empty((), dtype=dtype).element_size()
    if working is not None:
        needed += elements * torch.empty((), dtype=working).element_size()
    if needed <= SMALL_OUTPUT_BYTES:
        return  # asking the system costs more than such a matrix
    free = available_memory(device)
    if free is None or needed <= free:
        return
    wider = ", or use float32" if dtype == torch.float64 else ""
    raise OutputTooLargeError(
        f"the kernel matrix of shape {tuple(shape)} ({dtype}) needs {_gib(needed)} on {device}, more than the "
        f"{_gib(free)} available; compute it in row blocks (equilibrium_covariance(x1[i:j], x2)) or lazily "
        f"(DEQKernel's lazy tensors, deq_kernel.dask.kernel_matrix){wider}. "
        "deq_kernel.settings.max_block_size bounds only the temporaries, not the output"
    )
