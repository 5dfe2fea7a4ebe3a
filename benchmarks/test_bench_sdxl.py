"""SDXL: the attention statistics at SDXL's shapes against materialized softmax, and the SAT step
on the tiny SDXL-shaped model against a plain step (issue 15, "Tests and numbers").

At 1024 px SDXL's mid block (and its level-2 blocks) run 32x32 = 1024 tokens with 20 heads of 64
channels: the map a naive SAC capture stores is 2 x 20 x 1024 x 1024 fp32 (160 MiB) per batch of
two, per captured layer. CAC reads the 64x64 level (4096 queries, 10 heads) against the 77 text
tokens. The full-size SDXL UNet step runs on a lent GPU only: benchmarks/sdxl_gpu_step.py.
"""

import functools

import pytest
import torch
from conftest import device_name, gpu_kernel_seconds, interleaved_medians, record, run_ours
from guided_step import GuideSteps, bench_step_vs_plain, noised_inputs, sdxl_added_cond, with_lora
from memory import peak_mib
from test_bench_kernels import _materialized_mass

import sat_kernels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOL = {"fp32": (1e-3, 1e-4), "fp16": (2e-3, 2e-3)}  # (rtol, atol) of one probability; fp16: tests/test_gpu.py's
MID = dict(batch=2, heads=20, tokens=1024, head_dim=64)  # SDXL's mid block at 1024 px (32x32 latents)
CROSS = dict(batch=2, heads=10, queries=4096, keys=77, head_dim=64)  # its 64x64 level's attn2 at 1024 px
TINY_GUIDES = ["sac", "sac --guide_detach_degraded", "sac --guide_recompute", "cac", "cac --guide_recompute"]


def _randn(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _skip_half_on_cpu(device, dtype_name):
    if device.type == "cpu" and dtype_name != "fp32":
        pytest.skip("half q/k are what a CUDA autocast step hands the kernels; the CPU rows are fp32")


def _compare(benchmark, paths: dict, device, case: str, min_run_time: float) -> None:
    """Times (wall, and GPU kernel time on CUDA) and peak memory of ours against materialized."""
    ours, materialized = paths["ours"], paths["materialized"]
    mem_mat, mem_ours = peak_mib(materialized, device), peak_mib(ours, device)
    times = interleaved_medians(paths, device, min_run_time=min_run_time)
    run_ours(benchmark, ours, device)
    info = dict(materialized_ms=times["materialized"] * 1e3, ours_ms=times["ours"] * 1e3,
                time_ratio=times["ours"] / times["materialized"], materialized_peak_mib=mem_mat,
                ours_peak_mib=mem_ours, peak_ratio=mem_ours / mem_mat)
    if device.type == "cuda":  # a few-µs kernel's wall clock is the host's launch work
        gpu_mat, gpu_ours = gpu_kernel_seconds(materialized), gpu_kernel_seconds(ours)
        info.update(materialized_gpu_ms=gpu_mat * 1e3, ours_gpu_ms=gpu_ours * 1e3, gpu_time_ratio=gpu_ours / gpu_mat)
    record(benchmark, f"{case} [{device_name(device)}]", **info)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_sdxl_mid_block_mass_vs_materialized(benchmark, device, dtype_name):
    """SAC's statistic at SDXL's mid block: attention_mass_from_qk (lse computed, as the capture
    calls it) against softmax(q kᵀ scale) built whole, then its mass."""
    _skip_half_on_cpu(device, dtype_name)
    gen, dtype = torch.Generator().manual_seed(0), DTYPES[dtype_name]
    b, h, n, d = MID["batch"], MID["heads"], MID["tokens"], MID["head_dim"]
    q, k = (_randn(b, h, n, d, dtype=dtype, device=device, gen=gen) for _ in range(2))
    ours = lambda: sat_kernels.attention_mass_from_qk(q, k)  # noqa: E731
    materialized = lambda: _materialized_mass(q, k)  # noqa: E731
    rtol, atol = TOL[dtype_name]
    torch.testing.assert_close(ours(), materialized(), rtol=rtol, atol=atol * n**0.5)  # a sum of n: same quantity
    _compare(benchmark, {"materialized": materialized, "ours": ours}, device,
             f"sdxl mid mass B={b} H={h} N={n} D={d} {dtype_name}", min_run_time=1.0)


def _materialized_token_probs(q, k, tokens):
    """Head-mean softmax probabilities of the chosen key tokens, from the whole (B, H, Nq, Nk) map;
    padding (-1) gives 0."""
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
    picked = torch.gather(probs, 2, tokens.clamp(min=0)[:, None, :].expand(-1, probs.shape[1], -1))
    return picked * (tokens >= 0)[:, None, :]


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_sdxl_cross_token_probs_vs_materialized(benchmark, device, dtype_name):
    """CAC's statistic at SDXL's 64x64 cross-attention: token_attention_probs for S=4 chosen
    tokens (one of them padding) against the materialized map."""
    _skip_half_on_cpu(device, dtype_name)
    gen, dtype = torch.Generator().manual_seed(0), DTYPES[dtype_name]
    b, h, nq, nk, d = CROSS["batch"], CROSS["heads"], CROSS["queries"], CROSS["keys"], CROSS["head_dim"]
    q = _randn(b, h, nq, d, dtype=dtype, device=device, gen=gen)
    k = _randn(b, h, nk, d, dtype=dtype, device=device, gen=gen)
    tokens = torch.tensor([[1, 4, 9, -1], [2, 3, 30, 31]], device=device)
    ours = lambda: sat_kernels.token_attention_probs(q, k, tokens)  # noqa: E731
    materialized = lambda: _materialized_token_probs(q, k, tokens)  # noqa: E731
    torch.testing.assert_close(ours(), materialized(), rtol=TOL[dtype_name][0], atol=TOL[dtype_name][1])
    _compare(benchmark, {"materialized": materialized, "ours": ours}, device,
             f"sdxl cross token probs B={b} H={h} Nq={nq} Nk={nk} S=4 {dtype_name}", min_run_time=0.5)


@functools.lru_cache(maxsize=None)
def _tiny_sdxl_steps() -> GuideSteps:
    """The steps on the tiny SDXL-shaped UNet (demo.build_sdxl_components), B=2, at the demo's
    resolution (128 px: 16x16 latents, a 4x4 mid-block map), conditioned as SDXL is."""
    from sat_train.demo import build_sdxl_components

    device = torch.device("cpu")
    unet = build_sdxl_components().unet
    torch.manual_seed(0)  # the LoRA's initial weights
    side, batch = unet.config.sample_size, 2
    added = sdxl_added_cond(unet, batch, side * 8, device, torch.float32)
    s, alphas = noised_inputs(batch, side, unet.config.cross_attention_dim, device, torch.float32, added)
    return GuideSteps(with_lora(unet), s, alphas, device)


@pytest.mark.parametrize("device", [torch.device("cpu")], ids=["cpu"])  # CUDA: the full size (sdxl_gpu_step.py)
@pytest.mark.parametrize("guide_name", TINY_GUIDES)
def test_tiny_sdxl_step_vs_plain(benchmark, device, guide_name):
    bench_step_vs_plain(benchmark, _tiny_sdxl_steps(), guide_name,
                        f"tiny sdxl step {guide_name} B=2 128px [{device_name(device)}]")
