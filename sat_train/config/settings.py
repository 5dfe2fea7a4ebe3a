"""TrainConfig: every setting of a sat_train run and its default, in one place.

Names and defaults follow diffusers' examples/text_to_image/train_text_to_image_lora.py so an
existing command line keeps working; the ``guide*``, ``cac_words`` and ``attention_backend``
settings are SAT's. ``config.flags`` builds the flags from the field metadata here; the checks of
the settings live with the features they guard, called in order by ``config.checks``
(``TrainConfig.validate``). The settings of the SAT step itself travel as one ``GuideSettings``
(``TrainConfig.guide_settings``), the object that ``guide.guidance.build_guide`` and the drop-in API
take whole. Imports no torch: ``--help`` stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..guide.settings import (ATTENTION_BACKENDS, DEFAULT_CAC_WORDS, DEFAULT_SAC_LAYER, GUIDE_CAPTURES, GUIDES,
                              HUBER_SCHEDULES, LOSS_TYPES, GuideSettings, LossSettings, parse_threshold)
from ..outputs.kohya_metadata import SAVE_PRECISIONS
from ..outputs.lora_files import EXPORT_FORMATS
from ..outputs.sample_prompts import SAMPLE_SAMPLERS
from ..run.optimizers import LR_SCHEDULERS, OPTIMIZERS

MIXED_PRECISIONS = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEMO_MODELS = ("sd15", "sdxl")  # --demo_model: the embedded tiny SD v1.5 or SDXL (demo.py)
# diffusers' train_text_to_image_lora.py offers torchvision's InterpolationMode names, lowercased
INTERPOLATION_MODES = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact")


def _opt(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def _resolution(value: str) -> int | str:
    """--resolution: an int stays an int (every square use of config.resolution keeps working);
    anything else stays text, parsed (and refused with a UsageError) by TrainConfig.resolution_wh."""
    return int(value) if value.strip().isdigit() else value.strip()


@dataclass
class TrainConfig:
    # --- model
    pretrained_model_name_or_path: str | None = _opt(
        None, "SD v1.5 or SDXL folder or hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, "
        "stabilityai/stable-diffusion-xl-base-1.0; SDXL is recognised by its folder), or an SD v1.5 single-file "
        "checkpoint (a community .safetensors in the original LDM layout; single-file SDXL is refused: pass its "
        "diffusers folder). Left out (with no data flags): the embedded offline demo model (--demo_model).")
    demo_model: str = _opt(
        "sd15", "The embedded demo's tiny model (no --pretrained_model_name_or_path and no data): SD v1.5- or "
        "SDXL-shaped.", choices=DEMO_MODELS, aliases=("--demo",))
    revision: str | None = _opt(None, "Model revision on the hub.")
    variant: str | None = _opt(None, "Weight variant, e.g. fp16.")
    cache_dir: str | None = _opt(None, "Where downloaded models and datasets are cached.")
    # --- single-file checkpoints and --vae (models/single_file.py)
    original_config: str | None = _opt(
        None, "Single-file model: the LDM .yaml (e.g. v1-inference.yaml) its UNet and VAE architecture is read "
        "from (default: the bundled SD v1.5 configs).")
    single_file_config: str | None = _opt(
        None, "Single-file model: a diffusers folder whose unet/, vae/, text_encoder/, scheduler/ (and tokenizer/) "
        "configs describe it, instead of the bundled SD v1.5 ones (diffusers' from_single_file config=).")
    tokenizer_name: str | None = _opt(
        None, "CLIP tokenizer folder (or a model folder with tokenizer/) to use instead of the base model's; a "
        "single file's default is SD v1.5's, bundled.")
    allow_pickle_checkpoint: bool = _opt(
        False, "Allow .ckpt/.pt/.pth checkpoints (pickles, which can run code when loaded); read with "
        "torch.load(weights_only=True) where possible.")
    vae: str | None = _opt(
        None, "VAE to use instead of the base model's: a diffusers folder or a .safetensors file (SDXL under fp16: "
        "an fp16-safe one such as madebyollin/sdxl-vae-fp16-fix; the stock SDXL VAE then encodes in float32).",
        aliases=("--pretrained_vae_model_name_or_path",))
    # --- data
    dataset_config: str | None = _opt(
        None, "kohya-ss/sd-scripts' dataset config (.toml or .json): [general], [[datasets]] (resolution, batch_size, "
        "bucket keys) and [[datasets.subsets]] (image_dir, num_repeats, is_reg, class_tokens, caption_extension, "
        "shuffle_caption, keep_tokens, caption_dropout_rate, caption_tag_dropout_rate, flip_aug, random_crop, "
        "alpha_mask, conditioning_data_dir). Its values win over the flags and --train_data_dir/--reg_data_dir are "
        "ignored, as in sd-scripts; keys sat does not support stop the run.")
    dataset_name: str | None = _opt(None, "Hugging Face dataset name or path (needs `pip install datasets`).")
    dataset_config_name: str | None = _opt(None, "Config of --dataset_name.")
    train_data_dir: str | None = _opt(
        None, "Image folder with metadata.jsonl lines {\"file_name\": ..., \"text\": ...}, or (without "
        "metadata.jsonl) kohya-style N_name/ subfolders: images seen N times an epoch, each with a same-stem "
        "caption file (--caption_extension).")
    caption_extension: str = _opt(
        ".caption", "Kohya-style folders: suffix of each image's caption file (img001.jpg -> img001.caption); "
        "\"txt\" is read as \".txt\".")
    image_column: str = _opt("image", "Image column (imagefolder: the file_name key of metadata.jsonl).")
    caption_column: str = _opt("text", "Caption column.")
    max_train_samples: int | None = _opt(None, "Use only the first N samples (debugging).", type=int)
    resolution: int | str = _opt(
        512, "Training resolution: one int (square), or W,H (kohya's form, e.g. 512,768); with --enable_bucket "
        "the buckets hold about W*H pixels.", type=_resolution)
    center_crop: bool = _opt(False, "Center crop instead of random crop.")
    random_flip: bool = _opt(False, "Random horizontal flip.")
    image_interpolation_mode: str = _opt("lanczos", "Filter of every image resize.", choices=INTERPOLATION_MODES)
    shuffle_caption: bool = _opt(False, "Shuffle a caption's comma-separated tags, anew each epoch.")
    keep_tokens: int = _opt(
        0, "With --shuffle_caption / --caption_tag_dropout_rate: the first N tags stay in front, never dropped.",
        type=int)
    caption_dropout_rate: float = _opt(0.0, "Probability that a sample trains with an empty caption.", type=float)
    caption_tag_dropout_rate: float = _opt(
        0.0, "Probability that each tag (after the --keep_tokens ones) is left out of the caption.", type=float)
    dataloader_num_workers: int = _opt(0, "Data loading worker processes.", type=int)
    strict_data: bool = _opt(False, "Stop (exit 2) on any bad sample the data check finds, instead of "
                             "skipping it and counting it in the summary.")
    skip_small_images: bool = _opt(False, "Skip images smaller than --resolution (with --enable_bucket: than "
                                   "--min_bucket_reso) instead of upscaling them.")
    # --- regularization images (kohya's --reg_data_dir, diffusers' DreamBooth flags; data/regularization.py)
    reg_data_dir: str | None = _opt(
        None, "Regularization (prior-preservation) images in kohya-style N_class/ subfolders (e.g. 1_woman/), each "
        "with a same-stem caption file or else captioned by its folder's class name; repeated or cut, in order, "
        "so that they make as many samples an epoch as the training images with repeats (kohya's balancing).")
    prior_loss_weight: float = _opt(
        1.0, "Loss weight of each regularization sample (kohya's and diffusers' default 1.0).", type=float)
    prior_target: str = _opt(
        "data", "Target of a regularization sample: data (denoise the regularization image, kohya/DreamBooth) or "
        "base (the UNet's own prediction with LoRA off, no gradient: the LoRA learns to leave such images as they "
        "were).", choices=("data", "base"))
    guide_reg_samples: bool = _opt(
        False, "Apply SAT's guidance to regularization samples too; by default their prediction is unguided "
        "(guide ratio 0), since they preserve the base model rather than learn the subject.")
    with_prior_preservation: bool = _opt(
        False, "diffusers' DreamBooth prior preservation: regularization images from --class_data_dir, captioned "
        "by --class_prompt; missing ones are generated by the base model before training.")
    class_data_dir: str | None = _opt(
        None, "--with_prior_preservation: folder of class images (images only). When it holds fewer than "
        "--num_class_images, the base model generates the rest INTO THIS FOLDER (the one place sat writes outside "
        "--output_dir, as diffusers does); a rerun reuses them.")
    class_prompt: str | None = _opt(None, "--with_prior_preservation: the class images' prompt and caption.")
    num_class_images: int = _opt(
        100, "--with_prior_preservation: class images wanted in --class_data_dir (diffusers' default 100).",
        type=int)
    # --- aspect-ratio buckets (kohya-ss/sd-scripts' flags; the math is in data/buckets.py)
    enable_bucket: bool = _opt(
        False, "Aspect-ratio buckets: each image trains at the bucket (about --resolution^2 pixels, sides multiples "
        "of --bucket_reso_steps) closest to its aspect ratio, one bucket per batch. Off: square crops.")
    min_bucket_reso: int = _opt(256, "--enable_bucket: smallest bucket side (px); smaller images are upscaled "
                                "(skipped with --bucket_no_upscale).", type=int)
    max_bucket_reso: int = _opt(1024, "--enable_bucket: largest bucket side (px).", type=int)
    bucket_reso_steps: int = _opt(64, "--enable_bucket: bucket sides are multiples of this (px, a multiple of 8).",
                                  type=int)
    bucket_no_upscale: bool = _opt(
        False, "--enable_bucket: never upscale; an image of at most --resolution^2 pixels gets a bucket of its own "
        "size rounded down to --bucket_reso_steps (kohya's behaviour).")
    # --- latent cache (data/latent_cache.py; kohya-ss/sd-scripts' flag names)
    cache_latents: bool = _opt(
        False, "Encode every image with the VAE once, before training, and keep its latent distribution in memory "
        "(no image decode or VAE encode per step). Images are then center-cropped (see --random_crop); with "
        "--random_flip the flipped image is cached too.")
    cache_latents_to_disk: bool = _opt(
        False, "As --cache_latents, but in safetensors files under OUTPUT_DIR/latent_cache/, read per sample and "
        "reused by later runs into the same --output_dir (rebuilt where the image, size, VAE or filter changed).")
    random_crop: bool = _opt(
        False, "Random crops (to --resolution, or to each image's bucket): already the default without --center_crop (kohya's flag, stated explicitly); "
        "not with --cache_latents / --cache_latents_to_disk, whose cache holds one crop per image.")
    # --- loss masks (kohya-ss/sd-scripts' and OneTrainer's flags; data/masks.py, guide/masks.py, run/face_masks.py)
    masked_loss: bool = _opt(
        False, "Weight the loss by a mask per image (1 = trained, 0 = not), downsampled to the latents as kohya does; "
        "masks from --conditioning_data_dir, --alpha_mask or --face_masks.")
    conditioning_data_dir: str | None = _opt(
        None, "--masked_loss: folder of mask images, one per training image with the same stem (flat, or mirroring "
        "--train_data_dir's N_name/ subfolders); the mask is the R channel (grayscale: white = trained).")
    alpha_mask: bool = _opt(False, "Use each image's alpha channel as its loss mask (implies --masked_loss, as in kohya).")
    unmasked_weight: float = _opt(
        0.0, "--masked_loss: loss weight outside the mask, in [0, 1] (weight = mask + W x (1 - mask); 0 = kohya's, "
        "OneTrainer's default is 0.1).", type=float)
    normalize_masked_area_loss: bool = _opt(
        False, "--masked_loss: divide each sample's loss by its mean mask weight, so small masks weigh as much as "
        "large ones (OneTrainer's flag).")
    face_masks: bool = _opt(
        False, "Loss masks from the detected faces (implies --masked_loss; needs pip install 'sat[eval]'): each "
        "face box widened by --face_mask_margin, feathered, written once to OUTPUT_DIR/face_masks/ and reused; "
        "an image without a face trains unmasked (stops the run with --strict_data).")
    face_mask_margin: float = _opt(
        0.25, "--face_masks: widen each face box by this fraction of its size on every side (the feather spans "
        "the outer half of the margin).", type=float)
    guide_within_mask: bool = _opt(
        False, "sat's extension, not the paper's: SAT blurs only inside the loss mask (where it exceeds 0.5 at "
        "latent size), e.g. only the face with --face_masks.")
    # --- schedule
    train_batch_size: int = _opt(16, "Batch size per device.", type=int)
    num_train_epochs: int = _opt(100, "Epochs (ignored when --max_train_steps is given).", type=int)
    max_train_steps: int | None = _opt(None, "Total optimizer steps; overrides --num_train_epochs.", type=int)
    gradient_accumulation_steps: int = _opt(1, "Batches per optimizer step.", type=int)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    learning_rate: float = _opt(1e-4, "Learning rate (after --lr_warmup_steps).", type=float)
    scale_lr: bool = _opt(False, "Multiply the lr by accumulation steps x batch size x processes.")
    lr_scheduler: str = _opt("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(500, "Warmup steps.", type=int)
    lr_num_cycles: int = _opt(1, "--lr_scheduler cosine_with_restarts: the number of hard restarts.", type=int)
    lr_power: float = _opt(1.0, "--lr_scheduler polynomial: the power of the decay (1 = linear).", type=float)
    snr_gamma: float | None = _opt(
        None, "Min-SNR weighting gamma (5.0 is the paper's value; kohya: --min_snr_gamma); off when unset.",
        type=float, aliases=("--min_snr_gamma",))
    noise_offset: float = _opt(0.0, "Noise offset scale.", type=float)
    # --- loss and noise options (kohya-ss/sd-scripts' names and defaults; guide/loss.py, run/inputs.py)
    loss_type: str = _opt(
        LossSettings.loss_type, "Loss of each element of the (guided) prediction: l2 (mse), l1, huber or smooth_l1 "
        "(both with the threshold --huber_c, scheduled by --huber_schedule).", choices=LOSS_TYPES)
    huber_schedule: str = _opt(
        LossSettings.huber_schedule, "huber / smooth_l1: the threshold c over timesteps t: constant (huber_c x "
        "huber_scale), exponential (huber_c^(t/T) x huber_scale) or snr ((1 - huber_c) / (1 + sqrt(1/snr(t)))^2 + "
        "huber_c, without huber_scale).", choices=HUBER_SCHEDULES)
    huber_c: float = _opt(
        LossSettings.huber_c, "huber / smooth_l1: the threshold parameter of --huber_schedule.", type=float)
    huber_scale: float = _opt(
        LossSettings.huber_scale, "huber / smooth_l1: scales the constant and exponential thresholds.", type=float)
    debiased_estimation_loss: bool = _opt(
        LossSettings.debiased_estimation, "Weight each sample's loss by 1/sqrt(snr(t)) (v-prediction: "
        "1/(snr(t)+1)), snr capped at 1000; combines with --snr_gamma.")
    multires_noise_iterations: int | None = _opt(
        None, "Multi-resolution (pyramid) noise: add up to this many coarser noise layers (kohya suggests 6-10); "
        "off when unset or 0.", type=int)
    multires_noise_discount: float = _opt(
        0.3, "--multires_noise_iterations: layer i is weighted discount^i.", type=float)
    ip_noise_gamma: float | None = _opt(
        None, "Input perturbation: noise the latents with noise + gamma x fresh noise while the target keeps the "
        "noise alone (kohya suggests 0.1); off when unset.", type=float)
    prediction_type: str | None = _opt(None, "Override the scheduler's prediction type.", choices=PREDICTION_TYPES)
    # --- optimizer
    optimizer: str = _opt(
        "adamw", "adamw (torch), adamw8bit (bitsandbytes), prodigy (prodigyopt; give --learning_rate 1.0), lion "
        "(lion-pytorch) or adafactor (torch's). The --adam_* flags apply to adamw and adamw8bit; the others take "
        "--learning_rate and --optimizer_args only.", choices=OPTIMIZERS)
    optimizer_args: tuple[str, ...] = _opt(
        (), "Extra optimizer arguments as key=value items, values read as Python literals where possible, "
        "else strings (kohya's flag), e.g. --optimizer_args weight_decay=0.01 betas=(0.9,0.99).", nargs="*")
    use_8bit_adam: bool = _opt(False, "Same as --optimizer adamw8bit (8-bit AdamW from bitsandbytes).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.", type=float)
    adam_beta2: float = _opt(0.999, "AdamW beta2.", type=float)
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay.", type=float)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", type=float)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.", type=float)
    allow_tf32: bool = _opt(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    # --- LoRA
    rank: int = _opt(4, "LoRA rank (kohya: --network_dim).", type=int, aliases=("--network_dim",))
    lora_alpha: float | None = _opt(
        None, "LoRA alpha: the update B·A is scaled by alpha / rank (kohya: --network_alpha; kohya's own default "
        "is 1). Unset: the rank (scale 1).", type=float, aliases=("--network_alpha",))
    lora_dropout: float = _opt(0.0, "Dropout probability on the LoRA branch's input while training.", type=float)
    # --- text encoder LoRA (models/lora.py)
    train_text_encoder: bool = _opt(
        False, "Also train a LoRA on the CLIP text encoder's attention (q/k/v/out_proj) and MLP (fc1/fc2) "
        "projections, with the UNet's --rank, --lora_alpha and --lora_dropout; exported in the same file(s).")
    text_encoder_lr: float | None = _opt(
        None, "--train_text_encoder: the text encoder LoRA's learning rate (kohya's flag); the lr schedule and "
        "--scale_lr apply to it too. Unset: --learning_rate.", type=float)
    # --- SAT guidance
    guide: str = _opt("sac", "Training guidance: none (plain LoRA), sac (self-attention control) or cac "
                      "(cross-attention control on the --cac_words of each caption).", choices=GUIDES)
    cac_words: str = _opt(
        DEFAULT_CAC_WORDS, "--guide cac: comma-separated caption words whose cross-attention marks the region "
        "to blur; samples whose caption has none of them use the SAC mask.")
    sac_layer: str = _opt(
        DEFAULT_SAC_LAYER, "The self-attention layer whose attention mass SAC (and CAC's fallback) blurs by, as a "
        "dotted path in the UNet (indices as [0] or .0).")
    guide_ratio: float = _opt(0.01, "r in pred + r * (pred - pred_deg); the paper used 0.01, 0.1, 1.", type=float)
    guide_threshold: float | str = _opt(
        1.0, "Mask tokens whose attention mass exceeds this (or \"mean\").", type=parse_threshold)
    guide_kernel_size: int = _opt(9, "Gaussian blur kernel size (odd).", type=int)
    guide_sigma: float = _opt(1.0, "Gaussian blur sigma.", type=float)
    guide_capture: str = _opt(
        "inline", "inline: take the saliency inside the first forward (2 forwards/step); separate: the original "
        "code's extra capture forward (3/step) without LoRA (SAC: in the captured layer; CAC: in every layer).",
        choices=GUIDE_CAPTURES, aliases=("--sac_capture",))
    guide_detach_degraded: bool = _opt(
        False, "Approximation: run the degraded forward without gradients (the step costs ~1.35x a plain "
        "step instead of ~2x); the guide term r * pred_deg then only shifts the target of pred.")
    guide_recompute: bool = _opt(
        False, "Memory saver, exact: keep no activations of the first UNet forward; backward recomputes it once "
        "the degraded forward's are freed. Peak memory about a plain step's (instead of ~2x) for one more "
        "forward per step.")
    attention_backend: str = _opt(
        "auto", "auto = xformers on CUDA when installed, else PyTorch SDPA.", choices=ATTENTION_BACKENDS)
    enable_xformers_memory_efficient_attention: bool = _opt(False, "Same as --attention_backend xformers.")
    # --- torch.compile (kohya sd-scripts' flag names)
    torch_compile: bool = _opt(False, "Compile the UNet's forward with torch.compile for training (the SAT "
                               "capture compiles with it: one graph with the capture armed, one without; inductor on "
                               "CPU runs without its layout optimization, which gives wrong gradients there).")
    dynamo_backend: str = _opt("inductor", "The torch.compile backend of --torch_compile (inductor, aot_eager, "
                               "eager, cudagraphs, ...).")
    # --- runtime
    mixed_precision: str | None = _opt(
        None, "no | fp16 | bf16 (default: accelerate config, else no).", choices=MIXED_PRECISIONS)
    seed: int | None = _opt(None, "Seed for reproducible runs (needed for exact resume).", type=int)
    # --- outputs
    output_dir: str = _opt("sat-lora", "Where LoRA weights, checkpoints, logs and the config go.")
    logging_dir: str = _opt("logs", "TensorBoard folder, relative to --output_dir.")
    report_to: str = _opt("tensorboard", "tensorboard | wandb | all | none.")
    checkpointing_steps: int = _opt(500, "Save an accelerate checkpoint every N steps.", type=int)
    checkpoints_total_limit: int | None = _opt(None, "Keep at most N checkpoints.", type=int)
    resume_from_checkpoint: str | None = _opt(None, "A checkpoint folder, or \"latest\" in --output_dir.")
    validation_prompt: str | None = _opt(
        None, "Prompt sampled every --validation_epochs (and --validation_steps) into output_dir/validation/ "
        "and the logs.")
    num_validation_images: int = _opt(4, "Images per validation.", type=int)
    validation_epochs: int = _opt(1, "Validate every N epochs.", type=int)
    validation_steps: int | None = _opt(
        None, "Also validate every N optimizer steps (PNGs in output_dir/validation/).", type=int)
    mask_preview_steps: int | None = _opt(
        None, "Every N steps (and at the end) write a PNG grid to output_dir/masks/: image, its SAC/CAC mask, "
        "the blurred-degraded image (needs --guide sac or cac). Unset: off, except the demo, every 10 steps.", type=int)
    export_format: str = _opt(
        "diffusers", "LoRA file format: diffusers (pytorch_lora_weights.safetensors), kohya "
        "(pytorch_lora_weights_kohya.safetensors: lora_unet_* keys for A1111/ComfyUI), or both. kohya and both "
        "also put the kohya file in every checkpoint-N/, to try each step's LoRA in A1111/ComfyUI.",
        choices=EXPORT_FORMATS)
    # --- exported files and config files (kohya-ss/sd-scripts' flags)
    save_precision: str = _opt(
        "float", "dtype of the exported LoRA files (the final ones and the checkpoints' kohya copies): float "
        "(fp32), fp16 or bf16. The checkpoints' diffusers file, which resume reads, stays float.",
        choices=SAVE_PRECISIONS)
    training_comment: str | None = _opt(None, "Free text stored in the kohya file as ss_training_comment.")
    config_file: str | None = _opt(
        None, "JSON or TOML file of settings (keys: these flags' names without --; TOML tables are merged), e.g. "
        "a run's train_config.json to rerun it; flags on the command line override it (the command "
        "line reads it; TrainConfig(config_file=...) in Python does not).")
    # --- sample prompts during training (kohya-ss/sd-scripts' flags; outputs/sample_prompts.py)
    sample_prompts: str | None = _opt(
        None, "Text file, one prompt a line in kohya's syntax: PROMPT --n NEGATIVE --w W --h H --s STEPS --d SEED "
        "--l CFG --ss SAMPLER --sag SAG_SCALE (# comments and blank lines skipped); sampled into "
        "output_dir/samples/stepNNNNNN_II.png and the logs.")
    sample_every_n_steps: int | None = _opt(None, "Sample --sample_prompts every N optimizer steps.", type=int)
    sample_every_n_epochs: int | None = _opt(
        None, "Sample --sample_prompts every N epochs (overrides --sample_every_n_steps, as in kohya).", type=int)
    sample_at_first: bool = _opt(False, "Sample --sample_prompts before training (step 0; not again on a resume).")
    sample_sampler: str = _opt("ddim", "Sampler of the --sample_prompts lines without --ss.", choices=SAMPLE_SAMPLERS)
    # --- face metrics of the sampled images (evaluate/training_metrics.py; needs pip install 'sat[eval]')
    sample_metrics: bool = _opt(
        False, "Score every --sample_prompts and --validation_prompt image with the face metrics (faces, face "
        "score, face and eye sharpness, eye balance; identity with --reference_images): one row per image in "
        "output_dir/samples/metrics.csv, the step's means to TensorBoard as face/<samples|validation>/<metric>.")
    reference_images: str | None = _opt(
        None, "--sample_metrics: a folder of photos of the person the LoRA learns (e.g. the training images); adds "
        "the identity column, 1 - dlib's face-embedding distance to them (needs pip install 'sat[eval,identity]').")
    debug: bool = _opt(False, "Show full tracebacks instead of one-line errors.")

    def __post_init__(self) -> None:
        if self.dataset_config is not None:  # its values win over the flags, as in sd-scripts
            from .dataset_config import dataset_config_settings

            for name, value in dataset_config_settings(self.dataset_config).items():
                setattr(self, name, value)

    @property
    def is_demo(self) -> bool:
        """No model and no data given: train the embedded tiny model on the bundled photos."""
        return (self.pretrained_model_name_or_path is None and self.train_data_dir is None and self.dataset_name is None
                and self.dataset_config is None)

    @functools.cached_property
    def dataset_subsets(self) -> list | None:
        """--dataset_config's subsets (data.subsets.Subset) in the file's order, read once; None without the
        flag."""
        if self.dataset_config is None:
            return None
        from .dataset_config import read_dataset_config

        return [table.subset(self) for table in read_dataset_config(self.dataset_config).subsets]

    def validate(self) -> "TrainConfig":
        """Checks that need no model or data (config.checks, in order); raises UsageError naming the flag."""
        from .checks import check_config

        check_config(self)
        return self

    @property
    def caches_latents(self) -> bool:
        """--cache_latents or --cache_latents_to_disk (which implies it, as in kohya's scripts)."""
        return self.cache_latents or self.cache_latents_to_disk

    @property
    def sample_prompt_list(self) -> list:
        """--sample_prompts' prompts with the run's defaults (--resolution, --sample_sampler) filled in."""
        from ..outputs.sample_prompts import parse_prompt_file

        if self.sample_prompts is None:
            return []
        prompts = parse_prompt_file(self.sample_prompts)
        return [p.with_defaults(self.resolution_wh, self.sample_sampler) for p in prompts]

    @property
    def optimizer_name(self) -> str:
        """--optimizer, with --use_8bit_adam (the older flag) folded in."""
        if self.use_8bit_adam:
            if self.optimizer not in ("adamw", "adamw8bit"):
                raise UsageError(f"--use_8bit_adam means --optimizer adamw8bit, which conflicts with --optimizer "
                                 f"{self.optimizer}: drop one of them")
            return "adamw8bit"
        return self.optimizer

    @property
    def resolved_lora_alpha(self) -> float:
        """--lora_alpha, or the rank when it is unset (scale alpha / rank = 1, as before the flag existed)."""
        return float(self.rank) if self.lora_alpha is None else float(self.lora_alpha)

    @property
    def caption_suffix(self) -> str:
        """--caption_extension with its leading dot ("txt" -> ".txt", as the user surely meant)."""
        ext = self.caption_extension.strip()
        return ext if ext.startswith(".") or not ext else "." + ext

    @property
    def resolution_wh(self) -> tuple[int, int]:
        """--resolution as (width, height): an int R is (R, R); "W,H" (kohya's form) is (W, H)."""
        value = self.resolution
        if isinstance(value, (tuple, list)):  # e.g. read back from train_config.json
            value = ",".join(str(v) for v in value)
        parts = str(value).split(",")
        if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            sides = [int(p) for p in parts]
            return (sides[0], sides[-1])
        raise UsageError(f"--resolution {value!r} is not a size: give one int >= 1 (square, e.g. 512) or "
                         "width,height (e.g. 512,768)")

    @property
    def bucket_resolutions(self) -> list[tuple[int, int]]:
        """--enable_bucket's bucket table, (width, height) sorted (buckets.make_buckets)."""
        from ..data.buckets import make_buckets

        return make_buckets(self.resolution_wh, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)

    @property
    def small_image_size(self) -> tuple[tuple[int, int], str]:
        """(width, height) below which the data check calls an image small, and the flag that sets it:
        --min_bucket_reso (square) with --enable_bucket, else --resolution."""
        if self.enable_bucket:
            return (self.min_bucket_reso, self.min_bucket_reso), f"--min_bucket_reso {self.min_bucket_reso}"
        return self.resolution_wh, f"--resolution {self.resolution}"

    @property
    def guide_settings(self) -> GuideSettings:
        return GuideSettings(ratio=self.guide_ratio, threshold=self.guide_threshold,
                             kernel_size=self.guide_kernel_size, sigma=self.guide_sigma, capture=self.guide_capture,
                             detach_degraded=self.guide_detach_degraded, recompute=self.guide_recompute)

    @property
    def loss_settings(self) -> LossSettings:
        return LossSettings(loss_type=self.loss_type, huber_schedule=self.huber_schedule, huber_c=self.huber_c,
                            huber_scale=self.huber_scale, debiased_estimation=self.debiased_estimation_loss)

    @property
    def cac_word_list(self) -> list[str]:
        return [w.strip() for w in self.cac_words.split(",") if w.strip()]

    @property
    def attention(self) -> str:
        """The requested attention backend, with the diffusers-style xformers flag folded in."""
        return "xformers" if self.enable_xformers_memory_efficient_attention else self.attention_backend

    def to_json(self, **extra) -> str:
        return json.dumps({**dataclasses.asdict(self), **extra}, indent=2, sort_keys=True)

    def write_json(self, path: str | os.PathLike, **extra) -> None:
        """Written atomically so a crash never leaves half a config next to a checkpoint."""
        from ..faults import write_atomically

        write_atomically(path, (self.to_json(**extra) + "\n").encode("utf-8"))
