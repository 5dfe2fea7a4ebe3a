"""Face metrics of one image: the columns of ``metrics.csv`` (``compare``) and ``samples/metrics.csv``
(``--sample_metrics``). Needs ``pip install 'sat[eval]'`` (identity: ``'sat[eval,identity]'``); this
module imports without them and stops with one line naming the extra when a scorer is built.

Every metric but ``faces`` is about the largest face and is None when there is no face.

- ``faces``: how many faces MTCNN found. Catches images that lost the face altogether.
- ``face_score``: MTCNN's confidence for the largest face. Near 1.0 for any clear face, even a blurred
  one: it says a face is there, it does not grade it.
- ``face_sharpness``: variance of the Laplacian of the face box, grayscale 0..255, resized to
  ``FACE_SIZE`` square (so faces of any size are comparable). Gaussian blur (sigma 4 and 8 px at 512)
  lowered it on every face measured. It also rises with noise, JPEG blocking and hard-edged
  artefacts, and depends on the subject (beard, glasses, hair in the box): compare it between
  sources over the same prompts and seeds, not across subjects.
- ``eye_sharpness``: mean of the same measure over two square patches centred on the eye landmarks,
  ``EYE_PATCH`` times the eye distance a side, resized to ``EYE_SIZE``. Blur lowered it on every face;
  a local swirl over one eye (a plausible diffusion artefact) lowered it on only 9 of 21 faces in the
  issue's measurement and 3 of the 9 test photos here (skimage ``swirl``, strength 4, radius 0.4 eye
  distances): a distorted eye that keeps its edges is not seen, and can even read sharper. It depends
  on the landmarks, which drift on distorted eyes.
- ``eye_balance``: min/max of the two eyes' sharpness, in (0, 1]; 1 = both eyes equally sharp. Low
  values flag one smeared eye, but also one hidden or in shadow (the cameraman, one eye behind his
  camera, reads 0.30 on the sharp photo) and a turned head. It is not a symmetry score, and
  left/right symmetry in general is not a quality score: it rises with blur.
- ``identity``: 1 - Euclidean distance between dlib's ResNet embedding of the largest face and the
  mean embedding of the reference faces (the photos the LoRA was trained on); higher = more alike.
  dlib calls two faces the same person below distance 0.6, i.e. identity above 0.4 here. With two
  crops of the astronaut as references, her other crops and mirrors scored 0.68-0.81 and three other
  people 0.19-0.35; in the issue's pairwise measurement the margin was thinner (same 0.33-0.43,
  different 0.61-1.02 in distance): read it as a trend over many images, not a verdict on one.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .faces import MIN_FACE_SIZE, Face, as_rgb_array, detect_faces, package_dir, require
from .sources import read_image
from .stats import METRIC_COLUMNS

FACE_SIZE = 128  # px a side the face box is resized to before its Laplacian
EYE_SIZE = 32  # px a side each eye patch is resized to
EYE_PATCH = 0.6  # eye patch side / eye distance: the eye (about half the eye distance) and its lids
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def grayscale(image: np.ndarray) -> np.ndarray:
    """float64 luma in 0..255 (ITU-R 601 weights, as PIL's "L" and OpenCV's RGB2GRAY)."""
    return image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the pixels that have all four neighbours (no border
    rule: a padded border would add edges that are not in the picture)."""
    lap = gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4 * gray[1:-1, 1:-1]
    return float(lap.var())


def region_sharpness(gray: np.ndarray, box: tuple[float, float, float, float], size: int) -> float | None:
    """``laplacian_variance`` of ``box`` (x0, y0, x1, y1; clipped to the image) resized to size x size
    with area averaging; None when less than 3x3 pixels of the box lie inside the image."""
    import cv2

    height, width = gray.shape
    x0, y0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    x1, y1 = min(width, int(round(box[2]))), min(height, int(round(box[3])))
    if x1 - x0 < 3 or y1 - y0 < 3:
        return None
    crop = gray[y0:y1, x0:x1]
    if crop.shape != (size, size):
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return laplacian_variance(crop)


def eye_boxes(face: Face) -> tuple[tuple[float, float, float, float], ...]:
    """The two eye patches: squares centred on the eye landmarks, EYE_PATCH x the eye distance a side."""
    (lx, ly), (rx, ry) = face.eyes
    half = EYE_PATCH * float(np.hypot(rx - lx, ry - ly)) / 2
    return tuple((x - half, y - half, x + half, y + half) for x, y in face.eyes)


def sharpness_metrics(image, face: Face) -> dict:
    """face_sharpness, eye_sharpness and eye_balance of one face (None where a patch falls outside)."""
    gray = grayscale(as_rgb_array(image))
    eyes = [region_sharpness(gray, box, EYE_SIZE) for box in eye_boxes(face)]
    both = None not in eyes
    return {
        "face_sharpness": region_sharpness(gray, face.box, FACE_SIZE),
        "eye_sharpness": float(np.mean(eyes)) if both else None,
        "eye_balance": min(eyes) / max(eyes) if both and max(eyes) > 0 else None,
    }


@functools.lru_cache(maxsize=1)
def _dlib_models():
    """(5-point shape predictor, ResNet face encoder), loaded once. Only these two of
    face_recognition_models' files: its 68-point model was trained on data licensed for
    non-commercial use only."""
    require("identity")
    import dlib

    folder = package_dir("face_recognition_models", "identity") / "models"
    return (dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(folder / "dlib_face_recognition_resnet_model_v1.dat")))


def face_embedding(image, face: Face) -> np.ndarray:
    """dlib's 128-d embedding of ``face``: its 5-point landmarks inside the MTCNN box, then the ResNet on
    the aligned 150 px chip (dlib's own pipeline, with MTCNN's box in place of dlib's detector)."""
    import dlib

    predictor, encoder = _dlib_models()
    pixels = as_rgb_array(image)
    shape = predictor(pixels, dlib.rectangle(*(int(v) for v in face.box)))
    return np.asarray(encoder.compute_face_descriptor(pixels, shape), dtype=np.float64)


def reference_files(references: str | Path | Sequence) -> list:
    """A folder becomes its image files (sorted); a list is kept as it is (paths or PIL images)."""
    if isinstance(references, (str, Path)):
        folder = Path(references)
        if not folder.is_dir():
            raise UsageError(f"--reference_images {folder}: not a folder; pass a folder of photos of the person")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"--reference_images {folder}: no images there ({', '.join(IMAGE_SUFFIXES)})")
        return files
    return list(references)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class FaceScorer:
    """Scores images: ``scorer(image) -> (row, faces)``, ``row`` holding METRIC_COLUMNS.

    ``references``: a folder, or a list of image paths / PIL images, of the person the LoRA learned;
    without them ``identity`` is None. References without a readable face are skipped, each named in
    one line through ``warn`` (default: stderr) and kept in ``self.warnings``; when none has a face
    the scorer stops with a UsageError. Models load once per process, on first use.
    """

    def __init__(self, references: str | Path | Sequence | None = None, warn: Callable[[str], None] = _warn):
        require("eval")
        self.warnings: list[str] = []
        self.reference_embedding = None
        if references is None:
            return
        require("identity")
        embeddings = []
        for i, ref in enumerate(reference_files(references)):
            name = ref if isinstance(ref, (str, Path)) else f"reference image {i}"
            image = read_image(Path(ref)) if isinstance(ref, (str, Path)) else ref
            if isinstance(image, str):
                problem = image
            else:
                faces = detect_faces(image)
                if faces:
                    embeddings.append(face_embedding(image, faces[0]))
                    continue
                problem = f"{name}: no face found in this reference image; skipped"
            self.warnings.append(problem)
            warn(problem)
        if not embeddings:
            where = f" {references}" if isinstance(references, (str, Path)) else ""
            raise UsageError(f"--reference_images{where}: no face found in any reference image; pass photos where "
                             f"the face is clear, frontal and at least {MIN_FACE_SIZE} px wide")
        self.reference_embedding = np.mean(embeddings, axis=0)

    def identity(self, image, face: Face) -> float:
        return 1.0 - float(np.linalg.norm(face_embedding(image, face) - self.reference_embedding))

    def __call__(self, image) -> tuple[dict, list[Face]]:
        pixels = as_rgb_array(image)
        faces = detect_faces(pixels)
        row = dict.fromkeys(METRIC_COLUMNS)
        row["faces"] = len(faces)
        if faces:
            row["face_score"] = faces[0].score
            row.update(sharpness_metrics(pixels, faces[0]))
            if self.reference_embedding is not None:
                row["identity"] = self.identity(pixels, faces[0])
        return row, faces
