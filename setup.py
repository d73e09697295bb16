# Packaging lives here (not only in pyproject.toml) because `kernels/` sits at the top level of
# the repository but installs as `fastsynth.kernels`: the bare name `kernels` is another
# package on the index, and package_dir is the plain way to map it.
from setuptools import setup

setup(
    name="fastsynth",
    version="0.1.0",
    description="Self-supervised fine-grained recognition from synthesized data pairs",
    python_requires=">=3.10",
    packages=[
        "fastsynth",
        "fastsynth.data",
        "fastsynth.models",
        "fastsynth.methods",
        "fastsynth.kernels",
    ],
    package_dir={"fastsynth.kernels": "kernels"},
    install_requires=[
        # A range that resolves to the local wheels on the project's CPU machines
        # (torch 2.14.1 / torchvision 0.29.1) and admits the GPU machine's torch 2.11.
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "tqdm",
        "matplotlib",     # figures of the comparison report
        "scikit-learn",   # t-SNE embedding figure
    ],
    extras_require={
        # DALI is in the test extra so that tests/test_dali.py runs its CPU-only pipeline in CI.
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "scipy", "tensorboard",
                 "nvidia-dali-cuda130>=2.0; platform_system == 'Linux'"],
        "tensorboard": ["tensorboard"],
        "dali": ["nvidia-dali-cuda130>=2.0; platform_system == 'Linux'"],
        # apex is not on the package index: install it from source yourself; it is used only
        # when importable and never required.
    },
)
