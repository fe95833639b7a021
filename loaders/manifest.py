"""Pairs listed in a JSONL manifest, one pair per line:

    {"prompt": "a red fox in snow", "winner": "img/0001_a.jpg", "loser": "img/0001_b.png",
     "category": "composition", "id": "fox-0001"}

`category`, `id`, `weight` (a finite number >= 0 scaling the pair in a preference loss,
default 1; it must stay finite as float32) and `weight_map` (a grayscale image or .npy file of
per-pixel weights for both images, loaders/weight_maps.py) are optional; another key is ignored
with a warning naming it (once per key). Image paths are
relative to the manifest's folder, so a data set can be moved or mounted anywhere, and must stay
inside it ('..', absolute paths elsewhere and symlinks that lead out are refused, naming the
line, unless `allow_outside_root=True`). Blank lines are allowed. A malformed line is a
SourceError naming the file and the line number: a manifest is written by a script, and a broken
line means the script is broken.

Without an `id` the pair's id is "manifest-" + a hash of (prompt, winner, loser) as written:
stable across runs and insensitive to line order. A missing image file is a counted skip when
the pair is read (`BadSample`, kind skipped_missing), or, with `check_files=True`, dropped and
counted while the manifest is loaded. A weight map that is missing or unreadable makes its
pair a counted skip of the same kinds. A path that is a folder, FIFO or device is a counted skip
of its own kind (skipped_not_a_file), never opened.
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import (
    BadSample,
    CountedSource,
    ManifestRoot,
    PairTransform,
    SourceError,
    image_size,
    jsonl_objects,
    regular_file,
    shown,
)
from .records import PairRecord

log = logging.getLogger(__name__)

SKIP_KINDS = ("skipped_missing", "skipped_corrupt", "skipped_not_a_file")
MANIFEST_KEYS = ("prompt", "winner", "loser", "category", "id", "weight", "weight_map")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a weight above it is inf in the loss


@dataclass(frozen=True)
class ManifestEntry:
    id: str
    prompt: str
    winner: Path
    loser: Path
    category: str
    weight: float = 1.0
    weight_map: Path | None = None


def pair_weight(value, where: str) -> float:
    """A line's "weight" as a float, or SourceError: a bool or non-number, a negative weight
    (it would train toward the loser), NaN, and one above float32's largest (1e300 becomes inf
    in the loss, then NaN steps) are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= FLOAT32_MAX:
        raise SourceError(
            f"{where}: 'weight' must be a finite number >= 0, got {shown(value)} (a per-pair loss weight; at most "
            f"{FLOAT32_MAX:.3g}, so that it stays finite as float32; leave it out for 1)"
        )
    return float(value)


def read_manifest(path: str | os.PathLike, *, allow_outside_root: bool = False) -> list[ManifestEntry]:
    """Every pair of the manifest, paths resolved against its folder and kept inside it (see
    ManifestRoot); SourceError on the first bad line."""
    path = Path(path)
    root = ManifestRoot(path, allow_outside_root)
    entries = []
    for where, item in jsonl_objects(path, known=MANIFEST_KEYS):
        for key in ("prompt", "winner", "loser"):
            if key not in item:
                raise SourceError(f"{where}: missing key {key!r} (keys found: {', '.join(item) or 'none'})")
        if item.get("weight_map", "") is None:  # null: no map
            del item["weight_map"]
        for key in ("prompt", "winner", "loser", "category", "id", "weight_map"):
            if key in item and not isinstance(item[key], str):
                raise SourceError(
                    f"{where}: {key!r} must be a string, got {type(item[key]).__name__} {shown(item[key])}"
                )
        if not item["winner"] or not item["loser"]:
            raise SourceError(f"{where}: empty image path")
        weight = pair_weight(item.get("weight", 1.0), where)
        winner, loser = (root.path(item[key], where, key) for key in ("winner", "loser"))
        weight_map = root.path(item["weight_map"], where, "weight_map") if item.get("weight_map") else None
        digest = hashlib.sha1("\0".join((item["prompt"], item["winner"], item["loser"])).encode()).hexdigest()
        entries.append(
            ManifestEntry(
                id=item.get("id") or f"manifest-{digest[:16]}",
                prompt=item["prompt"],
                winner=winner,
                loser=loser,
                category=item.get("category", ""),
                weight=weight,
                weight_map=weight_map,
            )
        )
    return entries


class ManifestPairs(CountedSource):
    """Map-style source over a JSONL manifest."""

    def __init__(
        self,
        path: str | os.PathLike,
        transform: PairTransform,
        *,
        check_files: bool = False,
        allow_outside_root: bool = False,
    ):
        self.path, self.transform = Path(path), transform
        self._start_counts(f"manifest {self.path}", SKIP_KINDS)
        entries = read_manifest(self.path, allow_outside_root=allow_outside_root)
        if not entries:
            raise SourceError(f"{self.path}: no pairs (the manifest has no non-blank lines)")
        if check_files:
            kept = []
            for entry in entries:
                try:
                    for image in (entry.winner, entry.loser, entry.weight_map):
                        if image is not None:
                            regular_file(image, entry.id)
                except BadSample as bad:
                    self.skips.skip(bad.kind, bad.ref, bad.reason)
                else:
                    kept.append(entry)
            entries = kept
        if not entries:
            first = next(iter(self.skips.examples.values()), "")
            raise SourceError(f"{self.path}: no usable pairs (skipped: {self.skips.stats()}); first: {first}")
        self.entries = entries
        log.info("manifest %s: %d pairs; %s", self.path, len(entries), self.skips.stats())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> PairRecord:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"pair {index} out of range [0, {len(self.entries)})")
        entry = self.entries[index]
        try:
            winner_pixels, loser_pixels, weights = self.transform.pair(
                entry.winner,
                entry.loser,
                refs=(f"{entry.id}:{entry.winner}", f"{entry.id}:{entry.loser}"),
                key=entry.id,
                epoch=self.epoch,
                weight_map=entry.weight_map,
                map_ref=f"{entry.id}:{entry.weight_map}",
            )
        except BadSample as bad:
            raise self._bad(index, bad) from None
        return PairRecord(
            entry.id, entry.prompt, winner_pixels, loser_pixels, entry.category, entry.weight, weights
        )

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """(width, height) of each pair's winner from its header, for bucket assignment; None
        (and a counted skip) where it cannot be read."""
        sizes: list[tuple[int, int] | None] = []
        for index, entry in enumerate(self.entries):
            try:
                sizes.append(image_size(entry.winner, ref=f"{entry.id}:{entry.winner}"))
            except BadSample as bad:
                self._bad(index, bad)
                sizes.append(None)
        return sizes
