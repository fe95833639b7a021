"""The parts and the arrows between them (DESIGN.md Section 2), read from every import statement
of the source tree, lazy imports inside functions included:

    engine -> kernels, engine -> loaders, engine/eval -> the rest of the engine, benchmarks -> all;
    never kernels -> anything of ours, loaders -> engine, engine -> benchmarks, and nothing in the
    engine outside engine/eval imports engine/eval (the CLI loads its commands by name).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {
    "engine": "vipo.engine",
    "kernels": "vipo.kernels",
    "loaders": "vipo.loaders",
    "configs": "vipo.configs",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in PARTS:
        parts[0] = PARTS[parts[0]]
    elif parts[0] == "benchmarks":
        parts[0] = "benchmarks"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved to absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # `from . import x`
    return found


def sources(part: str) -> list[Path]:
    return sorted(p for p in (ROOT / part).rglob("*.py") if "__pycache__" not in p.parts)


def arrows(part: str, *, exclude: str | None = None) -> dict[str, set[str]]:
    return {
        str(p.relative_to(ROOT)): imports_of(p)
        for p in sources(part)
        if exclude is None or not str(p.relative_to(ROOT)).startswith(exclude)
    }


def offenders(table: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{file} imports {name}"
        for file, names in sorted(table.items())
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_the_module_resolver_sees_relative_imports():
    names = imports_of(ROOT / "engine" / "eval" / "demo.py")
    assert "vipo.engine.trainer" in names and "vipo.engine.eval.report" in names


@pytest.mark.parametrize(
    "part, forbidden, exclude",
    [
        ("kernels", ("vipo.engine", "vipo.loaders", "vipo.configs", "benchmarks", "engine", "loaders"), None),
        ("loaders", ("vipo.engine", "benchmarks", "engine"), None),
        ("engine", ("benchmarks", "vipo.benchmarks", "bench_step", "flops", "provenance", "registry"), None),
        ("engine", ("vipo.engine.eval",), "engine/eval/"),
    ],
    ids=[
        "kernels-import-nothing-of-ours",
        "loaders-know-no-engine",
        "engine-knows-no-benchmarks",
        "only-eval-imports-eval",
    ],
)
def test_no_forbidden_import_arrow(part, forbidden, exclude):
    found = offenders(arrows(part, exclude=exclude), forbidden)
    assert not found, "\n".join(found)


def test_the_arrow_check_would_catch_a_violation(tmp_path):
    bad = {"engine/trainer.py": {"vipo.engine.eval.demo"}, "kernels/x.py": {"vipo.engine.config"}}
    assert offenders(bad, ("vipo.engine.eval",)) == ["engine/trainer.py imports vipo.engine.eval.demo"]
    assert offenders(bad, ("vipo.engine",))


def test_the_cli_parser_builds_without_torch():
    """`vipo --help` stays fast: no command module pulls torch (or matplotlib) in at parser build."""
    import subprocess
    import sys

    code = (
        "import sys; from vipo.engine.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'matplotlib', 'diffusers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_source_tree_is_ruff_formatted_and_lint_clean():
    """`make lint` as a test, so CI holds the tree to one format (ruff format) with no pragmas."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install 'vipo[dev]')")
    parts = ["engine", "kernels", "loaders", "benchmarks", "tests", "configs", "setup.py"]
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run([ruff, *command, *parts], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout[-3000:]}{done.stderr[-1000:]}"
    pragmas = [
        str(p.relative_to(ROOT))
        for part in parts[:-1]
        for p in (ROOT / part).rglob("*.py")
        if "# fmt" + ": skip" in p.read_text(encoding="utf-8")
    ]
    assert not pragmas, pragmas
