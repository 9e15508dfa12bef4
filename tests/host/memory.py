"""Peak tensor memory of a piece of work, on the CPU or a CUDA device (tests and benchmarks).

On CUDA the allocator's own peak counter is the measure. On the CPU there is none, and the process's
peak RSS is set by whatever was built first, so storages are counted instead: every storage an
operator creates inside the region (not a view of one of its inputs) is added when it appears and
removed when it is freed (storages keep their Python object while alive, so a weak reference fires
exactly at the free). What existed before the region (weights, inputs) is not counted.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or in-place result shares an input's storage: nothing was allocated
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs:
                    self._add(storage)
        return out

    def _add(self, storage) -> None:
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        self.live[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))

    def _free(self, key: int, size: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= size


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak``: the most bytes allocated at once above the
    start (or above the last :meth:`restart`)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._counter = None if device == "cuda" else _StorageCounter()
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self._counter is not None:
            self._counter.__enter__()
        self.restart()
        return self

    def __exit__(self, *exc):
        if self._counter is not None:
            return self._counter.__exit__(*exc)
        torch.cuda.synchronize()
        return None

    def restart(self) -> None:
        """Count the peak from here, above what is allocated now."""
        if self._counter is not None:
            self._counter.peak = self._base = self._counter.current
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()

    @property
    def peak(self) -> int:
        top = self._counter.peak if self._counter is not None else torch.cuda.max_memory_allocated()
        return top - self._base
