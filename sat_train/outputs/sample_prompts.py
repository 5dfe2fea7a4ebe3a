"""--sample_prompts FILE: the prompts sampled during training, in kohya-ss/sd-scripts' text syntax.

One prompt a line: the prompt text, then options, each `` --x value`` (kohya splits the line on
" --", so a prompt cannot itself contain " --": there is no quoting)::

    # comment lines (first non-blank character "#") and blank lines are skipped
    a portrait photo of a woman, face, eyes --n blurry, lowres --w 512 --h 512 --s 30 --d 42 --l 7.5
    a photo of a man, half-body --sag 0.75 --d 1

| option | meaning | default |
|---|---|---|
| ``--n TEXT`` | negative prompt | none |
| ``--w N`` / ``--h N`` | width / height in pixels, multiples of 8 | --resolution |
| ``--s N`` | sampling steps, 1..1000 | 30 |
| ``--d N`` | seed of the image (the same image for that line at every sampling) | from (--seed, line index) |
| ``--l X`` | classifier-free guidance scale | 7.5 |
| ``--ss NAME`` | sampler of this line | --sample_sampler |
| ``--sag X`` | self-attention guidance scale (sat's own; sat_train/guide/sag.py, DDIM only) | 0 (off) |

Option letters are case-insensitive, as in kohya. Unlike kohya (which logs and ignores what it
cannot read), a malformed line is an error naming ``file:line``. kohya's ``.toml``/``.json``
prompt files are not read: only this text form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..guide.settings import VAE_SCALE_FACTOR

# kohya-ss/sd-scripts' --sample_sampler names (samples.SCHEDULER_CLASSES maps them to diffusers' schedulers)
SAMPLE_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                   "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")

SAG_SAMPLER = "ddim"  # sag.sag_sample steps a DDIM scheduler
DEFAULT_STEPS = 30  # kohya's defaults for a line without --s / --l
DEFAULT_CFG_SCALE = 7.5
MAX_STEPS = 1000  # kohya clamps --s to 1..1000
SAG_BLUR_RADIUS = 4  # SAG blurs with a 9-wide kernel, reflect-padded by 4: latents must be wider than that
SAG_MIN_SIZE = (SAG_BLUR_RADIUS + 1) * VAE_SCALE_FACTOR  # the smallest image side SAG can sample, in pixels
PNDM_MIN_STEPS = 4  # diffusers' PNDMScheduler takes its 4 Runge-Kutta warm-up timesteps from the schedule
COMMENT = "#"
# kohya options for other model families (flux, sd3, controlnet): named in the error rather than "unknown"
OTHER_MODELS_OPTIONS = ("g", "cn", "ctr", "rcfg", "fs")


@dataclass(frozen=True)
class SamplePrompt:
    """One image request. ``None`` means "the run's default" (``with_defaults`` fills them);
    ``source`` is ``file:line`` for a prompt-file line (for messages), else a flag name."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_STEPS
    seed: int | None = None
    cfg_scale: float = DEFAULT_CFG_SCALE
    sampler: str | None = None
    sag_scale: float = 0.0
    num_images: int = 1  # a prompt-file line makes one; --validation_prompt makes --num_validation_images
    source: str = ""

    def with_defaults(self, resolution: int | tuple[int, int], sampler: str) -> "SamplePrompt":
        """``resolution``: the run's --resolution, an int (square) or (width, height)."""
        width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
        return dataclasses.replace(self, width=self.width or width, height=self.height or height,
                                   sampler=self.sampler or sampler)


def parse_prompt_file(path: str | Path, flag: str = "--sample_prompts") -> list[SamplePrompt]:
    """The prompts of ``path`` (module docstring's syntax); a UsageError naming ``path:line`` for a
    malformed line, and (naming ``flag``) for a missing, unreadable, empty or kohya .toml/.json file."""
    path = Path(path)
    if path.suffix.lower() in (".toml", ".json"):
        raise UsageError(f"{flag} {path}: only kohya's text form is read (one prompt a line, options "
                         f"--n --w --h --s --d --l --ss --sag), not {path.suffix}; write the prompts as a .txt file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path}: cannot be read as UTF-8 text ({type(err).__name__}); give a "
                         "text file with one prompt a line") from None
    prompts = [parse_prompt_line(line, f"{path}:{number}") for number, line in enumerate(lines, start=1)
               if line.strip() and not line.strip().startswith(COMMENT)]
    if not prompts:
        raise UsageError(f"{flag} {path} has no prompt lines (only blank lines and # comments); "
                         "add one prompt a line")
    return prompts


def parse_prompt_line(line: str, source: str) -> SamplePrompt:
    """One prompt line; ``source`` (``file:line``) starts every error message."""
    text, *options = line.strip().split(" --")
    text = text.strip()
    if not text or text.startswith("--"):
        raise UsageError(f"{source}: no prompt text before the options; a line is the prompt, then --x value "
                         "options")
    fields: dict = {}
    for option in options:
        name, value = split_option(option, source)
        if name in fields:
            raise UsageError(f"{source}: --{name} is given twice; keep one")
        fields[name] = value
    return SamplePrompt(prompt=text, source=source, **{OPTION_FIELDS[name]: value for name, value in fields.items()})


def split_option(option: str, source: str) -> tuple[str, object]:
    """``"w 512"`` -> ("w", 512): the option letter(s), lowercased as kohya matches them, and the value
    read by that option's reader."""
    name, _, value = option.strip().partition(" ")
    name, value = name.lower(), value.strip()
    if name not in OPTION_READERS:
        hint = " (a kohya option for other model families)" if name in OTHER_MODELS_OPTIONS else ""
        raise UsageError(f"{source}: unknown option --{name}{hint}; the options are "
                         f"{', '.join('--' + n for n in OPTION_READERS)}")
    if not value:
        raise UsageError(f"{source}: --{name} has no value; write it as --{name} VALUE")
    return name, OPTION_READERS[name](value, f"{source}: --{name}")


def _integer(value: str, where: str, low: int = 0, high: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{where} needs an integer, got {value!r}") from None
    if number < low or (high is not None and number > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise UsageError(f"{where} must be {bounds}, got {number}")
    return number


def read_size(value: str, where: str) -> int:
    """A --w/--h (or any pixel size) value: an int >= 8, a multiple of the VAE's downscale."""
    size = _integer(value, where, low=VAE_SCALE_FACTOR)
    if size % VAE_SCALE_FACTOR:
        raise UsageError(f"{where} must be a multiple of {VAE_SCALE_FACTOR} (the VAE's downscale), got {size}; "
                         f"use {size - size % VAE_SCALE_FACTOR} or {size - size % VAE_SCALE_FACTOR + VAE_SCALE_FACTOR}")
    return size


def _scale(value: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{where} needs a number, got {value!r}") from None
    if not 0.0 <= number < float("inf"):  # also rejects nan
        raise UsageError(f"{where} must be a finite number >= 0, got {value}")
    return number


def _sampler(value: str, where: str) -> str:
    if value not in SAMPLE_SAMPLERS:
        raise UsageError(f"{where} {value!r} is not a sampler; choose one of {', '.join(SAMPLE_SAMPLERS)}")
    return value


OPTION_READERS = {
    "n": lambda value, where: value,
    "w": read_size,
    "h": read_size,
    "s": lambda value, where: _integer(value, where, low=1, high=MAX_STEPS),
    "d": _integer,
    "l": _scale,
    "ss": _sampler,
    "sag": _scale,
}
OPTION_FIELDS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "steps", "d": "seed", "l": "cfg_scale",
                 "ss": "sampler", "sag": "sag_scale"}


def check_sample_prompt(prompt: SamplePrompt) -> None:
    """What needs the run's defaults filled in (``with_defaults``): PNDM's fewest steps, SAG's sampler and
    its smallest size."""
    if prompt.sampler == "pndm" and prompt.steps < PNDM_MIN_STEPS:
        raise UsageError(f"{prompt.source}: the pndm sampler needs --s >= {PNDM_MIN_STEPS} (diffusers' PNDM "
                         f"starts with {PNDM_MIN_STEPS} Runge-Kutta steps), got {prompt.steps}; raise --s or pick "
                         "another sampler")
    if prompt.sag_scale <= 0:
        return
    if prompt.sampler != SAG_SAMPLER:
        raise UsageError(f"{prompt.source}: --sag samples with its own DDIM sampler, not {prompt.sampler} "
                         f"(--ss or --sample_sampler); use --ss {SAG_SAMPLER} on that line, or drop --sag")
    if min(prompt.width, prompt.height) < SAG_MIN_SIZE:
        raise UsageError(f"{prompt.source}: --sag needs images of at least {SAG_MIN_SIZE} px a side (its blur is 9 "
                         f"latents wide), got {prompt.width}x{prompt.height}; set --w/--h >= {SAG_MIN_SIZE}")


def check_sample_flags(config) -> None:
    """--sample_*: the prompt file parsed and each line checked, before models load."""
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(config, name)}")
    when = config.sample_every_n_steps or config.sample_every_n_epochs or config.sample_at_first
    if config.sample_prompts is None:
        if when:
            raise UsageError("--sample_every_n_steps / --sample_every_n_epochs / --sample_at_first sample the "
                             "prompts of --sample_prompts FILE: give that file too")
        return
    if not when:
        raise UsageError(f"--sample_prompts {config.sample_prompts} is never sampled: add --sample_every_n_steps N, "
                         "--sample_every_n_epochs N or --sample_at_first")
    for prompt in config.sample_prompt_list:
        check_sample_prompt(prompt)
