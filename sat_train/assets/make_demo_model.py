"""Trains the demo's tiny pretrained base model (run once by a maintainer; never at training time).

    python sat_train/assets/make_demo_model.py            # the full run (26 min on a shared 2-core CPU)
    python sat_train/assets/make_demo_model.py --short    # a few steps of each stage; prints their losses

Writes sat_train/assets/demo_model/, a diffusers SD v1.5 folder (tokenizer/, text_encoder/, vae/, unet/,
scheduler/; fp16 safetensors) that ``python -m sat_train --guide sac`` fine-tunes a LoRA on, plus
``sat_checksums.json`` (a SHA-256 per file, checked at load: models.load.check_recorded_checksums) and
``training.json`` (the run's settings, losses, timings and measured PSNRs, and the short run's losses,
which tests/test_demo_model.py reproduces).

Two stages, deterministic on a CPU (seeded generators, a fixed thread count):
  1. the VAE (SD's 8x downsampling, 4 latent channels, wider than the tests' random toy) learns to
     reconstruct 48 px crops of photos (MSE + a small KL term, as SD's VAE without its GAN/LPIPS terms),
     and to decode latents blurred under a mask as the image blurred there (train_vae says why);
  2. the UNet and the text encoder learn to denoise the VAE latents of the six demo photos (mild crops,
     flips, colour jitter) conditioned on their captions (10 % empty captions, for classifier-free
     guidance), so that sampling a training caption draws that photo.

Images, all inside wheels this project already installs (no download), all free of copyright restrictions:
  - sat_train/assets/demo_data/person_*.jpg: crops of the two below (make_demo_data.py); both stages.
  - skimage.data.astronaut(): Eileen Collins, NASA photo, public domain; VAE stage.
  - skimage.data.camera(): "cameraman", by Lav Varshney, CC0; VAE stage.
  - skimage.data.coffee(): a cup of coffee, by Rachel Michetti, CC0; VAE stage.
  - skimage.data.chelsea(): Chelsea the cat, by Stefan van der Walt, CC0; VAE stage.
  - skimage.data.rocket(): launch of the space shuttle Discovery, NASA photo, public domain; VAE stage.
  - matplotlib's sample data grace_hopper.jpg: Rear Admiral Grace Hopper, US Navy photo, public domain;
    VAE stage.
Never trained on (the held-out check of tests/test_demo_model.py): skimage.data.lfw_subset() faces.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE / "demo_model"
DATA = HERE / "demo_data"
THREADS = 1  # fixed: the losses (and so the recorded ones the tests reproduce) depend on the thread count
SEED = 0
SIZE = 128  # the demo's resolution
VAE_WIDTHS = (32, 64, 64, 64)
UNET_WIDTHS = (32, 64, 64)
FULL = {"vae_steps": 900, "vae_batch": 8, "vae_crop": 48, "vae_lr": 2e-3,
        "views": 32, "unet_steps": 2000, "unet_batch": 8, "unet_lr": 1e-3, "caption_dropout": 0.1}
SHORT = {**FULL, "vae_steps": 3, "unet_steps": 3, "views": 2}
KL_WEIGHT = 1e-6


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def demo_photos() -> tuple[list[torch.Tensor], list[str]]:
    lines = [json.loads(line) for line in (DATA / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return [to_tensor(Image.open(DATA / line["file_name"])) for line in lines], [line["text"] for line in lines]


def extra_photos() -> list[torch.Tensor]:
    """The VAE stage's other photos, each at two scales (short side 160 and 256 px) so that their crops
    show faces and things at about the demo photos' scale."""
    from matplotlib import cbook
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    sources = [data.astronaut(), data.camera(), data.coffee(), data.chelsea(), data.rocket(), hopper]
    out = []
    for array in sources:
        image = Image.fromarray(array).convert("RGB")
        for side in (160, 256):
            scale = side / min(image.size)
            out.append(to_tensor(image.resize((round(image.width * scale), round(image.height * scale)),
                                              Image.LANCZOS)))
    return out


def jitter(x: torch.Tensor, g: torch.Generator, amount: float = 0.1) -> torch.Tensor:
    """Colour jitter of a (3, H, W) image in [-1, 1]: brightness, contrast and saturation factors in
    [1 - amount, 1 + amount], then a random horizontal flip."""
    b, c, s, flip = torch.rand(4, generator=g)
    x = (x + 1) / 2 * (1 + amount * (2 * b - 1))
    mean = x.mean()
    x = (x - mean) * (1 + amount * (2 * c - 1)) + mean
    gray = x.mean(0, keepdim=True)
    x = (x - gray) * (1 + amount * (2 * s - 1)) + gray
    x = x.clamp(0, 1) * 2 - 1
    return x.flip(-1) if flip < 0.5 else x


def random_crop(x: torch.Tensor, side: int, g: torch.Generator) -> torch.Tensor:
    top = int(torch.randint(0, x.shape[1] - side + 1, (1,), generator=g))
    left = int(torch.randint(0, x.shape[2] - side + 1, (1,), generator=g))
    return x[:, top : top + side, left : left + side]


def build_models():
    """Tokenizer (the demo's), text encoder, VAE and UNet at the demo model's widths, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sat_train import demo

    torch.manual_seed(SEED)
    tokenizer = demo.build_tokenizer()
    text_encoder = CLIPTextModel(demo.text_encoder_config(tokenizer))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_WIDTHS, layers_per_block=1, sample_size=SIZE, scaling_factor=1.0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=UNET_WIDTHS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=4)  # SD v1.5 semantics: heads
    return tokenizer, text_encoder, vae, unet


def lr_at(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pixel_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) pixels, reflect padding, 4.5 sigma each side."""
    radius = int(4.5 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    taps = taps / taps.sum()
    channels = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1),
                 groups=channels)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1),
                    groups=channels)


def random_boxes(batch: int, side: int, g: torch.Generator) -> torch.Tensor:
    """(batch, 1, side, side) masks, each one random box of the latent grid (at least one cell)."""
    masks = torch.zeros(batch, 1, side, side)
    for i in range(batch):
        top, left = (int(v) for v in torch.randint(0, side, (2,), generator=g))
        height, width = (int(v) for v in torch.randint(1, side + 1, (2,), generator=g))
        masks[i, :, top : top + height, left : left + width] = 1
    return masks


def train_vae(vae, photos, extras, settings, log) -> list[float]:
    """Reconstruction (MSE + KL_WEIGHT x KL), plus what SAT's pictures need of the latent space: latents
    blurred under a mask (SAT's blur: 9 taps, sigma 1 latent pixel) decode to the image blurred there
    (sigma 8 pixels, one latent pixel's width) and unchanged elsewhere. Without that term the decoder turns
    blurred latents into coloured smears, because nothing asks a blurred latent to be a likely one."""
    from sat_kernels import gaussian_blur

    g = torch.Generator().manual_seed(SEED + 1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=settings["vae_lr"])
    losses, side = [], settings["vae_crop"]
    vae.train()
    for step in range(settings["vae_steps"]):
        crops = []
        for _ in range(settings["vae_batch"]):
            # three in four crops from the demo photos (the ones the demo shows), the others for variety
            pool = photos if torch.rand(1, generator=g) < 0.75 else extras
            source = pool[int(torch.randint(0, len(pool), (1,), generator=g))]
            crops.append(jitter(random_crop(source, side, g), g))
        x = torch.stack(crops)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings["vae_steps"], settings["vae_lr"])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        m = random_boxes(len(x), side // 8, g)
        blurred = vae.decode(m * gaussian_blur(z, 9, 1.0) + (1 - m) * z).sample
        m_pixels = F.interpolate(m, scale_factor=8, mode="nearest")
        target = m_pixels * pixel_blur(x, 8.0) + (1 - m_pixels) * x
        loss = (F.mse_loss(vae.decode(z).sample, x) + F.mse_loss(blurred, target)
                + KL_WEIGHT * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == settings["vae_steps"] - 1:
            log(f"vae step {step}: loss {loss.item():.5f}")
    vae.eval()
    return losses


@torch.no_grad()
def psnr(vae, images: torch.Tensor) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of the VAE's reconstructions (posterior mean) of ``images``."""
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((recon - images) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def make_views(photos, views: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(views x photos, 3, SIZE, SIZE) mild variants (crops of 88-100 % of the side, flips, colour jitter)
    and each one's photo index; view 0 of each photo is the photo itself."""
    images, index = [], []
    for v in range(views):
        for i, photo in enumerate(photos):
            if v == 0:
                images.append(photo)
            else:
                side = int(torch.randint(int(0.88 * SIZE), SIZE + 1, (1,), generator=g))
                crop = random_crop(photo, side, g)
                crop = F.interpolate(crop[None], size=(SIZE, SIZE), mode="bilinear", antialias=True,
                                     align_corners=False)[0]
                images.append(jitter(crop, g, amount=0.06))
            index.append(i)
    return torch.stack(images), torch.tensor(index)


def train_unet(unet, text_encoder, tokenizer, latents, index, captions, settings, log) -> list[float]:
    from sat_train.demo import training_scheduler

    g = torch.Generator().manual_seed(SEED + 2)
    scheduler = training_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings["unet_lr"], weight_decay=1e-2)
    unet.train(), text_encoder.train()
    losses, batch = [], settings["unet_batch"]
    for step in range(settings["unet_steps"]):
        pick = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[pick]
        caption = index[pick].clone()
        caption[torch.rand(batch, generator=g) < settings["caption_dropout"]] = len(captions)  # the empty one
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        noisy = scheduler.add_noise(x0, noise, t)
        cond = text_encoder(ids[caption])[0]
        pred = unet(noisy, t, cond).sample
        # min-SNR-5 weighting (Hang et al. 2023): converges in fewer steps than plain MSE
        weight = snr[t].clamp(max=5.0) / snr[t]
        loss = (weight * (pred - noise).pow(2).flatten(1).mean(1)).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings["unet_steps"], settings["unet_lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == settings["unet_steps"] - 1:
            log(f"unet step {step}: loss {loss.item():.5f}")
    unet.eval(), text_encoder.eval()
    return losses


def run(settings: dict, log=print) -> dict:
    """Both stages; returns the models, the losses and the measurements."""
    torch.set_num_threads(THREADS)
    begun = time.perf_counter()
    log = (lambda line, log=log: log(f"{time.perf_counter() - begun:7.1f}s {line}"))
    photos, captions = demo_photos()
    extras = extra_photos()
    tokenizer, text_encoder, vae, unet = build_models()
    started = time.perf_counter()
    vae_losses = train_vae(vae, photos, extras, settings, log)
    vae_seconds = time.perf_counter() - started
    stack = torch.stack(photos)
    with torch.no_grad():
        views, index = make_views(photos, settings["views"], torch.Generator().manual_seed(SEED + 3))
        latents = torch.cat([vae.encode(views[i : i + 32]).latent_dist.mean for i in range(0, len(views), 32)])
    # SD's recipe: scale the latents to unit variance (SD v1.5's 0.18215 came from the same measurement)
    scaling_factor = round(float(1 / latents.std()), 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    started = time.perf_counter()
    unet_losses = train_unet(unet, text_encoder, tokenizer, latents * scaling_factor, index, captions, settings, log)
    unet_seconds = time.perf_counter() - started
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "record": {"vae_losses": vae_losses, "unet_losses": unet_losses, "scaling_factor": scaling_factor,
                       "vae_seconds": round(vae_seconds, 1), "unet_seconds": round(unet_seconds, 1),
                       "vae_psnr_demo_photos": round(psnr(vae, stack), 2)}}


def save(result: dict, record: dict, folder: Path) -> None:
    """The diffusers folder, fp16 weights, then training.json and the checksums of every file."""
    import shutil

    from sat_train.demo import save_components, training_scheduler
    from sat_train.faults import write_atomically
    from sat_train.models.components import Components
    from sat_train.models.load import CHECKSUMS_NAME, file_checksums

    if folder.exists():
        shutil.rmtree(folder)
    models = [result[name].half() for name in ("text_encoder", "vae", "unet")]
    save_components(Components(result["tokenizer"], *models, training_scheduler()), folder)
    write_atomically(folder / "training.json", (json.dumps(record, indent=1) + "\n").encode())
    write_atomically(folder / CHECKSUMS_NAME, (json.dumps(file_checksums(folder), indent=1) + "\n").encode())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="a few steps of each stage; print their losses as JSON")
    parser.add_argument("--out", default=str(OUT), help="the model folder to write (full run)")
    args = parser.parse_args(argv)
    if args.short:
        record = run(SHORT, log=lambda _: None)["record"]
        print(json.dumps({"vae_losses": record["vae_losses"], "unet_losses": record["unet_losses"]}))
        return
    started = time.perf_counter()
    result = run(FULL, log=lambda line: print(line, flush=True))
    short = run(SHORT, log=lambda _: None)["record"]
    record = {"settings": FULL, "seed": SEED, "threads": THREADS, "torch": torch.__version__,
              **result["record"], "total_seconds": round(time.perf_counter() - started, 1),
              "short_run": {"settings": SHORT, "vae_losses": short["vae_losses"], "unet_losses": short["unet_losses"]}}
    save(result, record, Path(args.out))
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("losses") and k != "short_run"}))


if __name__ == "__main__":
    sys.exit(main())
