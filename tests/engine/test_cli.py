"""The `vipo` command: useful help, clean errors, a demo that learns."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vipo.engine.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_vipo(*args, cwd=None, interpret="1"):
    # TRITON_INTERPRET=0 runs the loss through the eager reference on CPU: the interpreted
    # kernels are correct but ~50 ms a launch, and the kernel tests cover them.
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run(
        [sys.executable, "-m", "vipo.engine", *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env
    )


def test_help_lists_the_subcommands():
    result = run_vipo("--help")
    assert result.returncode == 0
    assert "demo" in result.stdout and "config" in result.stdout


def test_a_bad_key_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = run_vipo("config", "show", "demo", "optim.lrr=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("vipo: error:") and "optim.lrr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_subcommand_is_a_usage_error():
    assert run_vipo("fly").returncode == 2


def test_python_m_from_the_checkout_does_not_expose_kernels_as_a_top_level_module():
    # transformers probes importlib.util.find_spec("kernels") for PyPI's `kernels` package; run
    # from the checkout, `python -m` would hand it our kernels/ folder.
    probe = (
        "import importlib.util, runpy, sys\n"
        "before = importlib.util.find_spec('kernels') is not None\n"
        "sys.argv = ['vipo', 'config', 'keys']\n"
        "try:\n    runpy.run_module('vipo.engine', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(before, importlib.util.find_spec('kernels') is not None)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True False"


def test_config_show_resolves_overrides(capsys):
    assert main(["config", "show", "demo", "loss.alpha=8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["loss"]["alpha"] == 8.0


def test_demo_learns_the_preference(tmp_path):
    out_dir = tmp_path / "demo"
    result = run_vipo("demo", "--quiet", f"train.output_dir={out_dir}", interpret="0")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    # At the start policy == reference, so every held-out z is 0 (accuracy 0, p 0.5).
    assert summary["held_out_accuracy_before"] == 0.0
    assert summary["held_out_accuracy_after"] > 0.7
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 200 and all(r["loss"] == r["loss"] for r in rows)
    assert "held-out implicit accuracy" in result.stdout


@pytest.mark.parametrize("alpha", ["0", "8"])
def test_demo_runs_for_dpo_and_poly_dpo(tmp_path, alpha):
    objective = "dpo" if alpha == "0" else "poly_dpo"
    args = ["demo", "-q", f"loss.alpha={alpha}", f"loss.objective={objective}", "train.max_steps=5",
            f"train.output_dir={tmp_path}", "train.log_every_steps=1"]
    assert main(args) == 0  # in-process, through the interpreted kernels
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 5


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("vipo")
    assert script.exists() and os.access(script, os.X_OK)
