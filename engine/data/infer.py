"""Which `data.source` reads a data path, told from what the path is.

    infer_source("pairs.parquet")        -> "pickapic"   (a parquet file, or a folder of them)
    infer_source("shards/{000..009}.tar")-> "shards"     (a tar file, a brace pattern, a folder of tars)
    infer_source("pairs.jsonl")          -> "manifest"   or "video" when its first pair names clips

Used by the commands that take a data path directly (`vipo data stats PATH`, `vipo data agreement
PATH`); `--source` overrides it.
"""

import json
from pathlib import Path

from ..errors import RunError
from ..schema import DATA_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
_SOURCES_OF_FOLDERS = (("*.parquet", "pickapic"), ("*.tar", "shards"), ("*.jsonl", "manifest"))


def _manifest_kind(path: Path) -> str:
    """manifest or video: the suffix of the first pair's winner decides."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    winner = str(row.get("winner", "")) if isinstance(row, dict) else ""
                    return "video" if winner.lower().endswith(VIDEO_SUFFIXES) else "manifest"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: not a JSONL manifest (its first pair: {type(err).__name__})") from None
    except OSError as err:
        raise RunError(f"cannot read {path}: {err.strerror or err}") from None
    raise RunError(f"{path}: the manifest is empty")


def infer_source(path: str) -> str:
    """The data.source that reads `path`, or a RunError saying what the path is and what to pass."""
    if "{" in path and ".tar" in path:
        return "shards"
    where = Path(path)
    if not where.exists():
        raise RunError(f"data path not found: {path}")
    if where.is_dir():
        for pattern, source in _SOURCES_OF_FOLDERS:
            found = sorted(where.glob(pattern))
            if found:
                return _manifest_kind(found[0]) if source == "manifest" else source
        raise RunError(
            f"{path}: a folder with no .parquet, .tar or .jsonl files in it; pass --source "
            f"(manifest, pickapic, shards, video) and the file itself"
        )
    suffix = where.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise RunError(
            f"{path}: cannot tell the data source of a {suffix or 'suffix-less'} file "
            f"(known: {', '.join(f'{s} -> {src}' for s, src in DATA_SUFFIXES.items())}); pass --source"
        )
    source = DATA_SUFFIXES[suffix]
    return _manifest_kind(where) if source == "manifest" else source
