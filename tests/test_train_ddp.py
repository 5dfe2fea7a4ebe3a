"""The guides under DistributedDataParallel (2 CPU processes, gloo): the two forwards of a SAT step,
and --guide_recompute's rerun of the first one inside backward, must leave every rank with the
mean of the per-rank gradients, exactly as a single process computes them (SD v1.5's tiny UNet and
SDXL's, whose forwards all take the pooled embeddings and time ids)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from sat_train.guide.capture import stock_processor
from sat_train.guide.settings import GuideSettings
from sat_train.demo import build_components, build_sdxl_components
from sat_train.guide.guidance import SATGuide, make_saliency
from train_helpers import lora_grads, lora_unet, step_inputs

WORLD = 2


def make_guide(components, guide: str, recompute: bool):
    unet = components.unet
    unet.set_attn_processor(stock_processor("sdpa"))
    return SATGuide(make_saliency(unet, guide, "torch"), components.noise_scheduler.alphas_cumprod,
                    GuideSettings(ratio=0.5, kernel_backend="torch", recompute=recompute))


def rank_inputs(components, rank: int):
    s = step_inputs(components, seed=1 + rank)
    s.tokens = torch.tensor([[3, 5], [-1, -1]])  # CAC: one sample with words, one falling back to SAC
    return s


def worker(rank: int, port: int, guide_name: str, recompute: bool, sdxl: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # same seed: the same weights on every rank, as DDP requires
        components = lora_unet(build=build_sdxl_components if sdxl else build_components)
        guide = make_guide(components, guide_name, recompute)
        unet = components.unet
        # expected: each rank's input on the bare model, gradients averaged
        per_rank = []
        for r in range(WORLD):
            guide(unet, rank_inputs(components, r)).loss.backward()
            per_rank.append(lora_grads(unet))
            unet.zero_grad(set_to_none=True)
        expected = {name: sum(g[name] for g in per_rank) / WORLD for name in per_rank[0]}

        ddp = DistributedDataParallel(unet)
        guide(ddp, rank_inputs(components, rank)).loss.backward()
        got = lora_grads(unet)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("guide_name, recompute, sdxl", [("sac", False, False), ("cac", True, False),
                                                         ("cac", False, True)])
def test_ddp_gradients_are_the_mean_of_the_ranks(guide_name, recompute, sdxl, monkeypatch):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the spawned ranks only: later tests' subprocesses keep theirs
    mp.spawn(worker, args=(free_port(), guide_name, recompute, sdxl), nprocs=WORLD, join=True)
