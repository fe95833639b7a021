"""vipo installs as `vipo.engine`, `vipo.kernels`, `vipo.loaders`, never as top-level modules."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("vipo-*.whl")
    return path


def test_wheel_holds_only_the_vipo_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top <= {"vipo", *(n.split("/")[0] for n in names if ".dist-info/" in n)}
    assert "vipo/__init__.py" not in names  # a namespace package
    for expected in (
        "vipo/kernels/reference.py",
        "vipo/engine/cli.py",
        "vipo/loaders/__init__.py",
        "vipo/configs/train/demo.yaml",
    ):
        assert expected in names


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed alone (no dependencies) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_normal_install_imports_from_outside_the_checkout(installed, tmp_path):
    target = installed
    code = (
        "import importlib.util, vipo.kernels, vipo.engine.config, vipo.configs as c\n"
        f"assert vipo.kernels.__file__.startswith({str(target)!r}), vipo.kernels.__file__\n"
        "assert 'demo' in c.builtin_recipes()\n"
        "print([importlib.util.find_spec(m) for m in ('engine', 'kernels', 'loaders')])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[None, None, None]"


def _requires(wheel: Path) -> list[str]:
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return [
        line.split(":", 1)[1].strip()
        for line in archive.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_a_base_install_requires_torch_triton_and_numpy_only(wheel):
    requires = _requires(wheel)
    base = {_name(r) for r in requires if "extra ==" not in r}
    assert base == {"torch", "triton", "numpy"}, requires
    train = {_name(r) for r in requires if 'extra == "train"' in r or "extra == 'train'" in r}
    assert {"diffusers", "transformers", "peft", "pyyaml", "safetensors", "pyarrow"} <= train, requires


# Every module of the extras made absent, as in an environment with torch and Triton only: a None
# in sys.modules fails `import` with ModuleNotFoundError, and find_spec (torch probes with it)
# answers None.
BLOCK_EXTRAS = """
import sys
from vipo.engine.entry import EXTRA_OF
sys.modules.update(dict.fromkeys(EXTRA_OF))
"""


def test_the_kernels_run_and_the_command_names_the_extra_without_the_training_packages(installed, tmp_path):
    target = installed
    code = BLOCK_EXTRAS + (
        "import torch, vipo.kernels\n"
        "from vipo.kernels import poly_dpo_loss\n"
        "from vipo.engine.entry import EXTRA_OF, main\n"
        "pred = torch.randn(4, 3, 5, 7, requires_grad=True)\n"
        "out = poly_dpo_loss(pred, torch.randn(4, 3, 5, 7), ref_pred=torch.randn(4, 3, 5, 7), beta=50.0, alpha=8.0)\n"
        "out.loss.backward()\n"
        "assert torch.isfinite(out.loss) and pred.grad.abs().sum() > 0\n"
        "loaded = sorted(m for m, module in sys.modules.items() if module and m.split('.')[0] in EXTRA_OF)\n"
        "assert not loaded, loaded\n"
        "sys.exit(main(['train', 'demo']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "vipo: this command needs the 'train' extra (yaml is not installed): pip install 'vipo[train]'"
    ]
