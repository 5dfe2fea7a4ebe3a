"""A compiled UNet (torch.compile, what --torch_compile does) against the eager one, per guide.

The UNets and inputs are test_bench_train_step's (CPU: the embedded tiny SD-shaped UNet, B=4,
32x32 latents; CUDA: SD v1.5's UNet at 512 px, fp16), one fresh copy per side, the compiled one
compiled in place as the trainer does. A step is forward(s) + backward of the LoRA loss.
``compile_s`` is the first compiled step's wall time (tracing and code generation included, the
capture's armed and unarmed graphs for sac); ``step_ratio`` the compiled step's median over the
eager one's, timed interleaved. The UNet compiles through train.compile_unet, so inductor on CPU runs
without its layout optimization (benchmarks/RESULTS.md, "The inductor gap"), as --torch_compile does.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import device_name, interleaved_medians, record, run_ours
from test_bench_train_step import _setup

from sat_train.run.prepare import compile_unet


def backends(device: torch.device) -> list[str]:
    return ["aot_eager", "inductor"] if device.type == "cpu" else ["inductor"]


def fresh_step(device: torch.device, guide_name: str, compile_backend: str | None):
    """One step of ``guide_name`` ("none" | "sac") on a fresh LoRA UNet (test_bench_train_step's),
    compiled in place as --torch_compile does with ``compile_backend`` unless None."""
    steps = _setup.__wrapped__(device.type)
    step = steps.step(guide_name)  # processors and capture hooks first: the compiled graphs include them
    if compile_backend is not None:
        compile_unet(steps.unet, compile_backend, device)
    return step


def first_call_seconds(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@pytest.mark.parametrize("guide_name", ["none", "sac"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_step_vs_eager(benchmark, device, guide_name, compile_backend):
    if compile_backend not in backends(device):
        pytest.skip(f"{compile_backend} is timed on CPU only")
    torch._dynamo.reset()
    eager = fresh_step(device, guide_name, None)
    compiled = fresh_step(device, guide_name, compile_backend)
    compile_s = first_call_seconds(compiled, device)
    times = interleaved_medians({"eager": eager, "compiled": compiled}, device, min_run_time=5.0)
    run_ours(benchmark, compiled, device)
    record(benchmark, f"compiled step {guide_name} {compile_backend} [{device_name(device)}]",
           compile_s=compile_s, eager_ms=times["eager"] * 1e3, compiled_ms=times["compiled"] * 1e3,
           step_ratio=times["compiled"] / times["eager"])
