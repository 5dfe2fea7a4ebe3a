"""The command line end to end, the LoRA file in a diffusers pipeline, and one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sat_train.cli import main, parse_config
from sat_train.demo import build_components
from train_helpers import LORA_FILE, run_cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-run")
    proc = run_cli("--guide", "sac", "--max_train_steps", "3", "--learning_rate", "1e-2",
                   "--checkpointing_steps", "2", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_demo_run_writes_outputs(demo_run):
    out, proc = demo_run
    assert "sat_train DEMO" in proc.stdout and "stable-diffusion-v1-5/stable-diffusion-v1-5" in proc.stdout
    assert (out / LORA_FILE).is_file() and (out / "checkpoint-2").is_dir()
    config = json.loads((out / "train_config.json").read_text())
    assert config["guide"] == "sac" and config["max_train_steps"] == 3 and config["resolved"]["demo"] is True
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "tensorboard logs missing"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/guide_delta", "train/mask_coverage", "train/lr"} <= tags


def test_lora_file_loads_into_pipeline_and_changes_outputs(demo_run):
    out, _ = demo_run
    saved = load_file(out / LORA_FILE)
    lora_b = {k: v for k, v in saved.items() if "lora.up" in k or "lora_B" in k}
    assert lora_b and any(v.abs().max() > 0 for v in lora_b.values()), "training must move LoRA B off zero"

    c = build_components()
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=c.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    cond = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        before = pipe.unet(latents, 500, cond).sample
        pipe.load_lora_weights(str(out))
        after = pipe.unet(latents, 500, cond).sample
    assert (after - before).abs().max() > 1e-4
    # the loaded B matrices are the file's (independent read via safetensors)
    loaded = {n.replace(".lora_B.default_0.weight", ""): p.detach()
              for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert len(loaded) == len(lora_b)
    for key, value in lora_b.items():
        module = key.removeprefix("unet.").replace(".lora.up.weight", "").replace(".lora_B.weight", "")
        torch.testing.assert_close(loaded[module], value, rtol=0, atol=0, msg=key)


def test_demo_defaults_fill_only_missing_flags():
    config = parse_config(["--max_train_steps", "7"])
    assert config.is_demo and config.max_train_steps == 7 and config.resolution == 128
    real = parse_config(["--pretrained_model_name_or_path", "x", "--train_data_dir", "d"])
    assert not real.is_demo and real.resolution == 512 and real.max_train_steps is None and real.guide == "sac"


def write_folder(folder, lines, images=()):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in images:
        (folder / name).write_bytes(data)
    if lines is not None:
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder


def jpeg_bytes():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("case, expected", [
    ("empty", ["no metadata.jsonl", "and no images"]),
    ("no_caption", ["a.jpg", 'no caption column "text"', "--caption_column"]),
    ("unreadable", ["b.jpg", "cannot read image"]),
    ("missing_file", ["c.jpg", "does not exist"]),
])
def test_bad_data_gives_one_line_error(tmp_path, capsys, case, expected):
    folder = tmp_path / "data"
    if case == "empty":
        folder.mkdir()
    elif case == "no_caption":
        write_folder(folder, [{"file_name": "a.jpg", "caption": "x"}], [("a.jpg", jpeg_bytes())])
    elif case == "unreadable":
        write_folder(folder, [{"file_name": "a.jpg", "text": "x"}, {"file_name": "b.jpg", "text": "y"}],
                     [("a.jpg", jpeg_bytes()), ("b.jpg", b"not an image")])
    else:
        write_folder(folder, [{"file_name": "c.jpg", "text": "x"}])
    strict = ["--strict_data"] if case == "unreadable" else []  # without it a bad image is skipped, not fatal
    with pytest.raises(SystemExit) as exit_info:
        main(["--pretrained_model_name_or_path", str(tmp_path / "unused"), "--train_data_dir", str(folder),
              "--output_dir", str(tmp_path / "out"), "--report_to", "none", *strict])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sat-train: error:")
    for fragment in expected:
        assert fragment in err


def test_errors_from_flags(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["--mixed_precision", "fp16", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset_name", "someone/faces", "--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "pip install datasets" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_data_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--pretrained_model_name_or_path is required" in capsys.readouterr().err
    for flags, message in [(["--guide", "none", "--guide_recompute"], "use it with --guide sac or cac"),
                           (["--guide_recompute", "--guide_detach_degraded"], "pick one"),
                           (["--guide", "none", "--guide_capture", "separate"], "use it with --guide sac or cac"),
                           (["--guide", "none", "--sac_capture", "separate"], "use it with --guide sac or cac"),
                           (["--dataset_name", "faces", "--pretrained_model_name_or_path", "x", "--skip_small_images"],
                            "does not run")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*flags, "--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_resolution_too_small_for_the_blur_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """--resolution 32 gives 4x4 latents; the 9-tap blur reflect-pads by 4, which needs more than 4."""
    import sat_train.demo

    monkeypatch.setattr(sat_train.demo, "build_demo_components", lambda *a: pytest.fail("a model was built"))
    for flags, fragment in [(["--resolution", "32"], "--resolution 32 gives 4x4 latents"),
                            (["--resolution", "64", "--guide_kernel_size", "17"], "--guide_kernel_size 17")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*flags, "--output_dir", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, err
        # the advice it gives is right: each suggested fix on its own passes the check
        smallest = int(err.split("--resolution >= ")[1].split()[0])
        kernel = int(err.split("--guide_kernel_size <= ")[1].split()[0])
        resolution = int(flags[1])
        kernel_size = int(flags[3]) if len(flags) > 2 else 9
        assert smallest // 8 > kernel_size // 2 and (smallest - 8) // 8 <= kernel_size // 2
        assert kernel // 2 < resolution // 8 and (kernel + 2) // 2 >= resolution // 8
    assert parse_config(["--resolution", "32", "--guide", "none", "--output_dir", str(tmp_path)]).resolution == 32


def test_guide_capture_and_its_old_name(tmp_path):
    for flag in ("--guide_capture", "--sac_capture"):
        config = parse_config([flag, "separate", "--guide", "cac", "--output_dir", str(tmp_path)])
        assert config.guide_capture == "separate" and config.guide_settings.capture == "separate"
