"""vipo installs as `vipo.engine`, `vipo.kernels`, `vipo.loaders`, never as top-level modules."""

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


def test_normal_install_imports_from_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
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
