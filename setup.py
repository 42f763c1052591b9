from setuptools import find_packages, setup

setup(
    name="vascdist",
    version="0.1.0",
    description="Distributed training harness for classifying vascular-access sounds (normal vs stenosis).",
    python_requires=">=3.10",
    packages=find_packages(include=["vascdist", "vascdist.*", "launch"]),
    install_requires=[
        # Pinned to what the GPU clusters run: torchaudio's newest release needs exactly torch 2.11.
        "torch==2.11.*",
        "torchaudio==2.11.*",
        "torchvision==0.26.*",
        "deepspeed",
        "numpy",
        "h5py",
        "submitit",
        "tensorboard",
        # WAV I/O: torchaudio 2.11 delegates loading to torchcodec, which needs FFmpeg; soundfile does not.
        "soundfile",
        "pyyaml",
        "tqdm",
        "pillow",
        "psutil",  # vascdist bench samples process-tree memory
    ],
    extras_require={"test": ["pytest", "scikit-learn", "psutil"]},
    entry_points={"console_scripts": ["vascdist = vascdist.cli:main"]},
)
