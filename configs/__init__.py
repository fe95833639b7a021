"""Recipes (`train/`) and architecture configs (`models/`) shipped with vipo.

They install as package data, so `vipo train demo` finds the built-in recipe from any folder.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def builtin_recipes() -> list[str]:
    """Names of the recipes in `configs/train/`, without the `.yaml` suffix."""
    return sorted(p.stem for p in (ROOT / "train").glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    """A recipe path as given, or a built-in recipe by name (`demo` -> configs/train/demo.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return ROOT / "train" / f"{name_or_path}.yaml"
