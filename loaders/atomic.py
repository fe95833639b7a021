"""Files written whole or not at all, shared by the latent cache and the reference-error table:
JSON and safetensors written under a temporary name and renamed into place, their leftovers
cleared, headers read without loading tensors, fingerprints digested."""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt or written for another model or data set."""


def digest_of(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def plain_json(value):
    """`value` as JSON gives it back (tuples -> lists), so a stored fingerprint compares equal."""
    return json.loads(json.dumps(value))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise CacheError(f"{path}: not valid JSON ({err}); delete it to rebuild") from None


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half file at `path`."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates 0600 files; a shared cache is read by other users
    os.replace(tmp, path)


def remove_partials(path: Path) -> int:
    """Delete temporary files a crashed writer of `path` left behind."""
    partials = list(path.parent.glob(f"{path.name}.tmp.*"))
    for partial in partials:
        partial.unlink(missing_ok=True)
    return len(partials)


def header(path: Path) -> dict[str, str] | None:
    """A safetensors file's metadata, or None where the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        log.warning("%s is unreadable (%s): it will be rebuilt", path, err)
        return None


def whole_shard(path: Path, digest: str, count: int) -> bool:
    """True where `path` is a finished shard of this cache covering `count` pairs of the source:
    its rows plus the bad pairs it skipped (metadata "skipped")."""
    meta = header(path)
    if meta is None:
        return False
    covered = len(json.loads(meta.get("ids", "[]"))) + int(meta.get("skipped", 0))
    if meta.get("digest") != digest or covered != count:
        log.warning("%s belongs to another cache or plan: it will be rebuilt", path)
        return False
    return True


def describe_differences(found: dict, expected: dict, holder: str = "cache") -> str:
    keys = sorted(set(found) | set(expected))
    return "; ".join(
        f"{key}: {holder} has {found.get(key, '(absent)')!r}, this run {expected.get(key, '(absent)')!r}"
        for key in keys
        if found.get(key) != expected.get(key)
    )
