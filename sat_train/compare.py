"""Did SAT help? Render the same prompts and seeds with several LoRAs (or read images that exist), score
every face offline and write a table, grids, a report and a one-line verdict::

    python -m sat_train.compare --pretrained_model_name_or_path BASE \\
        --lora none --lora runs/plain --lora runs/sat-sac --lora runs/sat-sac/checkpoint-500 \\
        --prompts prompts.txt --seeds 0-7 --reference_images my_faces/ --output_dir compare/
    python -m sat_train.compare --images a1111/plain --images a1111/sat --output_dir compare/

Each --lora / --images is a source (evaluate/sources.py names them); the first one given is the baseline
every other is compared with, image by image: generated images pair by (prompt, seed), --images by file
name. Sampling is the trainer's --sample_prompts sampling (outputs/samples.py: sampler, steps, CFG, size,
negative prompt, --sag per line), seeded per image, on one base model loaded once (resolved as
``python -m sat_train.sample`` resolves it); each LoRA is loaded, rendered with and unloaded in turn.
Face metrics: evaluate/metrics.py (``pip install 'sat[eval]'``); files: evaluate/results.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UsageError
from .evaluate.report import NO_FACE_NOTE
from .evaluate.results import Results, grid_pages, image_name, write_results
from .evaluate.sources import Source, check_unique, image_files, images_source, lora_source, parse_seeds, read_image
from .outputs.lora_files import find_lora_file, load_pipeline_lora
from .outputs.pictures import save_png
from .outputs.sample_prompts import (SAMPLE_SAMPLERS, SamplePrompt, check_sample_prompt, parse_prompt_file,
                                     parse_prompt_line)
from .outputs.samples import generate_images
from .sample import (add_base_model_arguments, base_model, load_base_components, pick_device, recorded_settings,
                     requested_size)

ADAPTER = "compare"  # the adapter name each LoRA loads under while its images render
IMAGES_FOLDER = "images"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sat_train.compare", description=__doc__.split("::")[0],
                                epilog="examples:\n" + __doc__.split("::")[1].split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", dest="sources", action="append", type=lambda value: ("lora", value), metavar="LORA",
                   help="A source to render (repeatable): none (the base model alone), a training output_dir, a "
                   "checkpoint-N folder (its step is N) or a LoRA .safetensors file (diffusers or kohya keys). Named "
                   "after its path (none, sat-sac, sat-sac/checkpoint-500); NAME=PATH names it yourself.")
    p.add_argument("--images", dest="sources", action="append", type=lambda value: ("images", value), metavar="DIR",
                   help="A source of existing images (repeatable): a folder of them (A1111, ComfyUI, another "
                   "trainer), paired with the other sources' images by file name. NAME=DIR names it.")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="The prompts --lora sources render: the --sample_prompts format (one a line; --n --w --h "
                   "--s --l --ss --sag options per line; a line's --d is not used: every line renders with every "
                   "--seeds seed).")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="One prompt (repeatable; the same options as a --prompts line), after --prompts' lines.")
    p.add_argument("--seeds", default="0-7",
                   help="The seeds every prompt renders with: ranges and comma lists, e.g. 0-7 or 0,3,5 or 0-3,10 "
                   "(default: 0-7).")
    p.add_argument("--reference_images", metavar="DIR", default=None,
                   help="Photos of the person the LoRAs learned (the training images): adds the identity metric "
                   "(needs pip install 'sat[eval,identity]').")
    p.add_argument("--output_dir", default="compare",
                   help="Where images/, metrics.csv, summary.csv, the grids and report.html go (default: compare).")
    add_base_model_arguments(p)
    p.add_argument("--resolution", default=None,
                   help="Size of the prompt lines without --w/--h: one int (square) or W,H (default: the model's, "
                   "SD v1.5 512, SDXL 1024).")
    p.add_argument("--sample_sampler", default="ddim", choices=SAMPLE_SAMPLERS, metavar="SAMPLER",
                   help="Sampler of the prompt lines without --ss, kohya's names as in training (default: ddim).")
    p.add_argument("--lora_scale", type=float, default=1.0, help="Weight of every LoRA (default: 1.0).")
    p.add_argument("--mixed_precision", default="no", choices=tuple(DTYPES),
                   help="Render under autocast in fp16 or bf16 as training's samples do (default: no, float32).")
    p.add_argument("--attention_backend", default="auto", choices=("auto", "xformers", "sdpa", "eager"),
                   help="Attention of --sag lines (default: auto).")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available).")
    return p


@dataclass(frozen=True)
class Plan:
    """What a comparison does, checked before any model loads."""

    sources: list[Source]
    prompts: list[SamplePrompt]
    seeds: list[int]
    output_dir: Path

    @property
    def loras(self) -> list[Source]:
        return [source for source in self.sources if source.kind == "lora"]

    @property
    def generates(self) -> bool:
        return any(source.generated for source in self.sources)


def make_plan(args) -> Plan:
    """The sources, prompts and seeds, every flag checked (one UsageError for the first problem)."""
    if not args.sources:
        raise UsageError("nothing to compare: give --lora (none, a run folder, a checkpoint-N folder or a LoRA file) "
                         "and/or --images DIR, once per source")
    sources = [lora_source(value) if kind == "lora" else images_source(value) for kind, value in args.sources]
    check_unique(sources)
    prompts = read_prompts(args)
    generates = any(source.generated for source in sources)
    if generates and not prompts:
        raise UsageError("--lora sources render prompts: give --prompts FILE (the --sample_prompts format) or "
                         "--prompt TEXT")
    if prompts and not generates:
        raise UsageError("--prompts/--prompt are rendered by --lora sources only, and there is none: add --lora "
                         "sources or drop the prompts")
    requested_size(args.resolution)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; pass a folder (it is made when missing)")
    return Plan(sources, prompts, parse_seeds(args.seeds) if generates else [], output_dir)


def read_prompts(args) -> list[SamplePrompt]:
    """--prompts FILE's lines, then each --prompt; a line's --d is said to be unused."""
    prompts = parse_prompt_file(args.prompts, "--prompts") if args.prompts else []
    prompts += [parse_prompt_line(text, "--prompt") for text in args.prompt]
    seeded = [prompt.source for prompt in prompts if prompt.seed is not None]
    if seeded:
        print(f"note: {', '.join(seeded)}: --d is not used; every prompt renders with each of --seeds", file=sys.stderr)
    return prompts


# ---- the base model and the LoRAs ------------------------------------------------------------------

def base_run(args, loras: list[Source]) -> Path | None:
    """The LoRA whose run's train_config.json gives the base model (sample.py's rule), or None with
    --pretrained_model_name_or_path. The runs must agree: one base renders every source."""
    if args.pretrained_model_name_or_path:
        return None
    recorded = [(source, recorded_settings(source.path)) for source in loras]
    recorded = [(source, base_name(settings)) for source, settings in recorded if settings]
    if not recorded:
        raise UsageError("--lora needs a base model: pass --pretrained_model_name_or_path (SD v1.5 or SDXL: a folder, "
                         "hub id or single file); no --lora is in a run folder whose train_config.json names one")
    first, base = recorded[0]
    for other, other_base in recorded[1:]:
        if other_base != base:
            raise UsageError(f"--lora {first.path} and --lora {other.path} were trained on different base models "
                             f"({base} and {other_base}); compare LoRAs of one base model, or pass "
                             "--pretrained_model_name_or_path to render them all on one")
    return first.path


def base_name(settings: dict) -> str:
    """A run's base model as its train_config.json records it."""
    return settings.get("pretrained_model_name_or_path") or f"the demo model ({settings.get('demo_model', 'sd15')})"


def load_base(args, plan: Plan, device):
    """(components on ``device``, their pipeline, the base model's name); every LoRA is loaded once and
    unloaded again, so that one which does not fit stops here, before any image is rendered."""
    run = base_run(args, plan.loras)
    lora = run if run is not None else Path(".")  # with the flag, no run's record is read
    source = base_model(args, lora)
    components = load_base_components(args, lora, source)
    for model in (components.unet, components.vae, *components.text_encoders):
        model.to(device).eval()
    pipe = components.pipeline()
    for lora_source_ in plan.loras:
        load_pipeline_lora(pipe, find_lora_file(lora_source_.path), ADAPTER)
        pipe.unload_lora_weights()
    return components, pipe, source or "the embedded demo model"


def sized_prompts(args, plan: Plan, components) -> list[SamplePrompt]:
    """The prompts with the defaults filled (--resolution, else the model's size; --sample_sampler), each
    checked as training checks its sample prompts."""
    width, height = requested_size(args.resolution)
    side = components.default_image_side
    prompts = [dataclasses.replace(prompt.with_defaults((width or side, height or side), args.sample_sampler),
                                   num_images=1) for prompt in plan.prompts]
    for prompt in prompts:
        check_sample_prompt(prompt)
    return prompts


# ---- rendering and scoring -------------------------------------------------------------------------

def image_row(source: Source, path: Path, prompt_index: int | None = None, seed: int | None = None) -> dict:
    return {"source": source.name, "file": path.name, "prompt_index": prompt_index, "seed": seed,
            "step": source.step, "path": str(path)}


def scored(row: dict, image, scorer) -> dict:
    """``row`` with the scorer's metric columns and its faces' boxes (for the grids)."""
    values, faces = scorer(image)
    return {**row, **values, "boxes": [tuple(face.box) for face in faces]}


def score_folder(source: Source, scorer, bar) -> list[dict]:
    """Every image of an --images source, scored; an unreadable one is named and skipped."""
    rows = []
    files = image_files(source.path)
    for path in files:
        bar.set_description(f"scoring {source.name}")
        image = read_image(path)
        if isinstance(image, str):
            bar.write(f"warning: {image}", file=sys.stderr)
        else:
            rows.append(scored(image_row(source, path), image, scorer))
        bar.update()
    if not rows:
        raise UsageError(f"--images {source.path}: none of its {len(files)} images can be read; pass a folder of "
                         "PNG/JPEG/WebP images")
    return rows


def render_source(source: Source, rendering, scorer, bar) -> list[dict]:
    """Every prompt with every seed for one --lora source into images/<source>/, each image scored."""
    if source.kind == "lora":
        load_pipeline_lora(rendering.pipe, find_lora_file(source.path), ADAPTER)
        rendering.pipe.set_adapters([ADAPTER], adapter_weights=[rendering.lora_scale])
    try:
        rows = []
        for index, prompt in enumerate(rendering.prompts):
            for seed in rendering.seeds:
                bar.set_description(f"rendering {source.name}")
                image = rendering.image(prompt, seed)
                path = rendering.save(image, source, image_name(index, seed))
                rows.append(scored(image_row(source, path, index, seed), image, scorer))
                bar.update()
        return rows
    finally:
        if source.kind == "lora":
            rendering.pipe.unload_lora_weights()  # the base alone again, exactly: peft removes its layers


@dataclass
class Rendering:
    """The loaded base model and how each image is drawn."""

    components: object
    pipe: object
    prompts: list[SamplePrompt]
    seeds: list[int]
    folder: Path
    dtype: object
    attention_backend: str
    lora_scale: float

    def image(self, prompt: SamplePrompt, seed: int):
        """One image, as training's sample prompts draw it (outputs/samples.py), from a private CPU
        generator seeded with ``seed``: the same noise for every source."""
        generator = torch.Generator().manual_seed(seed)
        return generate_images(self.components, self.components.unet, prompt, generator, self.dtype,
                               self.attention_backend)[0]

    def save(self, image, source: Source, name: str) -> Path:
        return save_png(image, self.folder / source.name / name)  # temp file + rename: never half a PNG


def start_rendering(args, plan: Plan) -> Rendering:
    device = pick_device(args.device)
    components, pipe, base = load_base(args, plan, device)
    prompts = sized_prompts(args, plan, components)
    print(f"base model: {base}", file=sys.stderr)
    return Rendering(components, pipe, prompts, plan.seeds, plan.output_dir / IMAGES_FOLDER,
                     DTYPES[args.mixed_precision], args.attention_backend, args.lora_scale)


def face_scorer(reference_images: str | None):
    """evaluate.metrics.FaceScorer: stops with one line naming the pip extra when OpenCV or the models are missing."""
    from .evaluate.metrics import FaceScorer

    return FaceScorer(reference_images)


def unpaired(rows: list[dict]) -> list[str]:
    """Warnings for sources that share no file name with the first: nothing of theirs pairs."""
    files: dict[str, set] = {}
    for row in rows:
        files.setdefault(row["source"], set()).add(row["file"])
    (first, first_files), *others = files.items()
    return [f"warning: {name} has no image named as one of {first}'s: nothing pairs (images pair by file name)"
            for name, names in others if not names & first_files]


def compare(args, scorer: Callable | None = None) -> Results:
    """The whole command after parsing; ``scorer`` (image -> (metric values, faces)) defaults to the face
    metrics with --reference_images."""
    plan = make_plan(args)
    scorer = scorer or face_scorer(args.reference_images)
    rendering = start_rendering(args, plan) if plan.generates else None
    generated = len(plan.prompts) * len(plan.seeds)
    total = sum(generated if source.generated else len(image_files(source.path)) for source in plan.sources)
    rows = []
    with tqdm(total=total, unit="image", file=sys.stderr) as bar:
        for source in plan.sources:
            if source.generated:
                rows += render_source(source, rendering, scorer, bar)
            else:
                rows += score_folder(source, scorer, bar)
    for warning in unpaired(rows):
        print(warning, file=sys.stderr)
    runs = {source.name: source.run for source in plan.sources}
    return write_results(plan.output_dir, rows, grid_pages(rows, len(plan.prompts), plan.seeds), runs)


def main(argv: list[str] | None = None, scorer: Callable | None = None) -> Results:
    args = build_parser().parse_args(argv)
    try:
        results = compare(args, scorer)
    except UsageError as err:
        print(f"sat_train.compare: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(results.verdict)
    if results.warning:
        print(results.warning, file=sys.stderr)
    if not results.faces_found:
        print(f"note: {NO_FACE_NOTE}", file=sys.stderr)
    print(f"wrote {Path(args.output_dir) / 'report.html'} (and metrics.csv, summary.csv, the grids)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
