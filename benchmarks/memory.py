"""Memory meters for the benchmarks (and the memory tests in tests/): no side effects on import.

- ``PeakMemory`` / ``peak_mib``: the process's peak (CUDA allocator, or CPU resident set size).
- ``LiveTensorBytes`` / ``peak_tensor_mib``: peak bytes of tensors created while a block runs,
  tracked op by op: deterministic, and fine enough for the small models a CPU can train.
- ``saved_activation_mib``: what autograd saves for backward.
"""

from __future__ import annotations

import threading
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class PeakMemory:
    """Peak memory above the starting level while the block runs, in MiB.

    CUDA: the caching allocator's peak. CPU: resident set size sampled every 0.5 ms in a thread
    (large blocks come straight from mmap and go back on free, so RSS follows them).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            import psutil

            self._proc = psutil.Process()
            self._start = self._proc.memory_info().rss
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.mib = (peak - self._start) / 2**20
        return False


def peak_mib(fn, device: torch.device) -> float:
    with PeakMemory(device) as mem:
        fn()
    return mem.mib


def saved_activation_mib(fn) -> float:
    """MiB of distinct tensor storages autograd saves for backward while fn runs.

    Device-independent and deterministic; on CPU it stands in for peak memory, which RSS cannot
    resolve for small models (activations dominate a LoRA step's memory).
    """
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values()) / 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created (and still alive) while the mode is on: every op's
    outputs are tracked through weak references; parameters and inputs made before are not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() and storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        if self.current > self.peak:  # only a new high needs the dead ones dropped first
            for key, (ref, size) in list(self.live.items()):
                if ref.expired():
                    del self.live[key]
                    self.current -= size
            self.peak = max(self.peak, self.current)
        return out


def peak_tensor_mib(fn) -> float:
    with LiveTensorBytes() as meter:
        fn()
    return meter.peak / 2**20
