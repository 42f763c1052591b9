from setuptools import find_packages, setup

setup(
    name="vascdist",
    version="0.1.0",
    description="Distributed training harness for classifying vascular-access sounds (normal vs stenosis).",
    python_requires=">=3.10",
    packages=find_packages(include=["vascdist", "vascdist.*"]),
    install_requires=[
        # Binary-coupled: torchaudio's and torchvision's C++ extensions are built against one torch release, and
        # their wheels' metadata does not say which (torchaudio 2.11.1 allows torch>=2.11 but needs symbols that
        # torch 2.11.0 lacks). Pin all three exactly; move them together.
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "torchvision==0.26.0",
        # vascdist/compat.py uses private internals of both: pinned to the minor release that was tested.
        "deepspeed>=0.19,<0.20",
        "numpy",
        "scipy",  # band-pass (sosfiltfilt), polyphase resampling, moving median of the cycle envelope
        "h5py",
        "submitit>=1.5,<1.6",
        "tensorboard",
        # WAV I/O: torchaudio 2.11 delegates loading to torchcodec, which needs FFmpeg; soundfile does not.
        "soundfile",
        "pyyaml",
        "tqdm",
        "pillow",
        "psutil",  # vascdist bench samples process-tree memory
        "scikit-learn",  # point metrics (confusion matrix, AUROC, AP); threadpoolctl comes with it
        "scipy",  # calibration slope and intercept, temperature scaling
    ],
    extras_require={"test": ["pytest", "psutil"]},
    entry_points={"console_scripts": ["vascdist = vascdist.cli:main"]},
)
