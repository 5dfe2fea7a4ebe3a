"""Memory meters for the benchmarks (and the memory tests in tests/); no side effects on import.

- ``peak_mib``: peak memory a block adds. CUDA: the caching allocator's peak. CPU: the peak of
  live tensor bytes, counted op by op (``LiveTensorBytes``): deterministic, and what torch itself
  allocates (resident set size would also show malloc keeping freed blocks, and cannot resolve a
  tiny model's activations).
- ``saved_activation_mib``: what autograd saves for backward.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created (and still alive) while the mode is on: every op's
    outputs are tracked through weak references; parameters and inputs made before are not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view (or in-place result) of an input allocates nothing: without this, every weight a
        # step reads through a view (linear's weight.t()) counted as new bytes, weights made before too
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() and storage.data_ptr() not in self.live and storage.data_ptr() not in inputs:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        if self.current > self.peak:  # only a new high needs the dead ones dropped first
            for key, (ref, size) in list(self.live.items()):
                if ref.expired():
                    del self.live[key]
                    self.current -= size
            self.peak = max(self.peak, self.current)
        return out


def peak_mib(fn, device: torch.device) -> float:
    """MiB that running fn() adds at its peak on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    with LiveTensorBytes() as meter:
        fn()
    return meter.peak / 2**20


def saved_activation_mib(fn) -> float:
    """MiB of distinct tensor storages autograd saves for backward while fn runs."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values()) / 2**20
