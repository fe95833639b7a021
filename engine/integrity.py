"""Which checkpoint to trust: a manifest of every file's size and SHA-256, checked before any
checkpoint is read, and the choice of the newest checkpoint that passes.

    checkpoints/step-000100/manifest.json     {"files": {"model.safetensors": {"bytes": ..., "sha256": ...}}}

The manifest is written last into the temporary folder, before the rename publishes it. A
checkpoint whose files are missing, truncated, zeroed or flipped fails the check and names the
file; `resolve_checkpoint` then falls back to the newest older checkpoint that passes, saying so,
and moves the damaged one aside (`step-N.damaged`) so that no later save overwrites it and no
later resume picks it. A checkpoint written when the run stopped on non-finite losses is marked
in its state.json and is never picked by a resume either.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

from .errors import RunError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 16 * 2**20


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file below `folder` but the manifest, as sorted relative paths."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _my_share(items: list, world) -> list:
    """Rank r's share of `items` (every world.size-th from r): ranks hash in parallel."""
    return items if world is None else items[world.rank :: world.size]


def _gather(value, world) -> list:
    return [value] if world is None else world.gather(value)


def write_manifest(folder: Path, world=None) -> None:
    """Hash every file of a checkpoint folder not yet published (each rank its share of them)
    and write manifest.json on rank 0 (collective when `world` is given)."""
    folder = Path(folder)
    files = checkpoint_files(folder)
    mine = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in _my_share(files, world)
    }
    entries: dict = {}
    for part in _gather(mine, world):
        entries.update(part)
    if world is None or world.is_main:
        manifest = {"hash": "sha256", "files": dict(sorted(entries.items()))}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def check(folder: Path, world=None) -> str | None:
    """None when every file listed in the manifest is there with its size and hash; else the
    first problem, naming the file. Collective when `world` is given (each rank hashes a share)."""
    folder = Path(folder)
    problem = None
    files = {}
    manifest = folder / MANIFEST
    if not folder.is_dir():
        problem = f"{folder}: not a folder"
    elif not manifest.is_file():
        problem = None if _legacy(folder) else f"{manifest}: missing"
    else:
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not a mapping")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            problem = f"{manifest}: unreadable ({type(err).__name__}: {err})"
            files = {}
    mine = []
    for name in _my_share(sorted(files), world):
        entry, file = files[name], folder / name
        if not file.is_file():
            mine.append(f"{file}: missing")
        elif file.stat().st_size != entry.get("bytes"):
            mine.append(f"{file}: {file.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
        elif _sha256(file) != entry.get("sha256"):
            mine.append(f"{file}: contents changed (SHA-256 differs from the manifest)")
    found = [p for part in _gather(mine, world) for p in part]
    return problem or (found[0] if found else None)


def _legacy(folder: Path) -> bool:
    """A checkpoint written before manifests existed: readable, with a warning, unchecked."""
    state = folder / "state.json"
    try:
        legacy = state.is_file() and "manifest" not in json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if legacy:
        log.warning("%s was written without a manifest (an older vipo): its files are not checked", folder)
    return legacy


def step_of(folder: Path) -> int | None:
    name = Path(folder).name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def _stopped_on_nonfinite(folder: Path) -> bool:
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8")).get("stopped") == "nonfinite"
    except (OSError, ValueError, AttributeError):
        return False


def step_folders(out_dir: Path) -> list[Path]:
    """The published step-N folders of a run, newest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def resolve_checkpoint(
    out_dir: Path, world=None, *, what: str = "resume", set_aside: bool = True
) -> Path | None:
    """The newest checkpoint of run `out_dir` that passes `check`: the one `checkpoints/latest`
    names when it passes, else the newest step-N that does (a warning line names each damaged
    file). With `set_aside` (a resume, which writes into the run) damaged ones are renamed on rank
    0. None when the run has no checkpoint; RunError when it has some and none passes. Collective
    when `world` is given."""
    root = Path(out_dir) / "checkpoints"
    candidates = step_folders(out_dir)
    if not candidates:
        return None
    pointer = root / "latest"
    named = None
    if pointer.is_file():
        try:
            named = root / pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            named = None
    main = world is None or world.is_main
    if named is None or not named.is_dir():
        why = (
            "is missing"
            if not pointer.exists()
            else f"names {named.name if named else '?'}, which is not there"
        )
        if main:
            log.warning("%s %s: looking for the newest complete checkpoint instead", pointer, why)
    else:
        candidates = [named, *[c for c in candidates if c != named]]
    problems = []
    for folder in candidates:
        if _stopped_on_nonfinite(folder):
            if main:
                log.warning(
                    "%s was written when the run stopped on non-finite losses: not used to %s", folder, what
                )
            continue
        problem = check(folder, world)
        if problem is None:
            return folder
        problems.append(problem)
        if main:
            log.warning("checkpoint %s is damaged (%s): trying the one before it", folder.name, problem)
            if set_aside:
                _set_aside(folder)
        if world is not None:
            world.barrier()
    if not problems:
        raise RunError(
            f"{root}: every checkpoint was written when the run stopped on non-finite losses; "
            f"nothing to {what}"
        )
    moved = "; the damaged folders were renamed to *.damaged" if set_aside else ""
    raise RunError(
        f"{root}: no checkpoint passes its integrity check ({len(problems)} damaged, newest: "
        f"{problems[0]}){moved}"
    )


def _set_aside(folder: Path) -> None:
    target = folder.with_name(folder.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged-{n}")
    try:
        os.replace(folder, target)
    except OSError as err:  # read-only run folder (e.g. exporting someone else's): leave it
        log.debug("could not rename %s: %s", folder, err)
