"""Safety: a run writes only inside --output_dir, LoRA weights are safetensors both ways (a pickle
is never unpickled), trust_remote_code is never passed; NaN losses stop the run without saving;
CLI errors are one line (a traceback only with --debug)."""

from __future__ import annotations

import pickle

import pytest
import torch
from accelerate.utils.other import load as accelerate_load

import sat_train.demo
import sat_train.run.loop as loop_module
import sat_train.run.prepare as prepare_module
from sat_train.cli import main
from sat_train.demo import build_components, save_components
from sat_train.outputs.lora_files import load_lora
from sat_train.models.load import load_components
from sat_train.models.lora import add_lora
from sat_train import train
from sat_train.outputs.checkpoints import list_checkpoints
from train_helpers import DEMO_DATA_DIR, LORA_FILE, tiny_config

# accelerate's training state (optimizer / lr scheduler / RNG): torch.save files that resume reads
# with torch's weights_only unpickler (no code runs); everything else a run writes is listed here.
TRAINING_STATE = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "sampler.bin"}


def test_run_writes_only_inside_output_dir_and_only_safetensors_weights(tmp_path, monkeypatch):
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    root.mkdir(), cwd.mkdir()
    monkeypatch.chdir(cwd)  # any relative-path write would land here
    out = root / "out"
    train(tiny_config(out, max_train_steps=3, checkpointing_steps=3, report_to="tensorboard",
                      validation_prompt="a photo of a face", num_validation_images=1))
    written = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert written and all(p.parts[0] == "out" for p in written), written
    assert list(cwd.iterdir()) == []
    for path in written:
        if path.suffix in (".bin", ".pkl", ".pt", ".pth", ".ckpt"):
            assert path.parent.name.startswith("checkpoint-") and path.name in TRAINING_STATE, path
            # what resume reads it with: torch's weights_only unpickler (+ numpy's RNG-state types only)
            accelerate_load(root / path, weights_only=True)
    assert (out / LORA_FILE).is_file() and (out / "checkpoint-3" / LORA_FILE).is_file()
    assert not [p for p in written if "lora" in p.name and p.suffix != ".safetensors"]


def test_logging_dir_outside_output_dir_is_refused(tmp_path, capsys):
    for logging_dir in ("../elsewhere", str(tmp_path / "abs-logs")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--output_dir", str(tmp_path / "out"), "--logging_dir", logging_dir, "--report_to", "none"])
        assert exit_info.value.code == 2
        assert "outside --output_dir" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "abs-logs").exists()
    assert not (tmp_path / "out").exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def test_lora_loading_never_unpickles(tmp_path):
    components = build_components()
    add_lora(components.unet, rank=4)
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    with open(folder / "pytorch_lora_weights.bin", "wb") as f:
        pickle.dump({"unet.x": _Exploit(str(marker))}, f)
    with pytest.raises(Exception):  # noqa: B017 - any error will do, as long as nothing is unpickled
        load_lora(components.unet, folder)
    assert not marker.exists()


def test_model_loading_never_passes_trust_remote_code(tmp_path, monkeypatch):
    import diffusers
    import transformers

    folder = save_components(build_components(seed=1), tmp_path / "tiny-sd")
    calls = []
    for module, name in ((transformers, "CLIPTokenizer"), (transformers, "CLIPTextModel"),
                         (diffusers, "AutoencoderKL"), (diffusers, "UNet2DConditionModel"),
                         (diffusers, "DDPMScheduler")):
        cls = getattr(module, name)
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            calls.append(kwargs)
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_components(tiny_config(tmp_path / "out", pretrained_model_name_or_path=str(folder),
                                train_data_dir=str(DEMO_DATA_DIR)))
    assert len(calls) == 5 and all("trust_remote_code" not in kwargs for kwargs in calls), calls


def stopped_demo_run(out, capsys) -> tuple[str, list[str]]:
    """A 4-step demo run (checkpoint every 2) that must stop with exit 1: its stderr and error lines."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--report_to", "none", "--output_dir", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    return err, [line for line in err.splitlines() if "error" in line]  # (the rest is the progress bar)


def test_nan_loss_stops_the_run_naming_the_step_and_saves_nothing(tmp_path, monkeypatch, capsys):
    real_build_guide = prepare_module.build_guide

    def nan_at_third_step(*args, **kwargs):
        guide, calls = real_build_guide(*args, **kwargs), [0]

        def step(unet, inputs):
            calls[0] += 1
            result = guide(unet, inputs)
            if calls[0] == 3:
                result.loss = result.loss * float("nan")
            return result

        step.forwards_per_step = guide.forwards_per_step
        return step

    monkeypatch.setattr(prepare_module, "build_guide", nan_at_third_step)
    out = tmp_path / "out"
    err, errors = stopped_demo_run(out, capsys)
    assert len(errors) == 1 and errors[0].startswith("sat-train: error: loss is nan at step 3"), err
    assert f"last good checkpoint is {out / 'checkpoint-2'}" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / LORA_FILE).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case, fragment", [
    ("guide", "argument --guide: invalid choice: 'blur'"),
    ("folder", "missing vae/, text_encoder/"),
    ("offline", "HF_HUB_OFFLINE is set"),
])
def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, case, fragment):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model" / "unet").mkdir(parents=True)
    data = ["--train_data_dir", str(DEMO_DATA_DIR), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--resolution", "64"]
    argv = {"guide": ["--guide", "blur"],
            "folder": ["--pretrained_model_name_or_path", str(tmp_path / "model"), *data],
            "offline": ["--pretrained_model_name_or_path", "nobody-xyz/no-such-model", *data]}[case]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sat-train: error:") and fragment in err, err
    assert "Traceback" not in captured.out + captured.err
    if case != "guide":  # --debug: the exception itself propagates (its traceback is printed)
        with pytest.raises(Exception, match="cannot load Stable Diffusion|not a Stable Diffusion"):
            main([*argv, "--debug"])


def test_unexpected_errors_are_one_line_unless_debug(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure\nsecond line")

    monkeypatch.setattr(sat_train.demo, "build_components", broken)
    argv = ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "sat-train: error: RuntimeError: simulated failure (run with --debug for the traceback)"
    with pytest.raises(RuntimeError, match="simulated failure"):
        main([*argv, "--debug"])


def test_nan_weights_after_a_finite_loss_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    """The second update turns a LoRA weight into NaN while its loss was finite; checkpoint-2 is due
    right then: the run stops naming the step instead of saving the weights as the last good ones."""
    real_log_step = loop_module.log_step

    def poison_after_second_update(run):  # runs after the optimizer step, before the checkpoint due
        if run.global_step == 2:
            with torch.no_grad():
                run.params[0].view(-1)[0] = float("nan")
        return real_log_step(run)

    monkeypatch.setattr(loop_module, "log_step", poison_after_second_update)
    out = tmp_path / "out"
    err, errors = stopped_demo_run(out, capsys)
    assert len(errors) == 1 and errors[0].startswith("sat-train: error: LoRA weights became NaN/inf at step 2"), err
    assert "last good checkpoint is none" in err
    assert list_checkpoints(out) == [] and not (out / LORA_FILE).exists()
