"""The full-size SDXL UNet's LoRA training step per guide on a GPU: step time and peak memory.

    python benchmarks/sdxl_gpu_step.py [--dtypes fp16 bf16] [--batch_sizes 1 2] [--budget_s 170]
                                       [--rows FILE] [--json FILE]
    python benchmarks/sdxl_gpu_step.py --tiny     # the same on the tiny SDXL-shaped UNet, on CPU

The UNet is stabilityai/stable-diffusion-xl-base-1.0's, built from its config (sdxl_unet.py; random
weights, no download), with the trainer's rank-4 LoRA in fp32 next to frozen half weights, under
autocast, SDPA attention (xformers when it loads), 1024 px (128x128 latents), conditioned as SDXL
is (77 x 2048 text states, pooled text embeds, time ids).
For each dtype and batch size, every guide's step (forward(s) + backward) runs once for its peak
memory (the allocator's; ``peak_gib`` counts the weights too), then all are timed in turn
(``interleaved_medians``); ``step_ratio`` and ``peak_ratio`` divide by the ``none`` step's. A step
that runs out of memory or fails is a row saying so (the other guides are still measured). Rows print
(and go to --rows) as each configuration finishes; a configuration that would overrun --budget_s is
skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
from conftest import device_name, interleaved_medians
from guided_step import GuideSteps, noised_inputs, sdxl_added_cond, with_lora
from memory import peak_mib
from sdxl_unet import SDXL_UNET

STEP_GUIDES = ("none", "sac", "sac --guide_recompute", "cac", "cac --guide_recompute")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The SDXL UNet with random weights, made in ``dtype`` on ``device`` (2.6 B weights: 5 GiB in half
    precision, and initializing them on a CPU takes minutes), or with ``tiny`` the demo's tiny
    SDXL-shaped one; with LoRA (fp32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:
        from sat_train.demo import build_sdxl_components

        return with_lora(build_sdxl_components().unet.to(device))  # measure_config casts it
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET)
    finally:
        torch.set_default_dtype(default_dtype)
    return with_lora(unet)


def cast_frozen(unet, dtype: torch.dtype) -> None:
    """The frozen weights in ``dtype``; the LoRA stays fp32, as the trainer keeps it."""
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def is_out_of_memory(err: Exception) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def error_name(err: Exception) -> str:
    """"OOM", or the error's type and first line (its traceback is printed: gpu_check.sh's log keeps it)."""
    if is_out_of_memory(err):
        return "OOM"
    traceback.print_exc()
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_peaks(steps: GuideSteps, fns: dict) -> dict:
    """guide -> its step's peak memory {peak_mib: added by the step, peak_gib: all allocated}, or
    {"error": error_name}; a guide that failed (out of memory, or a kernel's error on this GPU) leaves
    ``fns``, so the other guides are still measured."""
    device, peaks = steps.device, {}
    for guide in list(fns):
        try:
            peaks[guide] = {"peak_mib": peak_mib(fns[guide], device)}
            if device.type == "cuda":
                peaks[guide]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as err:  # noqa: BLE001 (one guide's failure must not lose the others' rows)
            steps.unet.zero_grad(set_to_none=True)
            free_cached_memory(device)
            peaks[guide] = {"error": error_name(err)}
            del fns[guide]
    return peaks


def measure_config(unet, dtype_name: str, batch: int, args, device: torch.device) -> list[dict]:
    """One row per guide at this dtype and batch size."""
    dtype = DTYPES[dtype_name]
    cast_frozen(unet, dtype)
    side = unet.config.sample_size if args.tiny else args.resolution // 8
    added = sdxl_added_cond(unet, batch, side * 8, device, dtype)
    s, alphas = noised_inputs(batch, side, unet.config.cross_attention_dim, device, dtype, added)
    steps = GuideSteps(unet, s, alphas, device, None if dtype == torch.float32 else dtype, exclusive=False)
    try:
        fns = {guide: steps.step(guide) for guide in args.guides}
        peaks = measure_peaks(steps, fns)
        times = interleaved_medians(fns, device, min_run_time=0.0, min_rounds=args.rounds) if fns else {}
    finally:
        steps.remove_hooks()
    base_time, base_peak = times.get("none"), peaks.get("none", {}).get("peak_mib")
    rows = []
    for guide in args.guides:
        row = dict(guide=guide, dtype=dtype_name, batch=batch, pixels=side * 8, **peaks[guide])
        if guide in times:
            row["step_ms"] = times[guide] * 1e3
            if base_time is not None:
                row["step_ratio"] = times[guide] / base_time
            if base_peak:
                row["peak_ratio"] = row["peak_mib"] / base_peak
        rows.append(row)
    return rows


def format_row(row: dict, device: torch.device) -> str:
    numbers = {k: v for k, v in row.items() if k not in ("guide", "dtype", "batch", "pixels")}
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    case = f"sdxl unet step {row['guide']} {row['dtype']} B={row['batch']} {row['pixels']}px"
    return f"{case} [{device_name(device)}]: {shown}"


def show_rows(rows: list[dict], device: torch.device, rows_path: str | None) -> None:
    """Print each row, and append it to ``rows_path`` at once (a run cut off by a time limit keeps it)."""
    for row in rows:
        line = format_row(row, device)
        print(line, flush=True)
        if rows_path:
            with open(rows_path, "a", encoding="utf-8") as rows_file:
                rows_file.write(line + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL-shaped UNet (an end-to-end check on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, help="default: fp16 bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--guides", nargs="+", choices=STEP_GUIDES, default=list(STEP_GUIDES))
    parser.add_argument("--resolution", type=int, default=1024, help="pixels (full-size UNet only)")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per guide, after two warm-up steps")
    parser.add_argument("--budget_s", type=float, default=170.0,
                        help="skip the configurations that would end past this many seconds from the start")
    parser.add_argument("--rows", help="append each row to this file as it is measured")
    parser.add_argument("--json", help="write every row and the machine here at the end")
    args = parser.parse_args(argv)
    if "none" not in args.guides:
        args.guides.insert(0, "none")  # every ratio divides by it
    if args.dtypes is None:
        args.dtypes = ["fp16", "bf16"] if args.device.startswith("cuda") else ["fp32"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start, device = time.perf_counter(), torch.device(args.device)
    unet = build_unet(args.tiny, device, DTYPES[args.dtypes[0]])
    print(f"UNet built in {time.perf_counter() - start:.0f}s: {sum(p.numel() for p in unet.parameters()):,} parameters",
          flush=True)
    configs = [(dtype, batch) for batch in sorted(args.batch_sizes) for dtype in args.dtypes]  # small first
    rows, seconds_per_sample = [], None
    for dtype_name, batch in configs:
        elapsed = time.perf_counter() - start
        if seconds_per_sample is not None and elapsed + seconds_per_sample * batch > args.budget_s:
            print(f"skipped {dtype_name} B={batch}: {elapsed:.0f}s used, ~{seconds_per_sample * batch:.0f}s more "
                  f"would pass --budget_s {args.budget_s:.0f}", flush=True)
            continue
        config_start = time.perf_counter()
        try:
            config_rows = measure_config(unet, dtype_name, batch, args, device)
        except Exception as err:  # noqa: BLE001 (e.g. out of memory while timing: the next configuration may fit)
            print(f"{dtype_name} B={batch}: {error_name(err)} while timing the steps", flush=True)
            free_cached_memory(device)
            continue
        rows += config_rows
        show_rows(config_rows, device, args.rows)
        seconds_per_sample = max(seconds_per_sample or 0.0, (time.perf_counter() - config_start) / batch)
    if args.json:
        from sat_train.faults import write_atomically

        report = dict(machine=device_name(device), torch=torch.__version__, tiny=args.tiny, rows=rows)
        write_atomically(args.json, json.dumps(report, indent=1).encode())
    print(f"done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
