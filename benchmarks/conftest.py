"""Shared benchmark plumbing: devices, a synchronized timer, and a ratio table at the end.

Run: ``pytest benchmarks --benchmark-only`` (add ``--benchmark-json out.json`` and then
``python benchmarks/report.py out.json`` for the table and a PNG chart). Benchmarks compare
implementations side by side in one run and store medians, ratios and peak memory in each
benchmark's ``extra_info``; they assert nothing about speed, so noise never fails a run.
"""

from __future__ import annotations

import os
import threading
import time

# Benchmarks time compiled kernels: never Triton's interpreter (set before sat_kernels imports).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils import benchmark as torch_benchmark  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_ROWS: list[str] = []


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def median_seconds(fn, min_run_time: float = 0.5) -> float:
    """Median wall time of fn(); torch's Timer synchronizes CUDA around each block."""
    fn()  # warm-up: Triton compiles, caches fill
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run_ours(benchmark, fn, device: torch.device) -> None:
    """Let pytest-benchmark time our implementation (synchronized on CUDA)."""

    def synced():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    synced()
    benchmark.pedantic(synced, rounds=20 if device.type == "cuda" else 5, iterations=1, warmup_rounds=1)


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


def record(benchmark, case: str, **info) -> None:
    """Store numbers in extra_info and queue one summary line for the end of the run."""
    benchmark.extra_info.update(info)
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    _ROWS.append(f"{case}: {shown}")


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        terminalreporter.section("sat benchmark ratios")
        for row in _ROWS:
            terminalreporter.write_line(row)
