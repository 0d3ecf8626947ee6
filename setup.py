"""Packaging for microadam_dist.

The package is pure Python plus optional CUDA kernels in csrc/ (see docs/install.md).
"""

from setuptools import find_packages, setup

setup(
    name="microadam_dist",
    version="0.1.0",
    description="Sharded, fused MicroAdam optimizer for DeepSpeed ZeRO and PyTorch FSDP",
    packages=find_packages(include=["microadam_dist", "microadam_dist.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "numpy", "matplotlib"],
        "examples": ["matplotlib", "tqdm"],
    },
)
