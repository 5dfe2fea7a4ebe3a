"""The SDXL benchmark's tools: its full-size UNet is SDXL's (against diffusers' own conversion of
Stability AI's sd_xl_base.yaml), and the GPU step script runs end to end on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.sdxl_unet import SDXL_UNET

ROOT = Path(__file__).resolve().parents[1]

# Stability AI's sd_xl_base.yaml, model.params.network_config.params (generative-models, configs/inference)
SD_XL_BASE_UNET = dict(
    adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
    attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
    use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
)


def _plain(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def test_benchmark_unet_is_sdxl_base_as_diffusers_converts_it():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {"network_config": {"params": SD_XL_BASE_UNET},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    sdxl_checkpoint = {CHECKPOINT_KEY_NAMES["xl_base"]: torch.zeros(1)}  # how diffusers tells SDXL base (1024 px)
    converted = create_unet_diffusers_config_from_ldm(original, sdxl_checkpoint)
    with torch.device("meta"):  # structure only: no weights are made
        ours, theirs = UNet2DConditionModel(**SDXL_UNET), UNet2DConditionModel(**converted)
    assert _plain(ours.config) == _plain(theirs.config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    mid = ours.mid_block.attentions[0]
    assert len(mid.transformer_blocks) == 10 and mid.transformer_blocks[0].attn1.heads == 20


def script_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}


def test_gpu_step_script_runs_on_the_tiny_sdxl(tmp_path):
    """--tiny on CPU: a row per guide, with times; recompute's peak memory below the default SAC
    step's and near the plain step's (it keeps none of the first forward's activations)."""
    out = tmp_path / "step.json"
    env = script_env()
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sdxl_gpu_step.py"), "--tiny", "--device", "cpu",
                          "--batch_sizes", "2", "--guides", "sac", "sac --guide_recompute", "--rounds", "1",
                          "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row["guide"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none", "sac", "sac --guide_recompute"}
    assert all(row["step_ms"] > 0 and row["batch"] == 2 and row["dtype"] == "fp32" for row in rows.values())
    none, sac, recompute = (rows[g]["peak_mib"] for g in ("none", "sac", "sac --guide_recompute"))
    assert sac > 1.3 * none and recompute < 0.75 * sac


# sdxl_gpu_step.main with the "sac" step made to raise as a kernel failing on a GPU would
FAILING_SAC = """
import sys
import guided_step, sdxl_gpu_step
real_step = guided_step.GuideSteps.step
def step(self, guide):
    fn = real_step(self, guide)
    if guide != "sac":
        return fn
    def failing():
        raise ValueError("a kernel failed")
    return failing
guided_step.GuideSteps.step = step
sys.exit(sdxl_gpu_step.main(sys.argv[1:]))
"""


def test_gpu_step_script_keeps_the_other_guides_when_one_fails(tmp_path):
    out, rows_file = tmp_path / "step.json", tmp_path / "rows.txt"
    run = subprocess.run([sys.executable, "-c", FAILING_SAC, "--tiny", "--device", "cpu", "--batch_sizes", "1",
                          "--guides", "sac", "cac", "--rounds", "1", "--json", str(out), "--rows", str(rows_file)],
                         cwd=ROOT / "benchmarks", env=script_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row["guide"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["sac"]["error"] == "ValueError: a kernel failed" and "step_ms" not in rows["sac"]
    assert rows["none"]["step_ms"] > 0 and rows["cac"]["step_ms"] > 0 and rows["cac"]["step_ratio"] > 0
    assert "a kernel failed" in rows_file.read_text() and "a kernel failed" in run.stderr  # the traceback
