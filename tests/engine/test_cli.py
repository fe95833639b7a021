"""The `vipo` command: useful help, clean errors, a demo that learns."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vipo.engine.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_vipo(*args, cwd=None, interpret="1"):
    # TRITON_INTERPRET=0 runs the loss through the eager reference on CPU: the interpreted
    # kernels are correct but ~50 ms a launch, and the kernel tests cover them.
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run(
        [sys.executable, "-m", "vipo.engine", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        env=env,
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
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True False"


def test_config_show_resolves_overrides(capsys):
    assert main(["config", "show", "demo", "loss.alpha=8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["loss"]["alpha"] == 8.0


@pytest.mark.slow
def test_the_default_demo_learns_the_preference(tmp_path):
    # The README's promise, at the README's settings (about 3 minutes on one core).
    out_dir = tmp_path / "demo"
    result = run_vipo("demo", "--quiet", f"train.output_dir={out_dir}", interpret="0")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out_dir / "report" / "summary.json").read_text())
    # Stage 2 starts with policy == reference: every held-out margin is 0, a tie, counted 0.5.
    assert summary["held_out_accuracy_before"] == 0.5
    assert summary["held_out_accuracy_after"] >= 0.7
    assert summary["held_out_pairs"] == 128
    for stage, steps in (("sft", 400), ("dpo", 150)):
        rows = [json.loads(line) for line in (out_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == steps and all(math.isfinite(r["loss"]) for r in rows)
    sft_rows = [json.loads(line) for line in (out_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft_rows[-1]["loss"] < 0.5 * sft_rows[0]["loss"]  # stage 1 learned to denoise
    for name in ("curves.png", "samples.png"):
        with Image.open(out_dir / "report" / name) as image:
            assert image.width > 100 and image.height > 100
    assert "held-out preference accuracy 0.500 ->" in result.stdout


@pytest.mark.parametrize("alpha", ["0", "8"])
def test_demo_runs_both_stages_for_dpo_and_poly_dpo(tmp_path, alpha):
    objective = "dpo" if alpha == "0" else "poly_dpo"
    tiny = [
        "demo.sft_steps=2",
        "train.max_steps=3",
        "data.num_pairs=16",
        "demo.held_out_pairs=4",
        "demo.sample_prompts=2",
        "train.batch_pairs=2",
        "train.log_every_steps=1",
    ]
    args = [
        "demo",
        "-q",
        f"loss.alpha={alpha}",
        f"loss.objective={objective}",
        f"train.output_dir={tmp_path}",
        *tiny,
    ]
    assert main(args) == 0  # in-process, through the interpreted kernels
    assert len((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()) == 2
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["config"]["loss"]["alpha"] == float(alpha) and summary["held_out_pairs"] == 4


def test_plot_draws_a_run_and_names_a_missing_one(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / s, "accuracy": 0.5 + s / 100} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run), "--keys", "loss", "accuracy"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'curves.png'}"
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        two_panels = image.size
    assert main(["plot", str(run), "--out", str(tmp_path / "loss.png"), "--keys", "loss"]) == 0
    with Image.open(tmp_path / "loss.png") as image:  # one subplot: a narrower page than two
        assert image.format == "PNG" and image.width < two_panels[0]
    assert main(["plot", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_plot_names_a_metric_the_run_did_not_log_and_those_it_did(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "grad_norm": 2.0}) + "\n")
    assert main(["plot", str(run), "--keys", "loss", "acuracy"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("vipo") and "'acuracy'" in line and line.endswith("it has: grad_norm, loss")
    assert not (run / "curves.png").exists()
    assert main(["plot", str(run)]) == 0  # the default keys: those of them the run logged


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("vipo")
    assert script.exists() and os.access(script, os.X_OK)
