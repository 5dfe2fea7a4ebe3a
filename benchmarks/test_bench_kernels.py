"""sat_kernels against the paths they replace, at SD v1.5 shapes (issue: benchmarks, items 1-2).

degrade_latents vs diffusers' SAG ``sag_masking`` (+ ``gaussian_blur_2d`` and
``DDPMScheduler.add_noise``); attention_mass_from_qk vs materialize-softmax-then-reduce.
"""

import types

import pytest
import torch
from conftest import device_name, gpu_kernel_seconds, interleaved_medians, record, run_ours
from memory import peak_mib

import sat_kernels
from sat_kernels import reference

HEADS, MAP = 8, (8, 8)  # SD v1.5 mid block at 512 px: 8 heads over 8x8 tokens


def _sag_masking():
    from diffusers import DDPMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    scheduler = DDPMScheduler()
    fake_pipe = types.SimpleNamespace(
        unet=types.SimpleNamespace(config=types.SimpleNamespace(attention_head_dim=HEADS)), scheduler=scheduler
    )
    return scheduler, lambda *args: StableDiffusionSAGPipeline.sag_masking(fake_pipe, *args)


def _degrade_inputs(batch, side, device):
    gen = torch.Generator().manual_seed(0)
    n = MAP[0] * MAP[1]
    x0 = torch.randn(batch, 4, side, side, generator=gen).to(device)
    eps = torch.randn(batch, 4, side, side, generator=gen).to(device)
    probs = torch.softmax(torch.randn(batch * HEADS, n, n, generator=gen) * 3, dim=-1).to(device)
    return x0, eps, probs


@pytest.mark.parametrize("saliency", ["probs", "mass"])
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_degrade_latents_vs_sag(benchmark, device, batch, saliency):
    scheduler, sag_masking = _sag_masking()
    x0, eps, probs = _degrade_inputs(batch, 64, device)
    t = torch.tensor(500, device=device)
    alphas = scheduler.alphas_cumprod.to(device)
    if saliency == "probs":
        ours = lambda: sat_kernels.degrade_latents(x0, eps, probs, MAP, alphas, t, heads=HEADS)  # noqa: E731
    else:
        mass = sat_kernels.attention_mass(probs, HEADS)
        ours = lambda: sat_kernels.degrade_latents(x0, eps, mass, MAP, alphas, t)  # noqa: E731
    original = lambda: sag_masking(x0, probs, MAP, t, eps)  # noqa: E731
    torch.testing.assert_close(ours(), original(), rtol=1e-4, atol=1e-4)  # same work, checked
    times = interleaved_medians({"original": original, "ours": ours}, device)
    t_orig, t_ours = times["original"], times["ours"]
    run_ours(benchmark, ours, device)
    info = dict(original_ms=t_orig * 1e3, ours_ms=t_ours * 1e3, speedup=t_orig / t_ours)
    if device.type == "cuda":  # wall clock includes each side's host overhead; kernel time does not
        gpu_orig, gpu_ours = gpu_kernel_seconds(original), gpu_kernel_seconds(ours)
        info.update(original_gpu_ms=gpu_orig * 1e3, ours_gpu_ms=gpu_ours * 1e3, gpu_speedup=gpu_orig / gpu_ours)
    record(benchmark, f"degrade B={batch} from {saliency} [{device_name(device)}]", **info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bandwidth bar is for CUDA")
@pytest.mark.parametrize("rows,block_w", [(None, None), (8, None), (32, None), (16, 64)],
                         ids=["launcher-tile", "rows8", "rows32", "bw64"])
def test_degrade_latents_bandwidth(benchmark, rows, block_w):
    """The launcher's tile, and a few others to tune it by (rows walked per program, strip width)."""
    from sat_kernels.ops import degrade

    device = torch.device("cuda")
    x0, eps, probs = _degrade_inputs(64, 128, device)
    mass = sat_kernels.attention_mass(probs, HEADS)
    alphas = torch.linspace(0.9999, 0.005, 1000, device=device)
    t = torch.randint(0, 1000, (64,), device=device)
    ours = lambda: degrade.degrade_latents(x0, eps, mass, None, MAP, alphas, t, rows=rows, block_w=block_w)  # noqa: E731
    torch.testing.assert_close(ours(), reference.degrade_latents(x0, eps, mass, MAP, alphas, t), rtol=1e-4, atol=1e-4)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    times = interleaved_medians({"copy": lambda: big.clone(), "ours": ours}, device)
    copy_bytes_per_s = 2 * big.numel() / times["copy"]  # 512 MiB moved: host overhead is noise here
    t_ours, t_kernel = times["ours"], gpu_kernel_seconds(ours)
    moved = 3 * x0.numel() * 4  # read x0 and eps, write out (fp32)
    run_ours(benchmark, ours, device)
    # the bar is the kernel's: at ~50 MB per call the wall clock also counts the host's launch work
    record(
        benchmark, f"degrade B=64 4x128x128 bandwidth, tile rows={rows} block_w={block_w} [{device_name(device)}]",
        kernel_us=t_kernel * 1e6, wall_us=t_ours * 1e6, gb_per_s=moved / t_kernel / 1e9,
        copy_gb_per_s=copy_bytes_per_s / 1e9, fraction_of_copy=moved / t_kernel / copy_bytes_per_s,
        fraction_of_copy_wall=moved / t_ours / copy_bytes_per_s,
    )


def _materialized_mass(q, k):
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return reference.attention_mass(probs, q.shape[1])


def _lse(q, k, v):
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out[1]


@pytest.mark.parametrize("lse_given", [True, False], ids=["lse", "no-lse"])
@pytest.mark.parametrize("tokens", [4096, 64], ids=["64x64-layer", "mid-layer"])
def test_attention_mass_from_qk_vs_materialized(benchmark, device, tokens, lse_given):
    gen = torch.Generator().manual_seed(0)
    b, h, d = 2, 8, 40
    q, k, v = (torch.randn(b, h, tokens, d, generator=gen).to(device) for _ in range(3))
    lse = _lse(q, k, v) if lse_given else None
    ours = lambda: sat_kernels.attention_mass_from_qk(q, k, lse)  # noqa: E731
    materialized = lambda: _materialized_mass(q, k)  # noqa: E731
    torch.testing.assert_close(ours(), materialized(), rtol=1e-4, atol=1e-3)
    paths = {"materialized": materialized, "ours": ours}
    colreduce_error = "not installed"
    if device.type == "cuda":
        try:  # the CUDA bar: at least as fast as flash-colreduce's column sum
            from flash_colreduce import flash_colreduce

            theirs = lambda: flash_colreduce(q, k, "sum").mean(dim=1)  # (B, H, N) -> head mean, as ours  # noqa: E731
            torch.testing.assert_close(theirs().float(), ours(), rtol=1e-3, atol=1e-3)  # the same quantity
            paths["flash_colreduce"] = theirs
        except ImportError:
            pass
        except Exception as err:  # noqa: BLE001 - a failing third-party kernel is a result, not a crash
            colreduce_error = f"failed: {type(err).__name__}: {str(err)[:120]}"
    mem_mat, mem_ours = peak_mib(materialized, device), peak_mib(ours, device)
    times = interleaved_medians(paths, device, min_run_time=2.0 if tokens > 1000 else 0.5)
    run_ours(benchmark, ours, device)
    info = dict(materialized_ms=times["materialized"] * 1e3, ours_ms=times["ours"] * 1e3,
                time_ratio=times["ours"] / times["materialized"], materialized_peak_mib=mem_mat,
                ours_peak_mib=mem_ours)
    if "flash_colreduce" in times:
        info["flash_colreduce_ms"] = times["flash_colreduce"] * 1e3
    elif device.type == "cuda":
        info["flash_colreduce_ms"] = colreduce_error
    record(benchmark, f"mass N={tokens} {'with' if lse_given else 'without'} lse [{device_name(device)}]", **info)
