"""PNG pictures of a run: mask previews (image | mask overlay | blurred-degraded image decoded by
the VAE) and the loss curve (drawn with PIL; matplotlib is not a dependency). Every PNG is written
atomically (temp file + os.replace), so a reader never sees half an image.

The loss curve's data, one (step, loss) per optimizer step, is ``loss_history.json``: written next
to ``loss.png`` and into every checkpoint, so a resumed run's curve starts at step 1."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..data.dataset import LATENT_PARAMS
from ..errors import UsageError
from ..faults import write_atomically
from ..models.vae import decode_latent_means, vae_on_device

MASK_COLOR = (255, 40, 40)
MAX_PREVIEW_ROWS = 4
LOSS_HISTORY_NAME = "loss_history.json"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """``image`` as a PNG at ``path`` (its folder made), written atomically: never half a picture."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, png_bytes(image))


def write_loss_history(path: str | os.PathLike, steps: list[int], losses: list[float]) -> Path:
    """``{"steps": [...], "losses": [...]}``, atomically (temp file + os.replace) and fsynced: inside a
    checkpoint it must be on disk before the COMPLETE marker is. JSON floats round-trip exactly."""
    return write_atomically(path, json.dumps({"steps": list(steps), "losses": list(losses)}).encode())


def read_loss_history(path: str | os.PathLike, up_to_step: int) -> tuple[list[int], list[float]]:
    """The (steps, losses) of ``write_loss_history`` for steps ≤ ``up_to_step``; empty lists when the file
    is missing (a checkpoint written before the history was saved: its curve starts at the resume)."""
    path = Path(path)
    if not path.is_file():
        return [], []
    data = json.loads(path.read_text(encoding="utf-8"))
    kept = [(int(s), float(v)) for s, v in zip(data["steps"], data["losses"], strict=True) if int(s) <= up_to_step]
    return [s for s, _ in kept], [v for _, v in kept]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    pixels = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def blurred_latents(x0: torch.Tensor, mask: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """m * blur(x0) + (1 - m) * x0 with the mask nearest-upsampled to the latent size: the degraded
    latents before re-noising (what the guide blurs)."""
    from sat_kernels import gaussian_blur

    m = F.interpolate(mask[:, None].float(), size=x0.shape[-2:], mode="nearest").to(x0.device)
    x0 = x0.float()
    return m * gaussian_blur(x0, kernel_size, sigma) + (1 - m) * x0


@torch.no_grad()
def mask_preview(pixel_values: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, vae,
                 kernel_size: int = 9, sigma: float = 1.0, max_rows: int = MAX_PREVIEW_ROWS) -> Image.Image:
    """A grid, one row per sample (at most ``max_rows``): training image | mask overlaid in red |
    the blurred-degraded latents decoded by the VAE. ``mask`` is (B, h, w) bool at any resolution."""
    rows = min(max_rows, pixel_values.shape[0])
    pixel_values, x0, mask = pixel_values[:rows], x0[:rows], mask[:rows]
    size = tuple(pixel_values.shape[-2:])
    images = to_uint8(pixel_values)
    big_mask = F.interpolate(mask[:, None].float().cpu(), size=size, mode="nearest")[:, 0].numpy()[..., None]
    overlay = (images * (1 - 0.55 * big_mask) + np.array(MASK_COLOR) * 0.55 * big_mask).round().astype(np.uint8)
    latents = blurred_latents(x0, mask, kernel_size, sigma) / vae.config.scaling_factor
    decoded = vae.decode(latents.to(next(vae.parameters()).dtype), return_dict=False)[0]
    decoded = to_uint8(F.interpolate(decoded.float(), size=size, mode="bilinear") if decoded.shape[-2:] != size
                       else decoded)
    grid = np.concatenate([np.concatenate([images[i], overlay[i], decoded[i]], axis=1) for i in range(rows)], axis=0)
    return Image.fromarray(grid)


def loss_curve(steps: list[int], losses: list[float], width: int = 640, height: int = 360,
               title: str = "train/loss") -> Image.Image:
    """Loss against step as a line on white, with the axis ranges written at the corners."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    points = [(s, v) for s, v in zip(steps, losses, strict=True) if np.isfinite(v)]
    if not points:
        draw.text((left + 10, top + 10), "no finite loss values", fill=(200, 0, 0))
        return image
    xs, ys = zip(*points)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-8)

    def place(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    coords = [place(x, y) for x, y in points]
    if len(coords) > 1:
        draw.line(coords, fill=(31, 119, 180), width=2)
    for cx, cy in coords if len(coords) <= 50 else []:
        draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(31, 119, 180))
    draw.text((4, top), f"{y1:.4g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{y0:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), f"step {x0}", fill=(0, 0, 0))
    draw.text((right - 70, bottom + 8), f"step {max(xs)}", fill=(0, 0, 0))
    return image


class RunPictures:
    """What the training loop draws: mask previews every ``mask_every`` steps and at the end (the
    run's --mask_preview_steps, or the demo's interval: demo.mask_preview_steps), step-based
    validation (``validate(step)``; the loop calls ``validate(step, epoch=)`` at the --validation_epochs)
    every ``--validation_steps``, the --sample_prompts images
    (``samples``: validation.TrainingSamples) when their flags say, and ``loss.png`` (with its data,
    ``loss_history.json``) at the end. ``steps``/``losses`` hold one entry per optimizer step, from
    step 1 after ``resume``. Only the main process writes; every call is cheap when its flag is off."""

    def __init__(self, accelerator, config, vae, mask_every: int | None, validate=None, samples=None):
        self.accelerator, self.config, self.vae, self.validate = accelerator, config, vae, validate
        self.samples = samples  # validation.TrainingSamples (--sample_prompts), or None
        self.mask_every = mask_every
        self.folder = Path(config.output_dir)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.last = None  # (pixel_values or latent_params, x0, mask) of the latest micro-batch that had a mask
        self.last_written = None
        self.last_is_cached = False  # self.last holds latent_params, not pixel_values

    def observe(self, batch, inputs, result) -> None:
        """Keeps the latest micro-batch's pictures' inputs (references only, no copies)."""
        if self.mask_every and getattr(result, "mask", None) is not None:
            # a latent cache's batches carry no pixels: the picture decodes their cached latent means
            self.last_is_cached = "pixel_values" not in batch
            images = batch[LATENT_PARAMS] if self.last_is_cached else batch["pixel_values"]
            self.last = (images, inputs.x0.detach(), result.mask)

    def resume(self, checkpoint: Path, step: int) -> None:
        """Restores the loss history of steps 1..``step`` saved in ``checkpoint`` (see save_checkpoint)."""
        self.steps, self.losses = read_loss_history(Path(checkpoint) / LOSS_HISTORY_NAME, step)

    def save_history(self, folder: Path) -> Path | None:
        """Writes ``folder/loss_history.json`` (main process only)."""
        if not self.accelerator.is_main_process:
            return None
        return write_loss_history(Path(folder) / LOSS_HISTORY_NAME, self.steps, self.losses)

    def after_step(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        if self.mask_every and step % self.mask_every == 0:
            self.write_mask_preview(step)
        every = self.config.validation_steps
        if every and self.config.validation_prompt and step % every == 0 and self.validate is not None:
            self.validate(step)
        if self.samples is not None:
            self.samples.after_step(step)

    def write_mask_preview(self, step: int) -> Path | None:
        if self.last is None or not self.accelerator.is_main_process or self.last_written == step:
            return None
        images, x0, mask = self.last
        with vae_on_device(self.vae, self.accelerator.device):  # a latent cache keeps the VAE on the CPU
            pixel_values = (decode_latent_means(images[:MAX_PREVIEW_ROWS], self.vae) if self.last_is_cached
                            else images)
            image = mask_preview(pixel_values, x0, mask, self.vae, self.config.guide_kernel_size,
                                 self.config.guide_sigma)
        self.last_written = step
        path = save_png(image, self.masks_folder / f"step{step:06d}.png")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("masks", np.asarray(image), step, dataformats="HWC")
        return path

    @property
    def masks_folder(self) -> Path:
        return self.folder / "masks"

    def finish(self, step: int) -> None:
        if self.mask_every:
            self.write_mask_preview(step)
        if self.accelerator.is_main_process and self.steps:
            self.save_history(self.folder)
            save_png(loss_curve(self.steps, self.losses), self.folder / "loss.png")


def check_mask_preview_flags(config) -> None:
    if config.mask_preview_steps is not None and config.guide == "none":
        raise UsageError("--mask_preview_steps shows the SAC/CAC blur mask: use it with --guide sac or cac")
