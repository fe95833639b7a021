"""Packaging for vipo.

The source tree keeps its parts at the top level (engine/, kernels/, loaders/) and installs them
under the `vipo` namespace. Nothing is installed as a top-level `engine`, `kernels` or `loaders`
module: PyPI has a `kernels` package that transformers imports.
"""

from setuptools import find_packages, setup

PARTS = ("engine", "kernels", "loaders", "configs", "benchmarks")


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = [], {}
    for part in PARTS:
        packages.append(f"vipo.{part}")
        package_dir[f"vipo.{part}"] = part
        for sub in find_packages(where=part):
            packages.append(f"vipo.{part}.{sub}")
            package_dir[f"vipo.{part}.{sub}"] = f"{part}/{sub.replace('.', '/')}"
    return packages, package_dir


packages, package_dir = _packages()

setup(
    name="vipo",
    version="0.1.0",
    description="Preference optimization (Diffusion-DPO, Poly-DPO) for image and video generators",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"vipo.configs": ["**/*.yaml", "**/*.json"]},
    include_package_data=False,
    # `pip install vipo` is the loss kernels alone (numpy: Triton's interpreter on CPU);
    # `vipo[train]` adds the engine, loaders and evaluation (engine/entry.py says so when missing).
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.26",
    ],
    extras_require={
        "train": [
            "pyyaml>=6.0",
            "safetensors>=0.4.3",
            "tqdm>=4.66",
            "pillow>=10.0",
            "matplotlib>=3.8",
            "pyarrow>=15.0",
            "diffusers>=0.32",
            "transformers>=4.46",
            "peft>=0.13",
            "accelerate>=0.34",
            "sentencepiece>=0.2",
        ],
        "video": ["nvidia-dali-cuda130>=2.4", "av>=12.0"],
        "deepspeed": ["deepspeed>=0.16"],
        # Built against CUDA only; never required, never imported at module load.
        "gpu": ["flash-attn>=2.6", "xformers>=0.0.28"],
        # optim.optimizer=adamw8bit (CUDA, and the CPU from 0.50); imported when that optimizer is built.
        "bnb": ["bitsandbytes>=0.50"],
        # Metric sinks besides metrics.jsonl (train.report_to); imported only when asked for.
        "track": ["tensorboard>=2.16", "wandb>=0.17"],
        "dev": [
            "pytest>=8.0",
            "pytest-benchmark>=4.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "tensorboard>=2.16",
        ],
    },
    entry_points={
        "console_scripts": ["vipo = vipo.engine.entry:main"],
        # Commands of installed parts outside the engine (engine/cli.py loads this group).
        "vipo.commands": ["bench = vipo.benchmarks.cli:add_commands"],
    },
)
