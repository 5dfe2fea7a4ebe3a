"""--torch_compile: the SAT step with a compiled UNet (the kohya-style attention module of
test_capture_hooks in the mid block, LoRA by peft) equals the eager step, with no graph break and
one graph per capture state (armed / not armed) at one shape; the flags' checks."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch._dynamo.utils import counters

from sat_train.config import GuideSettings, UsageError
from sat_train.guidance import SATGuide, make_saliency
from test_capture_hooks import inputs, lora_grads, tiny_unet
from train_helpers import tiny_config


# inductor (C++ codegen + gcc) takes ~9 minutes on a shared 2-core CPU: opt in with SAT_TEST_INDUCTOR=1
# (and a TORCHINDUCTOR_CACHE_DIR of your own: a shared cache left half-written by a killed run breaks it).
# Last run (2026-12-02): no graph break, 2 graphs, loss and mask equal to eager, but LoRA gradients off
# by up to 218x relative; a plain (unguided) step compiled the same way shows it too (benchmarks/RESULTS.md): open.
INDUCTOR = pytest.param("inductor", marks=pytest.mark.skipif(os.environ.get("SAT_TEST_INDUCTOR") != "1",
                                                             reason="slow on CPU: set SAT_TEST_INDUCTOR=1"))


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_sac_step_equals_eager_with_one_graph_per_capture_state(backend):
    unet = tiny_unet(kohya_mid=True)
    s, scheduler = inputs()
    guide = SATGuide(make_saliency(unet, "sac", "torch"), scheduler.alphas_cumprod,
                     GuideSettings(ratio=0.5, kernel_backend="torch"))

    def step():
        result = guide(unet, s)
        result.loss.backward()
        return result.loss.detach(), result.mask, lora_grads(unet)

    eager_loss, eager_mask, eager_grads = step()
    torch._dynamo.reset()
    counters.clear()
    unet.compile(backend=backend)
    start = time.perf_counter()
    for _ in range(2):  # the second step must reuse the first step's graphs
        loss, mask, grads = step()
    print(f"{backend}: two compiled steps (compiling included) {time.perf_counter() - start:.1f} s")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # the first forward (armed) and the degraded one
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, eager_mask) and mask.any() and not mask.all()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def test_compile_flags_are_checked(tmp_path):
    with pytest.raises(UsageError, match="--dynamo_backend aot_eager picks the backend of --torch_compile"):
        tiny_config(tmp_path, dynamo_backend="aot_eager").validate()
    with pytest.raises(UsageError, match="--dynamo_backend nope is not a torch.compile backend here; choose one of"):
        tiny_config(tmp_path, torch_compile=True, dynamo_backend="nope").validate()
    tiny_config(tmp_path, torch_compile=True, dynamo_backend="aot_eager").validate()
