"""Where elementwise kernels run: fused by ``torch.compile`` when it pays and works, else eager.

The pair computations are long chains of elementwise operations over ``n x m`` arrays.
Eagerly, each operation is a pass over memory; compiled, the chain becomes one fused,
vectorised loop. Compilation costs seconds on first use (inductor keeps its results on
disk, so later processes reuse them), so ``settings.compile("auto")`` compiles only for
arrays of at least :data:`COMPILE_MIN_ELEMENTS` entries. If compilation is unavailable
(no C++ compiler, an unsupported platform) or fails, the eager function is used, with
one warning, for the rest of the process; results agree to rounding either way.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
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
]

#: Smallest pair array for which ``settings.compile("auto")`` compiles.
COMPILE_MIN_ELEMENTS = 1 << 22
#: Default block sizes (pair entries handled at once), eager and compiled: eager
#: temporaries are a dozen arrays of a block, compiled kernels have none. On a CPU a
#: block should stay near the cache; on a GPU it should fill the device.
BLOCK_ELEMENTS = {"cpu": (1 << 18, 1 << 22), "cuda": (1 << 24, 1 << 27)}

_lock = threading.Lock()
_broken: set[str] = set()


def _wants_compile(elements: int, device: torch.device) -> bool:
    mode = settings.compile.value()
    if mode is False or not hasattr(torch, "compile"):
        return False
    if mode == "auto" and elements < COMPILE_MIN_ELEMENTS:
        return False
    return device.type not in _broken


def block_elements(total: int, device: torch.device) -> int:
    """Pair entries to handle per block: ``settings.max_block_size``, else a default."""
    chosen = settings.max_block_size.value()
    if chosen is not None:
        return chosen
    eager, compiled = BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])
    return compiled if _wants_compile(total, device) else eager


#: Compiled variants kept per kernel (dtypes, activations and broadcast patterns each need
#: one); past torch's default of 8 dynamo silently runs the function eagerly.
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    config = getattr(torch, "_dynamo", None) and torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if config is not None and getattr(config, name, RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
            setattr(config, name, RECOMPILE_LIMIT)
    return torch.compile(fn, dynamic=True)


def fused(fn: Callable[..., Any], total: int, device: torch.device) -> Callable[..., Any]:
    """``fn`` itself, or its compiled form when ``settings.compile`` asks for it and it works.

    ``total`` is the size of the whole pair array the call belongs to.
    """
    if not _wants_compile(total, device):
        return fn
    compiled = _compiled(fn)

    def run(*args: Any) -> Any:
        if device.type in _broken:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # compiler missing or failing: fall back for good
            with _lock:
                if device.type not in _broken:
                    _broken.add(device.type)
                    warnings.warn(
                        f"torch.compile is unavailable on {device.type} ({type(exc).__name__}: {exc}); "
                        "deq_kernel continues with eager kernels",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return fn(*args)

    return run


def compile_failed(device_type: str) -> bool:
    """True once compilation has failed on this device type in this process."""
    return device_type in _broken


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


def check_output_fits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Raise :class:`OutputTooLargeError` if a tensor of ``shape`` cannot fit on ``device``.

    Called before any allocation, so that an impossible request fails at once with a
    clear message instead of swapping the machine or killing the process.
    """
    elements = 1
    for size in shape:
        elements *= int(size)
    needed = elements * torch.empty((), dtype=dtype).element_size()
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
