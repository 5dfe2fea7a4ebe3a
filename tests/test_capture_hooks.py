"""The capture as forward pre-hooks (issue 14): on an attention module written here with kohya
sd-scripts' attribute names and its own SDPA forward (not diffusers' Attention), swapped into a tiny
diffusers UNet's mid block; on diffusers' Attention with each processor we support; one-shot under
gradient checkpointing and --guide_recompute; the module contract's errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig

from sat_kernels import reference
from sat_train.errors import UsageError
from sat_train.guide.settings import GuideSettings
from sat_train.guide.dropin import guided_prediction, install_sat_capture
from sat_train.guide.guidance import SATGuide, StepInputs, make_saliency
from train_helpers import ProbsStoringProcessor, two_level_unet

HEADS = 2
MID = "mid_block.attentions[0].transformer_blocks[0].attn1"  # kohya's names, bracket indices


class KohyaStyleAttention(torch.nn.Module):
    """kohya sd-scripts' CrossAttention shape: to_q/to_k/to_v without bias, to_out, heads, scale, a
    forward(hidden_states, context, mask) on its own SDPA; ``materialize`` keeps its softmax."""

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        dim_head = query_dim // heads
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = torch.nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim or query_dim, query_dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim or query_dim, query_dim, bias=False)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(query_dim, query_dim), torch.nn.Dropout(0.0)])
        self.materialize, self.probs = False, []

    def forward(self, hidden_states, context=None, mask=None, **kwargs):
        context = hidden_states if context is None else context
        batch = hidden_states.shape[0]
        q, k, v = (t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(hidden_states), self.to_k(context), self.to_v(context)))
        if self.materialize:
            probs = (self.scale * q @ k.transpose(-1, -2)).softmax(dim=-1)
            self.probs.append(probs.detach())
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out[0](out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]))


def tiny_unet(kohya_mid: bool):
    """A 2-level SD-shaped UNet; ``kohya_mid`` swaps a KohyaStyleAttention in as the mid-block attn1
    before peft adds LoRA (so its to_q/to_k/to_v/to_out.0 are LoRA-wrapped too, B random)."""
    unet = two_level_unet(HEADS)
    if kohya_mid:
        unet.mid_block.attentions[0].transformer_blocks[0].attn1 = KohyaStyleAttention(32, HEADS)
    unet.requires_grad_(False)  # the swapped-in module's weights too
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return unet


def mid_attn(unet):
    return unet.mid_block.attentions[0].transformer_blocks[0].attn1


def inputs(height=16, width=8):
    """A batch whose mid-block map is non-square (height/2 x width/2)."""
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, height, width, generator=g), torch.randn(2, 4, height, width, generator=g)
    t = torch.tensor([150, 650])
    s = StepInputs(x0=x0, noise=noise, noisy=scheduler.add_noise(x0, noise, t), timesteps=t,
                   cond=torch.randn(2, 10, 24, generator=g), target=noise)
    return s, scheduler


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def lora_grads(unet):
    out = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    return out


def written_out_sac_step(unet, s, scheduler, ratio):
    """DESIGN.md's step with the kohya-style module's materialized probabilities and sat_kernels.reference."""
    attn = mid_attn(unet)
    attn.materialize, attn.probs = True, []
    pred = unet(s.noisy, s.timesteps, s.cond).sample
    attn.materialize = False
    mass = reference.attention_mass(attn.probs[0], HEADS)  # (B, heads, N, N)
    h, w = s.x0.shape[-2] // 2, s.x0.shape[-1] // 2
    x_deg = reference.degrade_latents(s.x0, pred, mass, (h, w), scheduler.alphas_cumprod, s.timesteps, 1.0, 9, 1.0)
    loss = F.mse_loss(pred + ratio * (pred - unet(x_deg, s.timesteps, s.cond).sample), s.target)
    return loss, mass


def test_kohya_style_module_keeps_its_forward_and_its_mask_equals_its_materialized_attention():
    unet = tiny_unet(kohya_mid=True)
    s, scheduler = inputs()
    ref_loss, ref_mass = written_out_sac_step(unet, s, scheduler, ratio=0.3)
    ref_loss.backward()
    ref_grads = lora_grads(unet)
    assert (ref_mass > 1).any() and not (ref_mass > 1).all(), "a partial mask makes the comparison meaningful"
    with torch.no_grad():
        plain_out = unet(s.noisy, s.timesteps, s.cond).sample

    handle = install_sat_capture(unet, guide="sac", kernel_backend="torch", self_attention=MID)
    assert handle.attention_backend is None and handle.saliency.capture.hook.module is mid_attn(unet)
    calls = count_calls(mid_attn(unet))
    got, info = guided_prediction(unet, s.noisy, s.x0, s.timesteps, s.cond, scheduler, handle, ratio=0.3)
    assert calls[0] == 2  # its own forward ran in both forwards of the step
    F.mse_loss(got, s.target).backward()
    torch.testing.assert_close(F.mse_loss(got, s.target), ref_loss, rtol=0, atol=1e-5)
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    mask = ref_mass.view(2, 8, 4) > 1  # non-square mid-block map: 16x8 latents → 8x4 tokens
    up = F.interpolate(mask[:, None].float(), size=(16, 8), mode="nearest")[:, 0] > 0.5
    assert torch.equal(info["mask"], up)
    # the hook leaves the module's output alone, armed or not
    handle.saliency.capture.arm()
    with torch.no_grad():
        armed_out = unet(s.noisy, s.timesteps, s.cond).sample
    mass, size = handle.saliency.capture.take()
    assert torch.equal(armed_out, plain_out) and size == (8, 4)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0], ids=["eager", "sdpa"])
@pytest.mark.parametrize("guide", ["sac", "cac"])
def test_diffusers_attention_keeps_each_supported_processor(processor, guide):
    """Every layer keeps the processor object the trainer set; the captured values equal those
    layers' materialized probabilities (SAC: mass of mid attn1; CAC: token probs of level-0 attn2)."""
    unet = tiny_unet(kohya_mid=False)
    s, _ = inputs()
    tokens = torch.tensor([[2, 7], [4, -1]])
    unet.set_attn_processor(AttnProcessor())
    level0 = [unet.down_blocks[0].attentions[0], *unet.up_blocks[1].attentions]  # written out for this UNet
    layers = {"mid": mid_attn(unet), **{i: t.transformer_blocks[0].attn2 for i, t in enumerate(level0)}}
    stores = {key: ProbsStoringProcessor() for key in layers}
    for key, layer in layers.items():
        layer.set_processor(stores[key])
    with torch.no_grad():
        unet(s.noisy, s.timesteps, s.cond)
    if guide == "sac":
        expected = reference.attention_mass(stores["mid"].probs[0], HEADS)
    else:
        maps = []
        for key in range(len(level0)):
            probs = stores[key].probs[0].view(2, HEADS, 128, 10).mean(dim=1)
            maps.append(torch.stack([probs[b][:, tokens[b].clamp(min=0)] * (tokens[b] >= 0) for b in range(2)]))
        expected = torch.stack(maps).mean(dim=0).amax(dim=-1)

    unet.set_attn_processor(processor())
    before = dict(unet.attn_processors)
    handle = install_sat_capture(unet, guide=guide, kernel_backend="torch")
    assert all(unet.attn_processors[name] is p for name, p in before.items())
    source = handle.saliency.capture if guide == "sac" else handle.saliency.cross
    source.arm() if guide == "sac" else source.arm(tokens)
    with torch.no_grad():
        unet(s.noisy, s.timesteps, s.cond)
    got, size = source.take()
    assert size == ((8, 4) if guide == "sac" else (16, 8))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, True], ids=["checkpointing", "checkpointing+guide_recompute"])
def test_one_shot_under_gradient_checkpointing_and_recompute(recompute):
    """The kohya-style module under the UNet's gradient checkpointing (and --guide_recompute's rerun
    of the first forward): one capture a step; values and LoRA grads equal the written-out step."""
    unet = tiny_unet(kohya_mid=True)
    s, scheduler = inputs()
    ref_loss, _ = written_out_sac_step(unet, s, scheduler, ratio=0.5)
    ref_loss.backward()
    ref_grads = lora_grads(unet)

    unet.enable_gradient_checkpointing()
    unet.train()
    saliency = make_saliency(unet, "sac", "torch")
    guide = SATGuide(saliency, scheduler.alphas_cumprod, GuideSettings(ratio=0.5, kernel_backend="torch",
                                                                        recompute=recompute))
    captures, calls = [0], count_calls(mid_attn(unet))
    original = saliency.capture.hook.reduce
    saliency.capture.hook.reduce = lambda *a: (captures.__setitem__(0, captures[0] + 1), original(*a))[1]
    result = guide(unet, s)
    result.loss.backward()
    assert captures[0] == 1
    assert calls[0] == (5 if recompute else 4)  # reruns in backward: 2 + 2 checkpointed (+ 1 recompute)
    torch.testing.assert_close(result.loss, ref_loss, rtol=0, atol=1e-5)
    for name, grad in lora_grads(unet).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


class NoHeads(KohyaStyleAttention):
    def __init__(self, *args):
        super().__init__(*args)
        del self.heads


def test_module_contract_errors_name_the_problem():
    unet = tiny_unet(kohya_mid=False)
    unet.mid_block.attentions[0].transformer_blocks[0].attn1 = NoHeads(32, HEADS)
    with pytest.raises(UsageError, match=r"mid_block\.attentions\.0\.transformer_blocks\.0\.attn1 \(NoHeads\) "
                                         r"has no attribute 'heads'"):
        install_sat_capture(unet, guide="sac")
    with pytest.raises(UsageError, match="'mid_block.attentions\\[5\\].attn1' is not a submodule"):
        install_sat_capture(unet, guide="sac", self_attention="mid_block.attentions[5].attn1")
    with pytest.raises(UsageError, match="not a submodule"):
        install_sat_capture(unet, guide="sac", self_attention=KohyaStyleAttention(32, HEADS))
