"""Exports at every checkpoint, the kohya file's metadata (kohya-ss/sd-scripts' keys and hashes),
--save_precision (and its fp16 overflow error), atomic exports, and --config_file (JSON, TOML,
overrides, bad files, a bit-for-bit rerun from a run's train_config.json)."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import shutil
import signal

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save

from sat_train import faults
from sat_train.outputs import kohya_metadata
from sat_train.cli import main, parse_config
from sat_train.errors import UsageError
from sat_train.demo import build_components
from sat_train.outputs.lora_files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, export_lora
from sat_train import train
from train_helpers import lora_unet, run_cli, step_inputs, tiny_config


def kohya_name(diffusers_key: str) -> str:
    """unet.X.lora.down.weight -> lora_unet_X_with_underscores.lora_down.weight (kohya's naming)."""
    module, _, kind = diffusers_key.removeprefix("unet.").rpartition(".lora.")
    return f"lora_unet_{module.replace('.', '_')}.lora_{kind}"


def unet_outputs_with(folder, weight_name, inputs):
    """A fresh demo pipeline with ``folder/weight_name`` loaded by diffusers' load_lora_weights: its
    UNet's output on ``inputs``, and the output without the LoRA."""
    fresh = build_components()
    pipe = StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                   unet=fresh.unet, scheduler=fresh.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        base = fresh.unet(inputs.noisy, inputs.timesteps, inputs.cond).sample
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
        return fresh.unet(inputs.noisy, inputs.timesteps, inputs.cond).sample, base


def kohya_formula_hashes(path) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes, restated: the tensors saved with only the ss_*
    metadata; sha256 of the bytes after the header, and sha256[:8] of bytes 0x100000..0x110000."""
    with safe_open(path, "pt") as f:
        ss_only = {k: v for k, v in f.metadata().items() if k.startswith("ss_")}
    data = save(load_file(path), ss_only)
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


# ----------------------------------------------------------------------------- checkpoints and metadata


def test_every_checkpoint_holds_a_kohya_file_of_that_step(tmp_path):
    train(tiny_config(tmp_path, max_train_steps=2, checkpointing_steps=1, export_format="both", rank=4,
                      lora_alpha=8.0, training_comment="face LoRA, try 1"))
    inputs = step_inputs(build_components(), size=8)
    per_step = []
    for step in (1, 2):
        checkpoint = tmp_path / f"checkpoint-{step}"
        kohya, base = unet_outputs_with(checkpoint, KOHYA_WEIGHTS_NAME, inputs)
        diffusers, _ = unet_outputs_with(checkpoint, LORA_WEIGHTS_NAME, inputs)  # what resume reads
        assert (kohya - base).abs().max() > 1e-4, "the loaded LoRA must change the UNet"
        torch.testing.assert_close(kohya, diffusers, rtol=1e-5, atol=1e-6)
        per_step.append(kohya)
        with safe_open(checkpoint / KOHYA_WEIGHTS_NAME, "pt") as f:
            metadata = f.metadata()
        assert metadata["ss_steps"] == str(step)
        check_kohya_metadata(metadata, tmp_path.name)
        assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == kohya_formula_hashes(
            checkpoint / KOHYA_WEIGHTS_NAME)
    assert (per_step[0] - per_step[1]).abs().max() > 1e-5, "each checkpoint holds its own step's LoRA"
    final_kohya, _ = unet_outputs_with(tmp_path, KOHYA_WEIGHTS_NAME, inputs)
    torch.testing.assert_close(final_kohya, per_step[1], rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.rglob(".*tmp*")), "atomic writes leave no temporaries"


def check_kohya_metadata(metadata: dict, run_name: str) -> None:
    """sd-scripts' value formats: every value a string, str() of the setting."""
    assert all(isinstance(v, str) for v in metadata.values())
    expected = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0",
                "ss_base_model_version": "sd_v1", "ss_resolution": "(64, 64)", "ss_output_name": run_name,
                "ss_training_comment": "face LoRA, try 1", "ss_v2": "False", "ss_seed": "0",
                "ss_max_train_steps": "2", "ss_epoch": "1",
                "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
                "modelspec.implementation": "diffusers", "modelspec.title": run_name,
                "modelspec.resolution": "64x64", "modelspec.prediction_type": "epsilon",
                "sat_guide": "sac", "sat_guide_ratio": "0.01", "sat_guide_threshold": "1.0", "format": "pt"}
    assert {k: metadata.get(k) for k in expected} == expected
    date = datetime.datetime.fromisoformat(metadata["modelspec.date"])
    assert date.microsecond == 0 and abs(datetime.datetime.now() - date) < datetime.timedelta(minutes=30)
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8


def test_hashes_follow_kohyas_formula_past_the_legacy_window():
    # over 1 MiB, so the legacy hash reads real bytes (the tiny runs' files are smaller)
    state = {"a.weight": torch.randn(300, 1000), "b.alpha": torch.tensor(4.0)}
    metadata = {"ss_network_dim": "4", "modelspec.title": "x"}
    data = save(state, {"ss_network_dim": "4"})
    n = int.from_bytes(data[:8], "little")
    assert len(data) > 0x110000
    expected = hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert kohya_metadata.safetensors_hashes(state, metadata) == expected


# ----------------------------------------------------------------------------- --save_precision


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision_casts_both_exported_files(tmp_path, precision, dtype):
    unet = lora_unet().unet
    export_lora(unet, tmp_path, "both", precision)
    modules = {name: m for name, m in unet.named_modules() if hasattr(m, "lora_A")}
    diffusers, kohya = load_file(tmp_path / LORA_WEIGHTS_NAME), load_file(tmp_path / KOHYA_WEIGHTS_NAME)
    assert {t.dtype for t in diffusers.values()} == {dtype} == {t.dtype for t in kohya.values()}
    for name, module in modules.items():
        down = module.lora_A["default"].weight.detach().to(dtype)
        up = module.lora_B["default"].weight.detach().to(dtype)
        assert torch.equal(diffusers[f"unet.{name}.lora.down.weight"], down)
        assert torch.equal(diffusers[f"unet.{name}.lora.up.weight"], up)
        assert torch.equal(kohya[kohya_name(f"unet.{name}.lora.down.weight")], down)
        assert torch.equal(kohya[kohya_name(f"unet.{name}.lora.up.weight")], up)


def test_fp16_checkpoints_keep_a_float_file_and_resume_stays_exact(tmp_path):
    run = tmp_path / "run"
    settings = dict(max_train_steps=2, checkpointing_steps=1, export_format="kohya", save_precision="fp16")
    train(tiny_config(run, **settings))
    float_state = load_file(run / "checkpoint-2" / LORA_WEIGHTS_NAME)
    assert {t.dtype for t in float_state.values()} == {torch.float32}
    for folder in (run / "checkpoint-2", run):
        kohya = load_file(folder / KOHYA_WEIGHTS_NAME)
        assert {t.dtype for t in kohya.values()} == {torch.float16}
        for key, value in float_state.items():
            assert torch.equal(kohya[kohya_name(key)], value.to(torch.float16))
    # resumed from step 1's checkpoint (its float file), the run ends exactly where the uninterrupted one did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoint-1", resumed / "checkpoint-1")
    train(tiny_config(resumed, resume_from_checkpoint="latest", **settings))
    again = load_file(resumed / "checkpoint-2" / LORA_WEIGHTS_NAME)
    assert all(torch.equal(again[k], float_state[k]) for k in float_state)


def test_fp16_overflow_is_a_one_line_error_and_the_float_checkpoint_stays(tmp_path, capsys):
    # lr 1e5: one AdamW step moves every LoRA weight by ~1e5, beyond fp16's 65504
    flags = ["--output_dir", str(tmp_path), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1",
             "--learning_rate", "1e5", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none",
             "--checkpointing_steps", "1000", "--validation_prompt", "", "--export_format", "both",
             "--save_precision", "fp16"]
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]  # the rest is the progress bar
    assert len(lines) == 1 and lines[0].startswith("sat-train: error: --save_precision fp16") and "bf16" in lines[0]
    assert re.search(r": lora_unet_\w+\.lora_(up|down)\.weight has values up to .*65504", lines[0])  # tensor, limit
    assert not list(tmp_path.glob("*.safetensors")), "no exported file"
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob(".lora-*"))
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "COMPLETE").is_file() and str(checkpoint) in lines[0]
    assert not (checkpoint / KOHYA_WEIGHTS_NAME).exists(), "the checkpoint's kohya copy is left out, not overflowed"
    saved = load_file(checkpoint / LORA_WEIGHTS_NAME)
    assert max(t.abs().max().item() for t in saved.values()) > 65504 and all(
        t.dtype == torch.float32 for t in saved.values())
    # the way out the message gives: the same run, bf16, resumed from that checkpoint
    main([*flags[:-1], "bf16", "--resume_from_checkpoint", str(checkpoint)])
    exported = load_file(tmp_path / KOHYA_WEIGHTS_NAME)
    for key, value in saved.items():
        assert torch.equal(exported[kohya_name(key)], value.to(torch.bfloat16))


# ----------------------------------------------------------------------------- atomic exports


def test_a_failed_kohya_export_leaves_nothing(tmp_path, monkeypatch):
    def fail(name):
        raise OSError("disk full")

    monkeypatch.setattr(faults, "crash_hook", fail)  # between the write and the rename
    with pytest.raises(OSError, match="disk full"):
        export_lora(lora_unet().unet, tmp_path, "kohya")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_kohya_export_leaves_no_file_and_the_next_run_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("SAT_TEST_KILL_AT", "kohya:mid")
    proc = run_cli("--output_dir", str(tmp_path), "--resolution", "64", "--train_batch_size", "2",
                   "--max_train_steps", "1", "--seed", "0", "--report_to", "none", "--validation_prompt", "",
                   "--export_format", "kohya")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / KOHYA_WEIGHTS_NAME).exists()
    assert (tmp_path / f".{KOHYA_WEIGHTS_NAME}.tmp").is_file()  # killed between write and rename
    monkeypatch.delenv("SAT_TEST_KILL_AT")
    train(tiny_config(tmp_path, max_train_steps=1, export_format="kohya"))
    assert (tmp_path / KOHYA_WEIGHTS_NAME).is_file() and not list(tmp_path.glob(".*tmp*"))


# ----------------------------------------------------------------------------- --config_file


def test_config_file_toml_tables_and_json_types_under_the_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('rank = 8\nguide_threshold = "mean"\n[training]\nlearning_rate = 0.002\nrandom_flip = false\n'
                    'optimizer_args = ["weight_decay=0.02", "betas=(0.9,0.99)"]\n', encoding="utf-8")
    config = parse_config(["--config_file", str(tmp_path / "run"), "--rank", "2"])  # NAME means NAME.toml (kohya)
    assert (config.rank, config.learning_rate, config.guide_threshold) == (2, 0.002, "mean")  # the flag wins
    assert config.random_flip is False  # over the demo's default (on)
    assert tuple(config.optimizer_args) == ("weight_decay=0.02", "betas=(0.9,0.99)")
    assert config.resolution == 128  # left out of the file: the demo's default still applies
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"guide_threshold": 0.5, "lora_alpha": None, "max_train_steps": 3, "guide": "cac",
                              "resolved": {"demo": True}}), encoding="utf-8")
    config = parse_config(["--config_file", str(js)])
    assert (config.guide_threshold, config.lora_alpha, config.max_train_steps, config.guide) == (0.5, None, 3, "cac")


@pytest.mark.parametrize("content, needle", [
    ('{"rnak": 3}', "unknown key 'rnak' (did you mean 'rank'?)"),
    ('{"rank": "four"}', "invalid int value: 'four'"),
    ('{"guide": "sag"}', "invalid choice: 'sag'"),
    ('{"random_flip": "yes"}', "random_flip is on/off"),
    ('{"rank": [1, 2]}', "unrecognized arguments"),
    ('{"rank": 3', "not valid JSON"),
    ('[1, 2]', "not a table of settings"),
    (None, "cannot read it"),
])
def test_bad_config_files_are_one_line_usage_errors(tmp_path, capsys, content, needle):
    path = tmp_path / "settings.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match="config_file"):
        parse_config(["--config_file", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main(["--config_file", str(path), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and str(path) in err[0] and needle in err[0], err
    assert not (tmp_path / "out").exists(), "refused before anything is written"


def test_rerun_from_train_config_json_reproduces_the_lora_bit_for_bit(tmp_path):
    first = tmp_path / "first"
    train(tiny_config(first, max_train_steps=2, guide_threshold="mean", optimizer_args=("weight_decay=0.05",),
                      lora_alpha=2.0, export_format="both"))
    saved = first / "train_config.json"
    config = parse_config(["--config_file", str(saved), "--output_dir", str(tmp_path / "again")])
    original = tiny_config(first, max_train_steps=2, guide_threshold="mean", optimizer_args=("weight_decay=0.05",),
                           lora_alpha=2.0, export_format="both")
    assert json.loads(config.to_json()) == {**json.loads(original.to_json()), "output_dir": str(tmp_path / "again"),
                                            "config_file": str(saved)}
    train(config)
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        a, b = load_file(first / name), load_file(tmp_path / "again" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
