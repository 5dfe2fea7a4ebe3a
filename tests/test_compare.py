"""python -m sat_train.compare: seeds and source names parsed, every bad input one line and exit 2 with
nothing written, and end to end on the tiny demo model: `none` and two demo LoRAs rendered (checked
pixel for pixel against diffusers' own pipeline), paired by (prompt, seed), scored with the face metrics;
--images on copies of those images (an unreadable one skipped) and on the demo photos against blurred
copies of them, where a real face metric must put the sharp photos ahead."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

from sat_train import compare, train
from sat_train.demo import DEMO_DATA_DIR, build_components, build_sdxl_components, save_components
from sat_train.evaluate.metrics import FaceScorer
from sat_train.evaluate.report import NO_FACE_NOTE
from sat_train.evaluate.results import grid_pages, image_name, report_rows
from sat_train.evaluate.stats import METRIC_COLUMNS
from sat_train.evaluate.sources import images_source, lora_source, parse_seeds
from sat_train.errors import UsageError
from sat_train.outputs.lora_files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, save_lora
from train_helpers import REPO, lora_unet, tiny_config

PROMPTS = ("a portrait photo of a woman, face, eyes --s 2\n"
           "# the second line: SAG, a negative prompt and its own steps\n"
           "a photo of a man, half-body --s 3 --sag 0.5 --n blurry\n")
SEEDS = (0, 1)


# ---- fixtures: a base model folder and demo runs -------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny demo model saved as a folder, a plain and a SAC demo run (2 steps, checkpoints at 1 and 2;
    a learning rate that makes the LoRA visible in 2 steps), and an SDXL demo LoRA."""
    root = tmp_path_factory.mktemp("runs")
    base = save_components(build_components(), root / "base")
    plain = root / "plain"
    train(tiny_config(plain, guide="none", learning_rate=1e-2))
    sac = root / "sat-sac"
    train(tiny_config(sac, guide="sac", learning_rate=1e-2, checkpointing_steps=1, export_format="both"))
    sdxl = save_lora(lora_unet(build=build_sdxl_components).unet, root / "sdxl-lora")
    return {"root": root, "base": base, "plain": plain, "sac": sac, "sdxl": sdxl}


def run_main(argv, scorer=None):
    return compare.main([str(a) for a in argv], scorer=scorer)


def never_scored(image):
    raise AssertionError("a bad input must stop before any image is scored")


def face_scorer():
    """The real face metrics, where the eval extra is installed (else the test skips)."""
    try:
        return FaceScorer()
    except UsageError as err:  # "pip install 'sat[eval]'"
        pytest.skip(str(err))


def no_face(image):
    """A scorer's answer for an image without a face (the stand-in where the eval extra is missing)."""
    return {**dict.fromkeys(METRIC_COLUMNS), "faces": 0}, []


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seeds", [("0-7", list(range(8))), ("0,3,5", [0, 3, 5]), ("0-3,10", [0, 1, 2, 3, 10]),
                                         ("4", [4]), ("2-2", [2]), ("0-3,2,1", [0, 1, 2, 3]), (" 5 , 1-2", [5, 1, 2])])
def test_seeds_ranges_and_lists(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, said", [("7-0", "runs backwards"), ("a", "'a' is not a seed"), ("1-", "'1-'"),
                                        ("-1", "'-1'"), ("", "''"), ("0-99999", "more than")])
def test_bad_seeds(text, said):
    with pytest.raises(UsageError, match=said):
        parse_seeds(text)


def test_sources_are_named_from_their_paths_with_the_step_of_checkpoints(runs, monkeypatch):
    sac, plain = runs["sac"], runs["plain"]
    named = {given: lora_source(str(given)) for given in (
        "none", plain, sac, sac / "checkpoint-1", sac / "checkpoint-2" / LORA_WEIGHTS_NAME, sac / KOHYA_WEIGHTS_NAME)}
    assert [(s.name, s.kind, s.step) for s in named.values()] == [
        ("none", "none", None), ("plain", "lora", None), ("sat-sac", "lora", None), ("sat-sac/checkpoint-1", "lora", 1),
        ("sat-sac/checkpoint-2", "lora", 2), ("sat-sac", "lora", None)]
    # both checkpoints belong to one run (report.html plots its steps), the run folder is its own
    assert named[sac / "checkpoint-1"].run == named[sac / "checkpoint-2" / LORA_WEIGHTS_NAME].run != named[sac].run
    custom = runs["root"] / "my_face_v2.safetensors"
    shutil.copy(plain / LORA_WEIGHTS_NAME, custom)
    assert lora_source(str(custom)).name == "my_face_v2"
    assert (lora_source(f"final={sac}").name, lora_source(f"sac/step1={sac}/checkpoint-1").step) == ("final", 1)
    monkeypatch.chdir(sac / "checkpoint-1")
    assert (lora_source(".").name, lora_source(".").step) == ("sat-sac/checkpoint-1", 1)
    folder = runs["root"] / "renders" / "checkpoint-7"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert (images_source(str(folder)).name, images_source(str(folder)).step) == ("renders/checkpoint-7", 7)
    assert images_source(f"old={folder}").name == "old"


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------

def bad_input_cases(runs):
    root, base, plain = runs["root"], runs["base"], runs["plain"]
    no_images = root / "no-images"
    no_images.mkdir(exist_ok=True)
    (no_images / "notes.txt").write_text("not an image")
    empty_prompts = root / "empty.txt"
    empty_prompts.write_text("# only a comment\n\n")
    bare = root / "bare"  # a LoRA without the run's train_config.json: its base model is unknown
    bare.mkdir(exist_ok=True)
    shutil.copy(plain / LORA_WEIGHTS_NAME, bare / LORA_WEIGHTS_NAME)
    elsewhere = root / "elsewhere"  # a run trained on another base model
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(plain / LORA_WEIGHTS_NAME, elsewhere / LORA_WEIGHTS_NAME)
    (elsewhere / "train_config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(base)}))
    ranks = load_file(plain / LORA_WEIGHTS_NAME)  # one up matrix of rank 8 against its down matrix's 4
    up = next(key for key in sorted(ranks) if key.endswith("lora.up.weight"))
    ranks[up] = torch.zeros(ranks[up].shape[0], 8)
    save_file(ranks, root / "ranks.safetensors")
    model = ["--pretrained_model_name_or_path", base]
    prompt = ["--prompt", "a face --s 2", "--resolution", "64"]
    return {
        "nothing to compare": ([], "nothing to compare: give --lora"),
        "missing LoRA": ([*model, "--lora", root / "nope", *prompt], f"--lora {root / 'nope'}: no such file or folder"),
        "folder without a LoRA": ([*model, "--lora", no_images, *prompt], f"--lora {no_images}: no {LORA_WEIGHTS_NAME}"),
        "missing images folder": (["--images", root / "nope"], f"--images {root / 'nope'} does not exist"),
        "images folder without images": (["--images", no_images], f"--images {no_images} holds no images"),
        "empty prompts file": ([*model, "--lora", "none", "--prompts", empty_prompts], f"--prompts {empty_prompts} has no prompt"),
        "LoRA without prompts": ([*model, "--lora", "none"], "--lora sources render prompts"),
        "prompts without LoRA": ([*prompt, "--images", DEMO_DATA_DIR], "rendered by --lora sources only"),
        "no base model": (["--lora", "none", *prompt], "--lora needs a base model: pass --pretrained_model_name_or_path"),
        "bare LoRA, no base model": (["--lora", bare, *prompt], "--lora needs a base model"),
        "runs of two base models": (["--lora", plain, "--lora", elsewhere, *prompt], "trained on different base models"),
        "duplicate names": ([*model, "--lora", "none", "--lora", plain, "--lora", bare / LORA_WEIGHTS_NAME,
                             "--lora", "bare=" + str(plain), *prompt], "two sources are named 'bare'"),
        "duplicate none": ([*model, "--lora", "none", "--lora", "none", *prompt], "two sources are named 'none'"),
        "bad seeds": ([*model, "--lora", "none", *prompt, "--seeds", "3-1"], "--seeds 3-1: the range 3-1 runs backwards"),
        "a prompt line SAG cannot sample": ([*model, "--lora", "none", "--prompt", "a face --sag 0.5 --w 32 --h 32"],
                                            "--prompt: --sag needs images of at least 40 px"),
        "SDXL LoRA on an SD v1.5 base": ([*model, "--lora", "none", "--lora", runs["sdxl"], *prompt],
                                         "does not fit this Stable Diffusion v1.5 base model (size mismatch"),
        "ranks that do not match": ([*model, "--lora", plain, "--lora", root / "ranks.safetensors", *prompt],
                                    "ranks.safetensors does not fit this Stable Diffusion v1.5 base model"),
        "a LoRA that is not safetensors": ([*model, "--lora", empty_prompts, *prompt], "read only as .safetensors"),
    }


CASES = ("nothing to compare", "missing LoRA", "folder without a LoRA", "missing images folder",
         "images folder without images", "empty prompts file", "LoRA without prompts", "prompts without LoRA",
         "no base model", "bare LoRA, no base model", "runs of two base models", "duplicate names", "duplicate none",
         "bad seeds", "a prompt line SAG cannot sample", "SDXL LoRA on an SD v1.5 base", "ranks that do not match",
         "a LoRA that is not safetensors")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, runs, tmp_path, monkeypatch, capsys):
    argv, said = bad_input_cases(runs)[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_main([*argv, "--output_dir", out], scorer=never_scored)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith("sat_train.compare: error: ") and said in errors[0], errors
    assert list(tmp_path.iterdir()) == []  # not even --output_dir


def test_missing_face_extras_name_the_pip_extra(runs, tmp_path, monkeypatch, capsys):
    face_scorer()
    monkeypatch.setitem(sys.modules, "cv2", None)  # an environment without OpenCV: its import fails
    with pytest.raises(SystemExit) as stop:
        run_main(["--images", DEMO_DATA_DIR, "--output_dir", tmp_path / "out"])
    assert stop.value.code == 2
    assert "pip install 'sat[eval]'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sat_train.compare", "--images", str(tmp_path / "nope")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"sat_train.compare: error: --images {tmp_path / 'nope'} does not "
                                                  "exist; pass a folder of images (paired across sources by file name)"]
    assert list(tmp_path.iterdir()) == []


# ---- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    """`none`, the plain run and the SAC run's checkpoint-2, two prompts x two seeds at 64 px; and
    `none` alone again, rendered after a LoRA this time, into another folder. Scored with the face metrics
    where the eval extra is installed, else with a stand-in that finds no face (the rendering tests
    still run; the face tests skip)."""
    try:
        scorer = face_scorer()
    except pytest.skip.Exception:
        scorer = no_face
    root = tmp_path_factory.mktemp("compare")
    (root / "prompts.txt").write_text(PROMPTS)
    common = ["--pretrained_model_name_or_path", runs["base"], "--prompts", root / "prompts.txt", "--seeds", "0-1",
              "--resolution", "64", "--device", "cpu"]
    out = root / "out"
    results = run_main([*common, "--lora", "none", "--lora", runs["plain"], "--lora", runs["sac"] / "checkpoint-2",
                        "--output_dir", out], scorer)
    again = root / "again"
    run_main([*common, "--lora", runs["plain"], "--lora", "none", "--output_dir", again], scorer)
    return {"out": out, "again": again, "results": results, "scorer": scorer, "root": root}


SOURCES = ("none", "plain", "sat-sac/checkpoint-2")
FILES = [f"p{p:02d}_s{s}.png" for p in range(2) for s in SEEDS]


def test_every_file_is_written(compared):
    out = compared["out"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(["metrics.csv", "summary.csv", "grid_p00.png", "grid_p01.png", "report.html",
                              *(f"images/{source}/{file}" for source in SOURCES for file in FILES)])
    assert Image.open(out / "images" / "none" / "p00_s0.png").size == (64, 64)
    # a grid: a row per source, a column per seed, each 64 px cell as rendered
    grid = Image.open(out / "grid_p01.png")
    assert grid.height > 3 * 64 and grid.width > 2 * 64
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count('src="data:image/png;base64,') == 2 and "grid_p00.png" in report and "grid_p01.png" in report


def test_rows_pair_by_prompt_and_seed(compared):
    rows = read_rows(compared["out"] / "metrics.csv")
    assert [(r["source"], r["file"]) for r in rows] == [(s, f) for s in SOURCES for f in FILES]
    for row in rows:
        assert row["file"] == f"p{int(row['prompt_index']):02d}_s{row['seed']}.png"
        assert row["step"] == ("2" if row["source"] == "sat-sac/checkpoint-2" else "")
    summary = {r["source"]: r for r in read_rows(compared["out"] / "summary.csv")}
    assert list(summary) == list(SOURCES)
    assert summary["plain"]["faces_pairs"] == summary["sat-sac/checkpoint-2"]["faces_pairs"] == "4"


def test_none_renders_identically_whatever_was_loaded_before(compared):
    for file in FILES:
        first, again = compared["out"] / "images/none" / file, compared["again"] / "images/none" / file
        assert first.read_bytes() == again.read_bytes(), file


def test_lora_images_differ_from_none(compared):
    for source in SOURCES[1:]:
        for file in FILES:
            assert not np.array_equal(pixels(compared["out"] / "images" / source / file),
                                      pixels(compared["out"] / "images/none" / file)), (source, file)


def test_images_are_diffusers_pipeline_images(runs, compared):
    """A line without --sag renders as diffusers' StableDiffusionPipeline does with DDIM (training's default
    sampler), the LoRA loaded by diffusers itself, for the same seed."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = runs["base"]
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"), unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def rendered(seed):
        return np.asarray(pipe("a portrait photo of a woman, face, eyes", num_inference_steps=2, guidance_scale=7.5,
                               height=64, width=64, generator=torch.Generator().manual_seed(seed)).images[0])

    for seed in SEEDS:
        assert np.array_equal(pixels(compared["out"] / f"images/none/p00_s{seed}.png"), rendered(seed))
    pipe.load_lora_weights(str(runs["plain"]), weight_name=LORA_WEIGHTS_NAME)
    assert np.array_equal(pixels(compared["out"] / "images/plain/p00_s1.png"), rendered(1))


def test_noise_images_have_no_face_and_the_report_says_so(compared):
    face_scorer()  # the claim is the real detector's
    rows = read_rows(compared["out"] / "metrics.csv")
    assert {r["faces"] for r in rows} == {"0"}
    assert all(r[m] == "" for r in rows for m in ("face_score", "face_sharpness", "eye_sharpness", "eye_balance"))
    results = compared["results"]
    assert not results.faces_found and NO_FACE_NOTE in (compared["out"] / "report.html").read_text(encoding="utf-8")
    assert results.verdict.startswith("plain vs none: no metric measured on both")
    assert results.warning.startswith("warning: underpowered comparison") and "plain (4)" in results.warning


def test_images_mode_scores_copies_and_skips_an_unreadable_file(compared, capsys):
    face_scorer()
    root, out = compared["root"], compared["out"]
    copies = {}
    for source in ("none", "plain"):
        copies[source] = shutil.copytree(out / "images" / source, root / "copies" / source)
    (copies["plain"] / "broken.png").write_bytes(b"not a png")
    Image.open(copies["plain"] / "p01_s1.png").resize((96, 80)).save(copies["plain"] / "p01_s1.png")  # scored as it is
    other = root / "copies" / "renamed"
    other.mkdir()
    shutil.copy(copies["none"] / "p00_s0.png", other / "00001-12345.png")
    results = run_main(["--images", copies["none"], "--images", copies["plain"], "--images", other,
                        "--output_dir", root / "scored"], compared["scorer"])
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if "broken.png" in line]
    assert len(skipped) == 1 and skipped[0].startswith("warning: cannot read image") and skipped[0].endswith("skipped")
    assert "warning: renamed has no image named as one of none's: nothing pairs" in captured.err
    rows = read_rows(root / "scored" / "metrics.csv")
    assert [(r["source"], r["file"]) for r in rows] == [(s, f) for s in ("none", "plain") for f in FILES] + [
        ("renamed", "00001-12345.png")]
    assert all(r["prompt_index"] == r["seed"] == r["step"] == "" for r in rows)
    # the same pixels score the same as when they were rendered
    rendered = {(r["source"], r["file"]): r for r in read_rows(out / "metrics.csv")}
    assert all({k: v for k, v in r.items() if k in ("faces", "face_sharpness")} ==
               {k: v for k, v in rendered[(r["source"], r["file"])].items() if k in ("faces", "face_sharpness")}
               for r in rows if r["source"] != "renamed")
    summary = {r["source"]: r for r in read_rows(root / "scored" / "summary.csv")}
    assert (summary["plain"]["faces_pairs"], summary["renamed"]["faces_pairs"]) == ("4", "0")
    assert sorted(p.name for p in (root / "scored").iterdir()) == ["grid_images_00.png", "metrics.csv", "report.html",
                                                                   "summary.csv"]
    assert results.verdict in captured.out


def test_images_mode_puts_sharp_photos_ahead_of_blurred_copies(tmp_path, capsys):
    """The demo photos (upscaled to 256 px) against Gaussian-blurred copies: blur lowers face sharpness
    on every face (evaluate/metrics.py), so the verdict must name the photos ahead, interval below 0."""
    scorer = face_scorer()
    sharp, blurred = tmp_path / "photos", tmp_path / "blurred"
    sharp.mkdir()
    blurred.mkdir()
    for file in sorted(DEMO_DATA_DIR.glob("*.jpg")):
        image = Image.open(file).convert("RGB").resize((256, 256), Image.LANCZOS)
        image.save(sharp / f"{file.stem}.png")
        image.filter(ImageFilter.GaussianBlur(2)).save(blurred / f"{file.stem}.png")
    results = run_main(["--images", sharp, "--images", blurred, "--output_dir", tmp_path / "out"], scorer)
    rows = read_rows(tmp_path / "out" / "metrics.csv")
    by_file = {}
    for row in rows:
        by_file.setdefault(row["file"], {})[row["source"]] = row
    pairs = [(float(r["photos"]["face_sharpness"]), float(r["blurred"]["face_sharpness"]))
             for r in by_file.values() if r["photos"]["face_sharpness"] and r["blurred"]["face_sharpness"]]
    assert len(pairs) >= 4 and all(b < s for s, b in pairs)
    said = results.verdict.split("face_sharpness ", 1)[1].split(")", 1)[0]
    assert said.startswith("-") and said.endswith("photos ahead (interval excludes 0")
    assert results.faces_found and results.warning is not None
    summary = {r["source"]: r for r in read_rows(tmp_path / "out" / "summary.csv")}
    assert float(summary["photos"]["with_face"]) == 1.0
    assert float(summary["blurred"]["face_sharpness_diff_high"]) < 0
    assert f"{len(pairs)}" == summary["blurred"]["face_sharpness_pairs"]


def test_reference_images_add_identity_where_a_face_is(tmp_path):
    pytest.importorskip("dlib")
    face_scorer()
    references = tmp_path / "references"
    references.mkdir()
    for name in ("person_00", "person_01"):
        shutil.copy(DEMO_DATA_DIR / f"{name}.jpg", references)
    results = run_main(["--images", DEMO_DATA_DIR, "--reference_images", references, "--output_dir", tmp_path / "out"])
    rows = read_rows(tmp_path / "out" / "metrics.csv")
    assert len(rows) == 6 and results.faces_found
    assert all((row["identity"] != "") == (row["faces"] != "0") for row in rows)
    assert all(-1.0 < float(row["identity"]) <= 1.0 for row in rows if row["identity"])


def test_a_demo_run_renders_on_the_demo_model_without_the_base_flag(runs, compared, tmp_path):
    """No --pretrained_model_name_or_path: the base model is the one the run recorded, read from the run
    folder above a checkpoint-N folder: the demo model, whose weights the saved base folder holds."""
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    run_main(["--lora", runs["sac"] / "checkpoint-2", "--prompts", tmp_path / "prompts.txt", "--seeds", "1",
              "--resolution", "64", "--output_dir", tmp_path / "out"], no_face)
    for file in ("p00_s1.png", "p01_s1.png"):
        assert pixels(tmp_path / "out/images/sat-sac/checkpoint-2" / file).tobytes() == \
            pixels(compared["out"] / "images/sat-sac/checkpoint-2" / file).tobytes()


# ---- what goes in the files ----------------------------------------------------------------------

def test_grid_pages_per_prompt_then_the_other_files_eight_a_grid():
    rows = [{"source": "a", "file": name} for name in
            [image_name(p, s) for p in range(2) for s in (0, 5)] + [f"x{i:02d}.png" for i in range(10)]]
    pages = grid_pages(rows, prompt_count=2, seeds=[0, 5])
    assert [(page.name, page.files) for page in pages[:2]] == [
        ("grid_p00.png", ("p00_s0.png", "p00_s5.png")), ("grid_p01.png", ("p01_s0.png", "p01_s5.png"))]
    assert pages[0].labels == ("seed 0", "seed 5")
    assert [(page.name, len(page.files)) for page in pages[2:]] == [("grid_images_00.png", 8), ("grid_images_01.png", 2)]
    assert pages[2].files + pages[3].files == tuple(f"x{i:02d}.png" for i in range(10))


def test_the_report_plots_the_steps_of_the_run_with_most_checkpoints():
    runs = {"plain/checkpoint-1": "/r/plain", "plain/checkpoint-2": "/r/plain", "sac/checkpoint-1": "/r/sac",
            "sac/checkpoint-2": "/r/sac", "sac/checkpoint-3": "/r/sac", "none": "none"}
    rows = [{"source": name, "file": "a.png", "step": int(name[-1]) if name != "none" else None} for name in runs]
    kept = {row["source"]: row["step"] for row in report_rows(rows, runs)}
    assert kept == {"plain/checkpoint-1": None, "plain/checkpoint-2": None, "sac/checkpoint-1": 1,
                    "sac/checkpoint-2": 2, "sac/checkpoint-3": 3, "none": None}
    assert [row["step"] for row in rows][:2] == [1, 2]  # metrics.csv's rows keep theirs


def test_every_flag_has_help():
    parser = compare.build_parser()
    assert [a.dest for a in parser._actions if not a.help] == []
    assert "python -m sat_train.compare --images a1111/plain" in parser.format_help()  # the examples
