"""Pairs listed in a JSONL manifest, one pair per line:

    {"prompt": "a red fox in snow", "winner": "img/0001_a.jpg", "loser": "img/0001_b.png",
     "category": "composition", "id": "fox-0001"}

`category`, `id` and `weight` (a finite number >= 0 scaling the pair in a preference loss,
default 1) are optional; other keys are ignored. Relative image paths are relative to
the manifest's folder, so a data set can be moved or mounted anywhere. Blank lines are allowed.
A malformed line is a SourceError naming the file and the line number: a manifest is written by
a script, and a broken line means the script is broken.

Without an `id` the pair's id is "manifest-" + a hash of (prompt, winner, loser) as written:
stable across runs and insensitive to line order. A missing image file is a counted skip when
the pair is read (`BadSample`, kind skipped_missing), or, with `check_files=True`, dropped and
counted while the manifest is loaded.
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .images import (
    BadSample,
    CountedSource,
    PairTransform,
    SourceError,
    decode_image,
    image_size,
    jsonl_objects,
)
from .records import PairRecord

log = logging.getLogger(__name__)

SKIP_KINDS = ("skipped_missing", "skipped_corrupt")


@dataclass(frozen=True)
class ManifestEntry:
    id: str
    prompt: str
    winner: Path
    loser: Path
    category: str
    weight: float = 1.0


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Every pair of the manifest, paths resolved; SourceError on the first bad line."""
    path = Path(path)
    base = path.parent
    entries = []
    for where, item in jsonl_objects(path):
        for key in ("prompt", "winner", "loser"):
            if key not in item:
                raise SourceError(f"{where}: missing key {key!r} (keys found: {', '.join(item) or 'none'})")
        for key in ("prompt", "winner", "loser", "category", "id"):
            if key in item and not isinstance(item[key], str):
                raise SourceError(f"{where}: {key!r} must be a string, got {item[key]!r}")
        if not item["winner"] or not item["loser"]:
            raise SourceError(f"{where}: empty image path")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise SourceError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r}")
        digest = hashlib.sha1("\0".join((item["prompt"], item["winner"], item["loser"])).encode()).hexdigest()
        entries.append(ManifestEntry(
            id=item.get("id") or f"manifest-{digest[:16]}", prompt=item["prompt"],
            winner=base / item["winner"], loser=base / item["loser"], category=item.get("category", ""),
            weight=float(weight),
        ))  # fmt: skip
    return entries


class ManifestPairs(CountedSource):
    """Map-style source over a JSONL manifest."""

    def __init__(self, path: str | os.PathLike, transform: PairTransform, *, check_files: bool = False):
        self.path, self.transform = Path(path), transform
        self._start_counts(f"manifest {self.path}", SKIP_KINDS)
        entries = read_manifest(self.path)
        if check_files:
            kept = []
            for entry in entries:
                absent = [p for p in (entry.winner, entry.loser) if not p.is_file()]
                if absent:
                    self.skips.skip("skipped_missing", entry.id, f"image file not found: {absent[0]}")
                else:
                    kept.append(entry)
            entries = kept
        if not entries:
            raise SourceError(f"{self.path}: no usable pairs (skipped: {self.skips.stats()})")
        self.entries = entries
        log.info("manifest %s: %d pairs; %s", self.path, len(entries), self.skips.stats())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> PairRecord:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"pair {index} out of range [0, {len(self.entries)})")
        entry = self.entries[index]
        try:
            winner = decode_image(entry.winner, ref=f"{entry.id}:{entry.winner}")
            loser = decode_image(entry.loser, ref=f"{entry.id}:{entry.loser}")
            winner_pixels, loser_pixels = self.transform(winner, loser, key=entry.id, epoch=self.epoch)
        except BadSample as bad:
            raise self._bad(index, bad) from None
        return PairRecord(entry.id, entry.prompt, winner_pixels, loser_pixels, entry.category, entry.weight)

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
