"""Shared pieces of the sat_train tests: tiny models, batches, an eager reference processor."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor

from sat_train.config.settings import TrainConfig
from sat_train.demo import DEMO_DATA_DIR, build_components
from sat_train.guide.guidance import StepInputs
from sat_train.models.lora import add_lora

REPO = Path(__file__).resolve().parents[1]
LORA_FILE = "pytorch_lora_weights.safetensors"


def tiny_config(output_dir, **overrides) -> TrainConfig:
    """A fast run on the demo model and photos: 64 px images → 8x8 latents → 2x2 mid-block tokens."""
    settings = dict(output_dir=str(output_dir), resolution=64, train_batch_size=2, max_train_steps=2,
                    learning_rate=1e-3, lr_warmup_steps=0, seed=0, report_to="none", checkpointing_steps=1000,
                    random_flip=True)
    settings.update(overrides)
    return TrainConfig(**settings)


def lora_unet(seed: int = 0, randomize_b: bool = True, build=build_components):
    """The demo UNet (``build``: demo.build_components, or build_sdxl_components) with LoRA; B matrices
    random (so LoRA changes outputs) unless told otherwise."""
    components = build()
    torch.manual_seed(seed)
    add_lora(components.unet, rank=4)
    if randomize_b:
        with torch.no_grad():
            for name, param in components.unet.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
    return components


def step_inputs(components, batch: int = 2, size: int = 16, seed: int = 1) -> StepInputs:
    """A noised batch of random latents with fixed timesteps (spanning low and high noise); for SDXL
    components also random pooled embeddings and the time ids of a 96x128 px image cropped at (8, 0)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, size, size, generator=gen)
    noise = torch.randn(batch, 4, size, size, generator=gen)
    timesteps = torch.tensor([100, 700, 400, 900][:batch])
    cond = torch.randn(batch, 77, components.unet.config.cross_attention_dim, generator=gen)
    noisy = components.noise_scheduler.add_noise(x0, noise, timesteps)
    added = None
    if components.family.name == "sdxl":
        pooled = torch.randn(batch, components.text_encoder_2.config.projection_dim, generator=gen)
        time_ids = torch.tensor([[96.0, 128.0, 8.0, 0.0, 8.0 * size, 8.0 * size]]).expand(batch, 6)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return StepInputs(x0=x0, noise=noise, noisy=noisy, timesteps=timesteps, cond=cond, target=noise,
                      added_cond_kwargs=added)


class ProbsStoringProcessor(AttnProcessor):
    """diffusers' eager processor that also keeps the softmax probabilities it materializes."""

    def __init__(self):
        super().__init__()
        self.probs = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        original = attn.get_attention_scores

        def keep(query, key, mask=None):
            probs = original(query, key, mask)
            self.probs.append(probs.detach())
            return probs

        attn.get_attention_scores = keep
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores


def count_forwards(unet) -> list[int]:
    """A one-element list counting top-level UNet forward calls."""
    calls = [0]
    unet.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def lora_grads(unet) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    return subprocess.run([sys.executable, "-m", "sat_train", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


__all__ = ["DEMO_DATA_DIR", "LORA_FILE", "REPO", "ProbsStoringProcessor", "count_forwards", "lora_grads",
           "lora_unet", "run_cli", "step_inputs", "tiny_config"]


def two_level_unet(heads: int = 2):
    """A frozen 2-level SD-shaped UNet (cross-attention at level 0 and in the mid block), seeded 0,
    small enough for the drop-in and capture tests."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=24, attention_head_dim=heads)
    return unet.requires_grad_(False)


def block_imports(monkeypatch, *names):
    """Imports of the top-level packages ``names`` fail, as where they are not installed."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def padded_square(image, size: int):
    """``image`` (PIL) resized to ``size`` on its long side and centred on gray: a size x size RGB photo, as
    the face-metric measurements padded theirs."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    out = Image.new("RGB", (size, size), (127, 127, 127))
    out.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return out


def assert_same_tensors(got: dict, expected: dict) -> None:
    """Two state dicts (e.g. LoRA files) hold the same non-empty set of tensors, bit for bit."""
    assert got.keys() == expected.keys() and len(expected) > 0, sorted(set(got) ^ set(expected))[:5]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
