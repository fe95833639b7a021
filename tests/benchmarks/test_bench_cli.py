"""`vipo bench` comes from the installed benchmarks part (vipo.benchmarks) through the `vipo.commands`
entry point; the engine never imports it, and the scripts also run by path."""

import ast
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from vipo.engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_is_a_plugin_command_of_the_installed_benchmarks_part():
    (bench,) = [ep for ep in entry_points(group="vipo.commands") if ep.name == "bench"]
    assert bench.value == "vipo.benchmarks.cli:add_commands"


def test_no_engine_module_imports_the_benchmarks():
    found = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)} imports {n}" for n in names if "benchmarks" in n.split(".")]
    assert not found, "\n".join(found)


def test_the_list_names_the_step_recipes_and_the_recipe_keys_that_matter(capsys):
    assert main(["bench", "step", "--list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "sd15-512",
        "flux-1024",
        "train.compile",
        "model.param_dtype",
        "reference.mode",
        "baseline settings",
    ):
        assert word in out, word


def test_the_script_takes_overrides_after_flags_and_ends_a_mistake_in_one_line():
    script = ROOT / "benchmarks" / "bench_step.py"
    proc = subprocess.run(
        [sys.executable, str(script), "sd15-tiny", "--smoke", "train.compiel=blocks"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("bench_step: error:"), proc.stderr
    assert "unknown key 'train.compiel'" in proc.stderr and "Traceback" not in proc.stderr
