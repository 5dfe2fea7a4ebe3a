"""Latent caching (--cache_latents, --cache_latents_to_disk; kohya-ss/sd-scripts' flag names).

Before training, the VAE encodes each distinct (image, target size, crop box, flip) once; batches
then carry the VAE's latent *distribution* (``latent_dist.parameters``: mean and logvar, stacked
on the channel axis) under ``dataset.LATENT_PARAMS`` instead of pixels, and ``run.inputs.make_step_inputs`` draws
``models.vae.sample_latents(params, generator)`` = ``mean + std * randn(generator)``, exactly what
``vae.encode(pixels).latent_dist.sample(generator)`` draws uncached. A cached run is therefore the
uncached center-crop run (up to the float noise of another VAE batch size).

- Crops: a cache holds one crop per image, so cached images are center-cropped (as in kohya's
  scripts); --random_crop with a cache is refused (check_latent_cache_flags). With --random_flip the flipped image
  is cached too, and each sample picks one with the uncached path's flip draw (ImageTransform.draws_flip).
- --cache_latents: in memory, rebuilt each run. Every process encodes every image: the seeded
  shuffle hands each process other samples every epoch, so each needs them all, and encoding on
  every device at once takes the wall time of one process encoding alone, with no collective of
  variable-shaped tensors.
- --cache_latents_to_disk: one safetensors file per image under OUTPUT_DIR/latent_cache/ (never next
  to the images), read per sample. The main process encodes what is missing or stale and writes it
  (temp file + os.replace); the others wait, then read (main_process.from_main_process: when the main
  process fails there, every process stops with a one-line error naming it). Each file's metadata holds
  its key: the image (path, size, mtime_ns; or dataset fingerprint and row), target size, crop box,
  flips, the VAE (config hash + weight checksum), dtype and resize filter. A file whose key differs, or that
  cannot be read whole (a crash while caching), is encoded again. ``manifest.json`` records the
  run-level part of the key, so the log can say why a cache is rebuilt.
- The VAE then waits on the CPU (on a GPU run) and comes back for validation images and mask
  pictures (``models.vae.vae_on_device``); mask pictures of cached batches show the decoded latent mean.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..faults import fsync_dir, write_atomically
from .dataset import CaptionedImages, DatasetRow, ImageTransform, mirrored_box, open_image
from .main_process import from_main_process

CACHE_FOLDER = "latent_cache"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
TENSOR_NAMES = {False: "latent_params", True: "latent_params_flipped"}  # a file's tensor per flip
CRASH_POINT = "latent_cache:mid"  # faults.py: a cache file written to its temporary, not yet renamed
WEIGHT_SAMPLE = 256  # leading values of every VAE tensor hashed into the fingerprint (with each tensor's sum)


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's config and a checksum of its weights: every tensor's name, shape, dtype,
    first WEIGHT_SAMPLE values and float64 sum (a fine-tuned or other VAE changes them all)."""
    # "_" keys are bookkeeping (the folder it came from, the diffusers version, a set printed in any order)
    settings = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    state = vae.state_dict()
    with torch.no_grad():
        sums = torch.stack([t.detach().double().sum() for t in state.values()]).cpu()
    for (name, tensor), total in zip(state.items(), sums.tolist(), strict=True):
        head = tensor.detach().reshape(-1)[:WEIGHT_SAMPLE].float().cpu()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype} {total!r}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:32]


def image_location(source) -> str:
    """Where an image comes from, stable while its content changes (names its cache file)."""
    if isinstance(source, DatasetRow):
        return f"dataset {getattr(source.images, '_fingerprint', 'unknown')} column {source.column} row {source.row}"
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return f"in-memory image {hashlib.sha256(open_image(source).tobytes()).hexdigest()}"


def image_identity(source) -> str:
    """``image_location`` plus, for files, their size and mtime_ns: a changed file is another image."""
    if isinstance(source, (str, Path)):
        stat = os.stat(source)
        return f"{image_location(source)} size {stat.st_size} mtime_ns {stat.st_mtime_ns}"
    return image_location(source)


@dataclass(frozen=True)
class CacheEntry:
    """One cached image: ``name`` (its file under latent_cache/), ``key`` (everything its latents depend
    on, JSON) and ``index`` (the first sample showing it; repeated kohya images share one entry)."""

    name: str
    key: str
    index: int
    target_size: tuple[int, int]
    image_size: tuple[int, int]  # (W, H) of the image file
    crop_box: tuple[int, int, int, int]  # the cached center crop's, in the resized image (SDXL's time ids)
    resized_width: int  # that resized image's (a flipped sample's crop box is mirrored in it)


def run_fingerprint(vae, transform: ImageTransform, dtype: torch.dtype) -> dict:
    """The run-level part of every key (also the manifest's content): what the VAE is and how pixels are made."""
    return {"version": FORMAT_VERSION, "vae": vae_fingerprint(vae), "dtype": str(dtype).removeprefix("torch."),
            "interpolation": transform.interpolation, "flips": [False, True] if transform.random_flip else [False]}


def cache_entry(dataset: CaptionedImages, index: int, size: tuple[int, int], center: ImageTransform,
                fingerprint: dict) -> CacheEntry:
    """Sample ``index``'s entry, its image ``size`` (W, H) giving the crop box."""
    source = dataset.records[index][0]
    target = tuple(dataset.target_size(index))
    resized = center.resized_size(size, target)
    box = center.crop_box(resized, target=target)
    key = {**fingerprint, "image": image_identity(source), "target_size": list(target), "crop_box": list(box)}
    name = hashlib.sha256(image_location(source).encode()).hexdigest()[:32] + ".safetensors"
    return CacheEntry(name=name, key=json.dumps(key, sort_keys=True), index=index, target_size=target,
                      image_size=tuple(size), crop_box=box, resized_width=resized[0])


class LatentCache:
    """What CaptionedImages reads: ``params(index, flipped)``, the (2C, h, w) latent distribution of
    sample ``index``; from memory (``store``: name → flip → tensor) or from its file in ``folder``;
    ``image_conditioning(index, flipped)``: the family's conditioning on the sizes of that cached center
    crop (SDXL's; ``entries``: one per sample)."""

    def __init__(self, entries: list[CacheEntry], family, store: dict[str, dict[bool, torch.Tensor]] | None = None,
                 folder: Path | None = None):
        self.entries, self.family, self.store, self.folder = entries, family, store, folder
        self.names = [e.name for e in entries]

    def image_conditioning(self, index: int, flipped: bool = False) -> dict[str, torch.Tensor]:
        """As ImageTransform.with_crop_box reports the uncached crop: mirrored when ``flipped``."""
        entry = self.entries[index]
        box = mirrored_box(entry.crop_box, entry.resized_width) if flipped else entry.crop_box
        return self.family.image_conditioning(entry.image_size, box)

    def params(self, index: int, flipped: bool = False) -> torch.Tensor:
        name = self.names[index]
        if self.store is not None:
            return self.store[name][flipped]
        from safetensors import safe_open

        with safe_open(str(self.folder / name), framework="pt") as f:
            return f.get_tensor(TENSOR_NAMES[flipped])


@torch.no_grad()
def encode_entries(entries: list[CacheEntry], dataset: CaptionedImages, center: ImageTransform, vae, dtype,
                   flips: list[bool], batch_size: int, show_progress: bool):
    """Yields (entry, {flip: params on the CPU}) for every entry: each target size's images, center-cropped,
    encoded ``batch_size`` at a time (with their mirror images when ``flips`` holds True)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(entries), desc="caching latents", unit="image", disable=not show_progress)
    by_size: dict[tuple[int, int], list[CacheEntry]] = {}
    for entry in entries:
        by_size.setdefault(entry.target_size, []).append(entry)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            pixels = torch.stack([dataset.pixels(entry.index, transform=center) for entry in chunk])
            views = torch.cat([pixels.flip(-1) if flipped else pixels for flipped in flips])
            params = vae.encode(views.to(vae.device, dtype)).latent_dist.parameters.cpu()
            per_flip = params.split(len(chunk))
            for i, entry in enumerate(chunk):
                yield entry, {flipped: per_flip[k][i].clone() for k, flipped in enumerate(flips)}
            bar.update(len(chunk))
    bar.close()


def read_entry(path: Path, entry: CacheEntry, flips: list[bool]) -> dict[bool, torch.Tensor] | None:
    """The file's tensors when its key is ``entry``'s and it reads whole; None otherwise (stale, missing,
    truncated or garbage: a crash while caching is then simply encoded again)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != entry.key:
                return None
            return {flipped: f.get_tensor(TENSOR_NAMES[flipped]) for flipped in flips}
    except Exception:  # safetensors raises its own error types (and OSError) for unreadable files
        return None


def write_entry(folder: Path, entry: CacheEntry, params: dict[bool, torch.Tensor]) -> None:
    from safetensors.torch import save

    tensors = {TENSOR_NAMES[flipped]: tensor.contiguous() for flipped, tensor in params.items()}
    write_atomically(folder / entry.name, save(tensors, metadata={"key": entry.key}), CRASH_POINT)


def explain_rebuild(folder: Path, fingerprint: dict) -> str | None:
    """Why the manifest's cache does not fit this run (the settings that differ), or None."""
    try:
        previous = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    changed = [name for name in fingerprint if previous.get(name) != fingerprint[name]]
    return f"latent cache {folder} was made for another {', '.join(changed)}: rebuilding it" if changed else None


def build_disk_cache(folder: Path, entries: list[CacheEntry], encode, fingerprint: dict, say) -> None:
    """Main process: encodes and writes every entry whose file is missing or stale, then the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # a crash's temporaries
        stale.unlink(missing_ok=True)
    summary = {**fingerprint, "target size": [list(size) for size in sorted({e.target_size for e in entries})]}
    reason = explain_rebuild(folder, summary)
    if reason:
        say(reason)
    missing = [e for e in entries if read_entry(folder / e.name, e, fingerprint["flips"]) is None]
    for entry, params in encode(missing):
        write_entry(folder, entry, params)
    manifest = {"fingerprint": summary, "files": {e.name: json.loads(e.key)["image"] for e in entries}}
    write_atomically(folder / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode(), CRASH_POINT)
    fsync_dir(folder)
    say(f"latent cache: {len(missing)} images encoded, {len(entries) - len(missing)} reused, in {folder}")


def cache_latents(config, accelerator, vae, dataset: CaptionedImages, dtype: torch.dtype) -> LatentCache | None:
    """--cache_latents / --cache_latents_to_disk: fills the cache, gives it to ``dataset`` (whose items then
    carry latent_params, no pixels) and moves the VAE to the CPU; None (and nothing done) without the flags."""
    if not config.caches_latents:
        return None
    say = accelerator.print
    if not config.center_crop:
        say("latent cache: images are center-cropped (a cache holds one crop per image; see --random_crop)")
    center = ImageTransform(dataset.transform.resolution, True, False, dataset.transform.interpolation)
    fingerprint = run_fingerprint(vae, dataset.transform, dtype)
    sizes = dataset.record_sizes()  # the data check's, else file headers (a dataset row: the image)
    per_sample = [cache_entry(dataset, i, size, center, fingerprint) for i, size in enumerate(sizes)]
    entries = list({e.name: e for e in per_sample}.values())  # one per image (kohya repeats share it)

    def encode(todo):
        return encode_entries(todo, dataset, center, vae, dtype, fingerprint["flips"], config.train_batch_size,
                              show_progress=accelerator.is_main_process)

    if config.cache_latents_to_disk:
        folder = Path(config.output_dir) / CACHE_FOLDER
        # the main process writes the files, the others read them once it has (or stop with its failure)
        from_main_process(accelerator, "caching latents",
                          lambda: build_disk_cache(folder, entries, encode, fingerprint, say))
        cache = LatentCache(per_sample, dataset.family, folder=folder)
    else:
        cache = LatentCache(per_sample, dataset.family, store={entry.name: params for entry, params in encode(entries)})
        say(f"latent cache: {len(entries)} images encoded, in memory")
    dataset.latent_cache = cache
    if vae.device.type != "cpu":
        vae.to("cpu")  # back on the device only for validation images and mask pictures (vae_on_device)
    return cache


def check_latent_cache_flags(config) -> None:
    if config.random_crop and config.center_crop:
        raise UsageError("--random_crop and --center_crop ask for different crops: pick one")
    if config.random_crop and config.caches_latents:
        flag = "--cache_latents_to_disk" if config.cache_latents_to_disk else "--cache_latents"
        raise UsageError(f"--random_crop with {flag} would train every epoch on the one crop the cache holds: "
                         f"drop --random_crop (cached images are center-cropped) or drop {flag}")
