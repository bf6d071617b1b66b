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
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import settings

__all__ = ["COMPILE_MIN_ELEMENTS", "block_elements", "fused"]

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


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
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
