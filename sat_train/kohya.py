"""SAT in kohya-ss/sd-scripts without editing their files:

    python -m sat_train.kohya PATH/TO/train_network.py [their flags] --sat_guide sac [--sat_ratio 0.01 ...]

sd-scripts' own way to change a step is subclassing: ``train_network.NetworkTrainer`` (and
``sdxl_train_network.SdxlNetworkTrainer``) noise the latents in ``get_noise_pred_and_target`` and call
the UNet through ``call_unet``. This imports their script from its folder, subclasses its trainer
(``guided_trainer``), adds the ``--sat_*`` flags to their parser and runs what their ``__main__`` runs.

The subclass keeps their step whole (noise, timesteps, target, loss, weighting, masks, differential
output preservation) and changes one thing: a training step's UNet call becomes SAT's guided
prediction (``sat_train.guide.dropin.guided_prediction``), both of whose forwards go through their
own ``call_unet``, so their SDXL conditioning, attention choice and LoRA network stay as they are.
Validation steps and their preservation prior stay plain (one forward): their validation loss then
measures the same prediction with and without SAT. ``--sat_guide none`` runs their trainer class
itself. The settings go into their LoRA's metadata as ``sat_*`` keys, as sat's own kohya file has.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from .errors import UsageError
from .guide.dropin import bare_model, caption_token_positions, guided_prediction, install_sat_capture
from .guide.settings import DEFAULT_CAC_WORDS, GUIDES, GuideSettings, parse_threshold
from .outputs.kohya_metadata import sat_metadata

USAGE = ("usage: python -m sat_train.kohya PATH/TO/train_network.py [their flags] --sat_guide sac "
         "[--sat_ratio R --sat_threshold T --sat_kernel_size K --sat_sigma S --sat_cac_words W]")
SUPPORTED = "kohya-ss/sd-scripts v0.10.0 or later (read at 48d368f)"
# what the subclass overrides, with the parameters it passes on by name
STEP_PARAMETERS = ("args", "accelerator", "noise_scheduler", "latents", "batch", "text_encoder_conds", "unet",
                   "network", "weight_dtype", "train_unet", "is_train")
NEEDED_METHODS = ("train", "get_noise_pred_and_target", "call_unet", "update_metadata")
# kohya's SDXL UNet (library/sdxl_original_unet.py) names its blocks as SGM does; its mid block's first
# transformer block's attn1 is the layer sat captures on diffusers' SDXL UNet
SGM_SAC_LAYER = "middle_block.1.transformer_blocks.0.attn1"


def _odd_positive(text: str) -> int:
    value = int(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be an odd positive int, got {value}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


SAT_FLAGS = (
    ("--sat_guide", dict(default="none", choices=GUIDES, help="SAT guidance of each training step: none (your "
                         "plain run, their trainer untouched), sac (self-attention control) or cac (cross-attention "
                         "control on --sat_cac_words; train_network.py only)")),
    ("--sat_ratio", dict(type=float, default=GuideSettings.ratio, help="r in pred + r * (pred - pred_deg)")),
    ("--sat_threshold", dict(type=parse_threshold, default=GuideSettings.threshold,
                             help='SAC: blur latents whose attention mass exceeds this (or "mean")')),
    ("--sat_kernel_size", dict(type=_odd_positive, default=GuideSettings.kernel_size,
                               help="Gaussian blur kernel size (odd)")),
    ("--sat_sigma", dict(type=_positive, default=GuideSettings.sigma, help="Gaussian blur sigma")),
    ("--sat_cac_words", dict(default=DEFAULT_CAC_WORDS, help="--sat_guide cac: comma-separated caption words whose "
                             "cross-attention marks the region to blur")),
)


# ----------------------------------------------------------------------------- their script


def split_script(argv: list[str]) -> tuple[Path, list[str]]:
    """(their script, their flags and ours) from the command line."""
    if not argv or argv[0].startswith("-"):
        raise UsageError(f"name sd-scripts' training script first: {USAGE}")
    script = Path(argv[0]).expanduser()
    if script.suffix != ".py" or not script.is_file():
        raise UsageError(f"{argv[0]} is not a Python file: give the path of sd-scripts' train_network.py "
                         "(or sdxl_train_network.py)")
    return script.resolve(), argv[1:]


def load_script(script: Path) -> ModuleType:
    """Their script imported by its file name from its folder (its ``library`` package and, for
    sdxl_train_network.py, ``import train_network`` resolve there), its ``__main__`` block not run."""
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[script.stem] = module
    spec.loader.exec_module(module)
    for name in ("setup_parser", "train_util"):
        if not hasattr(module, name):
            raise UsageError(f"{script} has no {name}: sat_train.kohya runs {SUPPORTED}'s train_network.py or "
                             "sdxl_train_network.py")
    return module


def trainer_class(module: ModuleType, script: Path) -> type:
    """The most derived trainer class their script defines, checked for what the subclass overrides."""
    trainers = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__
                and hasattr(c, "get_noise_pred_and_target") and hasattr(c, "train")]
    if not trainers:
        raise UsageError(f"{script} defines no trainer class with get_noise_pred_and_target(): sat_train.kohya "
                         f"needs {SUPPORTED}; update sd-scripts")
    base = next(c for c in trainers if not any(o is not c and issubclass(o, c) for o in trainers))
    for name in NEEDED_METHODS:
        if not callable(getattr(base, name, None)):
            raise UsageError(f"{script}: {base.__name__} has no {name}(): sat_train.kohya needs {SUPPORTED}; "
                             "update sd-scripts")
    parameters = tuple(inspect.signature(base.get_noise_pred_and_target).parameters)[1:]
    if parameters != STEP_PARAMETERS:
        raise UsageError(f"{script}: {base.__name__}.get_noise_pred_and_target takes ({', '.join(parameters)}), "
                         f"not ({', '.join(STEP_PARAMETERS)}): sat_train.kohya needs {SUPPORTED}")
    return base


def add_sat_flags(parser: argparse.ArgumentParser) -> None:
    """The --sat_* flags in their own group; a flag their parser already has is refused."""
    group = parser.add_argument_group("SAT (sat_train.kohya)")
    for flag, options in SAT_FLAGS:
        try:
            group.add_argument(flag, **options)
        except argparse.ArgumentError:
            raise UsageError(f"their parser already defines {flag}: sat_train.kohya cannot add its own; "
                             "rename theirs or run their script directly") from None


def sat_settings(args) -> SimpleNamespace:
    """The run's SAT settings as sat_train's kohya metadata reads them (guide, guide_settings, cac_words)."""
    settings = GuideSettings(ratio=args.sat_ratio, threshold=args.sat_threshold, kernel_size=args.sat_kernel_size,
                             sigma=args.sat_sigma)
    return SimpleNamespace(guide=args.sat_guide, guide_settings=settings, cac_words=args.sat_cac_words)


def check_cac(args, trainer) -> None:
    """CAC places the words in one 77-token caption of a UNet with diffusers' block names."""
    if args.sat_guide != "cac":
        return
    if not [w for w in args.sat_cac_words.split(",") if w.strip()]:
        raise UsageError("--sat_cac_words is empty: give comma-separated words, e.g. face,eyes,hair")
    if getattr(trainer, "is_sdxl", False):
        raise UsageError("--sat_guide cac needs train_network.py's SD 1.x UNet (diffusers' block names); with "
                         "sdxl_train_network.py use --sat_guide sac")
    if args.max_token_length or args.weighted_captions:
        raise UsageError("--sat_guide cac places the words in 77-token captions: leave out --max_token_length "
                         "and --weighted_captions, or use --sat_guide sac")


# ----------------------------------------------------------------------------- the subclass


def guided_trainer(base: type) -> type:
    """``base`` (their trainer class) with each training step's UNet call guided by SAT."""

    class SATGuided(base):
        sat = None  # sat_settings(args), set by train()
        sat_handle = None  # the capture, hooked on the bare UNet at the first guided step
        sat_step = None  # (latents, noise_scheduler) of the training step in progress

        def train(self, args):
            self.sat = sat_settings(args)
            return super().train(args)

        def get_tokenizers(self, *given):  # CAC: the first tokenizer places the caption words
            self.sat_tokenizers = super().get_tokenizers(*given)
            return self.sat_tokenizers

        def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds,
                                      unet, network, weight_dtype, train_unet, is_train=True):
            self.sat_step = (latents, noise_scheduler) if is_train else None
            try:
                return super().get_noise_pred_and_target(args, accelerator, noise_scheduler, latents, batch,
                                                         text_encoder_conds, unet, network, weight_dtype,
                                                         train_unet, is_train=is_train)
            finally:
                self.sat_step = None

        def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype,
                      **kwargs):
            their_call = super().call_unet

            def forward(latents):
                return their_call(args, accelerator, unet, latents, timesteps, text_conds, batch, weight_dtype,
                                  **kwargs)

            if self.sat_step is None or kwargs.get("indices") is not None:  # validation, their DOP prior
                return forward(noisy_latents)
            latents, noise_scheduler = self.sat_step
            self.sat_step = None  # one guided call a step
            pred, _ = guided_prediction(
                unet, noisy_latents, latents, timesteps, None, noise_scheduler, self.sat_capture(unet),
                tokens=self.sat_tokens(batch), forward=forward,
                prediction_type="v_prediction" if args.v_parameterization else "epsilon")
            return pred

        def sat_capture(self, unet):
            if self.sat_handle is None:
                bare = bare_model(unet)
                layer = None if hasattr(bare, "mid_block") else SGM_SAC_LAYER
                self.sat_handle = install_sat_capture(bare, guide=self.sat.guide, settings=self.sat.guide_settings,
                                                      self_attention=layer)
            return self.sat_handle

        def sat_tokens(self, batch):
            if self.sat.guide != "cac":
                return None
            return caption_token_positions(self.sat_tokenizers[0], list(batch["captions"]), self.sat.cac_words)

        def update_metadata(self, metadata, args):
            super().update_metadata(metadata, args)
            metadata.update(sat_metadata(self.sat))

    SATGuided.__name__ = SATGuided.__qualname__ = f"SATGuided{base.__name__}"
    return SATGuided


# ----------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        about = __doc__.split("\n\n", 2)[2]  # the paragraphs after the command line
        print(f"{USAGE}\n\n{about}\nTheir flags and the --sat_* flags: python -m sat_train.kohya "
              "PATH/TO/train_network.py --help")
        return
    try:
        script, rest = split_script(argv)
        module = load_script(script)
        base = trainer_class(module, script)
        parser = module.setup_parser()
        add_sat_flags(parser)
        args = parser.parse_args(rest)
        module.train_util.verify_command_line_training_args(args)
        args = module.train_util.read_config_from_file(args, parser)
        trainer = base() if args.sat_guide == "none" else guided_trainer(base)()
        check_cac(args, trainer)  # before their models load
        trainer.train(args)
    except UsageError as err:
        print(f"sat_train.kohya: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
