"""--torch_compile: the SAT step with a compiled UNet (the kohya-style attention module of
test_capture_hooks in the mid block, LoRA by peft) equals the eager step, with no graph break and
one graph per capture state (armed / not armed) at one shape; the drop-in (install_sat_capture +
guided_prediction) on a UNet whose every attention is kohya-style, compiled with fullgraph=True on
both kernel backends (the Triton ops as graph nodes); the flags' checks."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters

from sat_train.errors import UsageError
from sat_train.guide.settings import GuideSettings
from sat_train.guide.dropin import guided_prediction, install_sat_capture
from sat_train.guide.guidance import SATGuide, make_saliency
from sat_train.models.lora import add_lora
from sat_train.run.prepare import compile_unet
from test_capture_hooks import HEADS, KohyaStyleAttention, inputs, lora_grads, tiny_unet
from train_helpers import tiny_config, two_level_unet


# inductor (C++ codegen + gcc) takes minutes on a shared 2-core CPU: opt in with SAT_TEST_INDUCTOR=1
# (and a TORCHINDUCTOR_CACHE_DIR of your own: a shared cache left half-written by a killed run breaks it).
# inductor's CPU layout optimization zeroes the input gradient of a frozen ResnetBlock2D + Upsample2D
# (benchmarks/inductor_gap_repro.py), so every LoRA gradient upstream of the first up block was wrong;
# the trainer (train.compile_unet) turns it off on CPU, which gives eager's gradients.
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
    start = time.perf_counter()
    with torch._inductor.config.patch(layout_optimization=True):  # the default: compile_unet's option must win
        compile_unet(unet, backend, torch.device("cpu"))  # the trainer's --torch_compile (see INDUCTOR)
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


class KohyaStyleCrossAttention(KohyaStyleAttention):
    """The kohya-style module called as diffusers' transformer block calls attn1/attn2 (the
    context by keyword ``encoder_hidden_states``)."""

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return super().forward(hidden_states, encoder_hidden_states, attention_mask)


def kohya_attention_unet():
    """two_level_unet with every attn1 / attn2 a KohyaStyleCrossAttention (no diffusers Attention
    left), LoRA by peft on to_q/to_k/to_v/to_out.0 with B random."""
    unet = two_level_unet(HEADS)
    blocks = [m for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "attn2")]
    for block in blocks:
        block.attn1 = KohyaStyleCrossAttention(block.attn1.query_dim, HEADS)
        block.attn2 = KohyaStyleCrossAttention(block.attn2.query_dim, HEADS, block.attn2.cross_attention_dim)
    assert len(blocks) == 4 and not any(type(m).__name__ == "Attention" for m in unet.modules())
    unet.requires_grad_(False)
    add_lora(unet, rank=2)
    with torch.no_grad():  # B random: LoRA changes the outputs
        for p in (p for name, p in unet.named_parameters() if "lora_B" in name):
            p.normal_(0, 0.3)
    return unet


def unet_graph_counter():
    """(backend, graphs): aot_eager, keeping each dynamo graph that holds a convolution (the UNet
    forward's; the capture's pre-hook on the UNet itself compiles as a frame of its own)."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    graphs = []

    def backend(gm, example_inputs):
        if any("conv2d" in str(node.target) for node in gm.graph.nodes):
            graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend, graphs


@pytest.mark.parametrize("guide, kernel_backend", [("sac", "triton"), ("cac", "torch")])
def test_dropin_on_kohya_attention_compiles_fullgraph_with_one_graph_per_armed_and_shape(guide, kernel_backend):
    unet = kohya_attention_unet()
    handle = install_sat_capture(unet, guide, kernel_backend=kernel_backend)
    tokens = torch.tensor([[1, 3], [-1, -1]])  # sample 1 has no chosen word: CAC falls back to SAC

    def step(height, width):
        s, scheduler = inputs(height, width)
        pred, info = guided_prediction(unet, s.noisy, s.x0, s.timesteps, s.cond, scheduler, handle, ratio=0.5,
                                       tokens=tokens if guide == "cac" else None)
        loss = torch.nn.functional.mse_loss(pred, s.target)
        loss.backward()
        return loss.detach(), info["mask"], lora_grads(unet)

    shapes = [(16, 8), (8, 16)]
    eager = [step(*shape) for shape in shapes]
    torch._dynamo.reset()
    counters.clear()
    backend, graphs = unet_graph_counter()
    unet.compile(backend=backend, fullgraph=True)  # a graph break inside the UNet raises
    counts = []
    for shape, (eager_loss, eager_mask, eager_grads) in zip(shapes, eager, strict=True):
        for _ in range(2):  # the second step at a shape reuses its graphs
            loss, mask, grads = step(*shape)
            counts.append(len(graphs))
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
        assert torch.equal(mask, eager_mask) and mask.any() and not mask.all()
        assert grads.keys() == eager_grads.keys() and len(grads) == 4 * 2 * 4 * 2  # blocks, attn1/2, projections, A/B
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-7,
                                       msg=lambda detail, name=name: f"{name}: {detail}")
    # per shape one graph for the armed first forward and one for the degraded forward (whose
    # input requires grad); the second step at a shape compiles nothing
    assert counts == [2, 2, 4, 4], counts
    if kernel_backend == "triton":  # the capture's Triton op is a node of the armed forward's graph
        assert any(str(n.target) == "sat_kernels.attention_mass_from_qk.default" for n in graphs[0].graph.nodes)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.parametrize("layout_optimization", [True, False])
def test_compile_unet_leaves_inductors_global_config(layout_optimization):
    # the CPU workaround is the compile's own option: other compiles in the process keep theirs
    with torch._inductor.config.patch(layout_optimization=layout_optimization):
        compile_unet(torch.nn.Linear(2, 2), "inductor", torch.device("cpu"))  # compiles lazily: nothing runs
        assert torch._inductor.config.layout_optimization is layout_optimization


def test_compile_flags_are_checked(tmp_path):
    with pytest.raises(UsageError, match="--dynamo_backend aot_eager picks the backend of --torch_compile"):
        tiny_config(tmp_path, dynamo_backend="aot_eager").validate()
    with pytest.raises(UsageError, match="--dynamo_backend nope is not a torch.compile backend here; choose one of"):
        tiny_config(tmp_path, torch_compile=True, dynamo_backend="nope").validate()
    tiny_config(tmp_path, torch_compile=True, dynamo_backend="aot_eager").validate()
