"""README.md's "SAT in kohya sd-scripts" edits, applied verbatim the way a user applies them.

The marked ```python blocks are taken out of README.md and pasted into a stand-in of
kohya-ss/sd-scripts' ``train_network.py`` (written here, shaped like theirs at 48d368f: a trainer
class whose ``train()`` builds the models, applies the LoRA network and lets ``accelerator.prepare``
wrap the UNet, and whose ``get_noise_pred_and_target(...)`` noises the latents and calls the UNet
through ``call_unet`` inside ``torch.set_grad_enabled(is_train), accelerator.autocast()``). The
edited source is exec'd and runs one step: no NameError, the guided prediction equals
``guided_prediction`` called directly on the same inputs (and so do the LoRA gradients), and the
UNet ran two gradient-carrying forwards."""

from __future__ import annotations

import contextlib
import re
import sys
import types

import pytest
import torch

from sat_train import guided_prediction, install_sat_capture
from sat_train.demo import build_components
from sat_train.models.lora import add_lora
from train_helpers import REPO

SECTION = "### SAT in kohya sd-scripts"
EDITS = ("import", "train", "unet-call")
APPLY_TO_LINE = "network.apply_to(text_encoder, unet, train_text_encoder, train_unet)"
UNET_CALL_START = "noise_pred = self.call_unet("
RATIO = 0.01  # the README's
SEED = 7

# A stand-in for their train_network.py, with its structure (names of the methods, their arguments
# and local variables as theirs are named); the README's edits go in as a user makes them: the
# import beside the other imports, the install line right after the `network.apply_to(...)` line,
# and the UNet-call block in place of the `noise_pred = self.call_unet(` statement.
STAND_IN = '''\
import torch

import standin_library as train_util
from standin_library import Accelerator, load_target_model, create_network, one_batch
# <sat-kohya-edit: import>


class NetworkTrainer:
    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, **kwargs):
        noise_pred = unet(noisy_latents, timesteps, text_conds[0]).sample
        return noise_pred

    def get_noise_pred_and_target(
        self,
        args,
        accelerator,
        noise_scheduler,
        latents,
        batch,
        text_encoder_conds,
        unet,
        network,
        weight_dtype,
        train_unet,
        is_train=True,
    ):
        noise, noisy_latents, timesteps = train_util.get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)

        # the UNet forward
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            noise_pred = self.call_unet(
                args,
                accelerator,
                unet,
                noisy_latents.requires_grad_(train_unet),
                timesteps,
                text_encoder_conds,
                batch,
                weight_dtype,
            )

        if args.v_parameterization:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return noise_pred, target, timesteps, None

    def train(self, args):
        accelerator = Accelerator()
        weight_dtype = torch.float32
        text_encoder, unet, noise_scheduler = load_target_model(args)
        network = create_network(args)

        train_unet = True
        train_text_encoder = False
        network.apply_to(text_encoder, unet, train_text_encoder, train_unet)

        unet = accelerator.prepare(unet)

        latents, text_encoder_conds, batch = one_batch(args)
        noise_pred, target, timesteps, weighting = self.get_noise_pred_and_target(
            args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet, network, weight_dtype,
            train_unet, is_train=True,
        )
        loss = torch.nn.functional.mse_loss(noise_pred.float(), target.float())
        accelerator.backward(loss)
        self.last_step = {"noise_pred": noise_pred.detach(), "unet": unet}
'''


# --- the stand-in's library: models, LoRA network, accelerator, data (sat_train's tiny demo model) ---

def _randomize_lora_b(unet) -> None:
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=g)


class _Network:
    """Stands in for their networks.lora network: ``apply_to`` puts a LoRA on the UNet (random B,
    so the LoRA changes outputs)."""

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        assert apply_unet and not apply_text_encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)  # the LoRA's A matrices
            add_lora(unet, rank=4)
        _randomize_lora_b(unet)


class _Accelerator:
    """Stands in for accelerate.Accelerator on one CPU process: ``prepare`` wraps nothing."""

    def prepare(self, *models):
        return models[0] if len(models) == 1 else models

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def _standin_library(forwards: list) -> types.ModuleType:
    lib = types.ModuleType("standin_library")

    def load_target_model(args):
        components = build_components()
        # every top-level UNet forward: did its output carry gradients?
        components.unet.register_forward_hook(
            lambda module, inputs, output: forwards.append(
                (output[0] if isinstance(output, tuple) else output.sample).requires_grad))
        return components.text_encoder, components.unet, components.noise_scheduler

    def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
        g = torch.Generator().manual_seed(args.seed + 1)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.tensor([150, 650])
        return noise, noise_scheduler.add_noise(latents, noise, timesteps), timesteps

    def one_batch(args):
        g = torch.Generator().manual_seed(args.seed)
        latents = torch.randn(2, 4, 16, 16, generator=g)
        text_encoder_conds = [torch.randn(2, 77, 32, generator=g)]
        return latents, text_encoder_conds, {"loss_weights": torch.ones(2)}

    lib.load_target_model = load_target_model
    lib.create_network = lambda args: _Network()
    lib.Accelerator = _Accelerator
    lib.get_noise_noisy_latents_and_timesteps = get_noise_noisy_latents_and_timesteps
    lib.one_batch = one_batch
    return lib


# --- the README's blocks, and pasting them in ---

def kohya_section(readme: str) -> str:
    start = readme.index(SECTION)
    rest = readme[start + len(SECTION):]
    end = re.search(r"^#{1,3} ", rest, flags=re.MULTILINE)
    return rest[:end.start()] if end else rest


def readme_blocks(readme: str) -> dict[str, str]:
    """The section's ```python blocks, each right after its `<!-- sat-kohya-edit: NAME -->` marker;
    every python block of the section is marked, each edit exactly once."""
    section = kohya_section(readme)
    marked = re.findall(r"<!-- sat-kohya-edit: ([\w-]+) -->\n```python\n(.*?)\n```", section, flags=re.DOTALL)
    names = [name for name, _ in marked]
    assert sorted(names) == sorted(EDITS), (
        f"README's kohya section should mark one python block per edit {EDITS}, found {names}")
    assert section.count("```python") == len(marked), "an unmarked python block in README's kohya section"
    return dict(marked)


def apply_edits(source: str, blocks: dict[str, str]) -> str:
    lines = source.split("\n")
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped == "# <sat-kohya-edit: import>":
            out.extend(blocks["import"].split("\n"))
        elif stripped == APPLY_TO_LINE:
            out.append(line)
            out.extend(blocks["train"].split("\n"))
        elif stripped == UNET_CALL_START:
            indent = line[:len(line) - len(line.lstrip())]
            while lines[i] != indent + ")":  # the statement ends at its closing parenthesis
                i += 1
            out.extend(blocks["unet-call"].split("\n"))
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


def run_stand_in(blocks: dict[str, str], v_parameterization: bool):
    forwards: list[bool] = []
    source = apply_edits(STAND_IN, blocks)
    namespace = {"__name__": "train_network"}
    sys.modules["standin_library"] = _standin_library(forwards)
    try:
        exec(compile(source, "train_network_standin.py", "exec"), namespace)
        trainer = namespace["NetworkTrainer"]()
        args = types.SimpleNamespace(seed=SEED, v_parameterization=v_parameterization)
        trainer.train(args)
    finally:
        del sys.modules["standin_library"]
    return trainer, args, forwards, namespace


def lora_grads(unet) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in unet.named_parameters() if "lora" in n and p.grad is not None}


def test_readme_names_the_lines_its_edits_go_by():
    section = kohya_section((REPO / "README.md").read_text())
    assert APPLY_TO_LINE in section and UNET_CALL_START in section
    assert "48d368f" in section


@pytest.mark.parametrize("v_parameterization", [False, True])
def test_readme_kohya_edits_run_a_guided_step(v_parameterization):
    blocks = readme_blocks((REPO / "README.md").read_text())
    trainer, args, forwards, namespace = run_stand_in(blocks, v_parameterization)

    assert forwards == [True, True], f"UNet forwards (carrying gradients?): {forwards}"
    unet = trainer.last_step["unet"]
    assert hasattr(trainer, "sat_handle")

    # the reference: the same UNet built again, guided_prediction called directly on the same inputs
    lib = _standin_library([])
    _, ref_unet, scheduler = lib.load_target_model(args)
    _Network().apply_to(None, ref_unet, False, True)
    handle = install_sat_capture(ref_unet, guide="sac")
    latents, conds, _ = lib.one_batch(args)
    noise, noisy, timesteps = lib.get_noise_noisy_latents_and_timesteps(args, scheduler, latents)
    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    guided, _ = guided_prediction(ref_unet, noisy, latents, timesteps, conds[0], scheduler, handle, ratio=RATIO,
                                  prediction_type=prediction_type)
    target = scheduler.get_velocity(latents, noise, timesteps) if v_parameterization else noise
    torch.nn.functional.mse_loss(guided.float(), target.float()).backward()

    torch.testing.assert_close(trainer.last_step["noise_pred"], guided.detach(), rtol=0, atol=0)
    got, want = lora_grads(unet), lora_grads(ref_unet)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_stand_in_fails_like_the_old_readme():
    """The stand-in reproduces the user's failure: a handle kept in a local of ``train()`` is not
    defined where the UNet is called."""
    blocks = readme_blocks((REPO / "README.md").read_text())
    old = {name: block.replace("self.sat_handle", "handle") for name, block in blocks.items()}
    with pytest.raises(NameError, match="'handle' is not defined"):
        run_stand_in(old, v_parameterization=False)
