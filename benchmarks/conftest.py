"""Shared benchmark plumbing: devices, a synchronized timer, and a ratio table at the end.

Run: ``pytest benchmarks --benchmark-only`` (add ``--benchmark-json out.json`` and then
``python benchmarks/report.py out.json`` for the table and a PNG chart). Benchmarks compare
implementations side by side in one run and store medians, ratios and peak memory in each
benchmark's ``extra_info``; they assert nothing about speed, so noise never fails a run.
"""

from __future__ import annotations

import os
import statistics
import time

# Benchmarks time compiled kernels: never Triton's interpreter (set before sat_kernels imports).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_ROWS: list[str] = []


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def interleaved_medians(fns: dict, device: torch.device, min_run_time: float = 1.0, min_rounds: int = 5) -> dict:
    """Median seconds per call of each fn, timed in alternating blocks of calls.

    A shared machine's speed drifts (a step took 424 ms in one run and 531 ms in the next here);
    timing the paths turn about makes the drift hit all of them alike, so their ratios hold.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    calls = {}
    for name, fn in fns.items():  # warm-up (Triton compiles, caches fill), then ~20 ms blocks
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        calls[name] = max(1, int(0.02 / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in fns}
    deadline = time.perf_counter() + min_run_time * len(fns)
    while time.perf_counter() < deadline or len(samples[name]) < min_rounds:
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def gpu_kernel_seconds(fn, reps: int = 20) -> float:
    """Seconds of GPU kernel time per call (CUPTI through torch.profiler): what the device spends,
    without the host's launch overhead. Blocks of wall-clock calls (interleaved_medians) pipeline,
    so they measure max(host, GPU): for a ~20 us kernel the host's Python decides those."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        return sum(event.self_device_time_total for event in prof.key_averages()) / reps / 1e6
    except Exception as err:  # noqa: BLE001 - no CUPTI: keep the wall-clock rows of a one-shot GPU run
        print(f"gpu_kernel_seconds: the profiler failed ({type(err).__name__}: {err}); recording NaN")
        return float("nan")


def run_ours(benchmark, fn, device: torch.device) -> None:
    """Let pytest-benchmark time our implementation (synchronized on CUDA)."""

    def synced():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    synced()
    benchmark.pedantic(synced, rounds=20 if device.type == "cuda" else 5, iterations=1, warmup_rounds=1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


def record(benchmark, case: str, **info) -> None:
    """Store numbers in extra_info and queue one summary line for the end of the run; with
    SAT_BENCH_ROWS=FILE also append it there at once (a run cut off by a time limit keeps its rows)."""
    benchmark.extra_info.update(info)
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    _ROWS.append(f"{case}: {shown}")
    if os.environ.get("SAT_BENCH_ROWS"):
        with open(os.environ["SAT_BENCH_ROWS"], "a", encoding="utf-8") as rows_file:
            rows_file.write(f"{case}: {shown}\n")


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        terminalreporter.section("sat benchmark ratios")
        for row in _ROWS:
            terminalreporter.write_line(row)
