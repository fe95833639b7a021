"""Image pairs streamed from WebDataset-style tar shards.

Layout: each sample is a run of consecutive members sharing a key (the member path up to the
first dot of its file name, as in WebDataset):

    shard-000000.tar
        000001.txt           the prompt, UTF-8                         } one of the two
        000001.json          {"prompt": ..., "category"?: ..., "id"?: ...}  } (json wins)
        000001.winner.jpg    the preferred image (any format PIL reads: jpg, png, webp, ...)
        000001.loser.png     the other image
        000001.weight_map.png  optional: per-pixel weights of both images (grayscale PNG or .npy)
        000002.txt
        ...

The json may carry "weight" (a finite number >= 0 scaling the pair's loss, as a manifest's).
The weight map covers the winner image and follows its crop and flip (loaders/weight_maps.py).
Other members (scores, metadata) are ignored. A pair's id is the json "id", else
"{shard name without .tar}/{key}". Shards are read with the standard library's tarfile in
stream mode, so .tar, .tar.gz and pipes all work and nothing is loaded whole.

Order and resume: epoch e permutes the shard list with (seed, e) (or keeps it, with
shuffle_shards=False); rank r of w takes shards r, r+w, ... of that order, and worker j of k
within a rank takes every k-th of those. Samples within a shard come in file order. The
position (epoch, shard within this stream's list, sample offset in that shard) is the whole
state: after `load_state_dict` the stream re-opens the shard and steps over `offset` samples
without decoding them. Ranks may hold different numbers of samples; the stream runs across
epochs (or `epochs` passes) and never ends on its own mid-run.

A sample that cannot be used (corrupt image or json, missing prompt or image) is a counted,
logged skip; a shard that cannot be read to its end is counted as skipped_corrupt_shards and the
stream moves on to the next one. A stream whose shards hold no usable pair at all raises
SourceError, naming the first skip, instead of going round its epochs forever.
"""

import glob
import json
import logging
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .images import BadSample, PairTransform, SkipLog, SourceError
from .manifest import pair_weight
from .records import PairRecord

log = logging.getLogger(__name__)

SKIP_KINDS = ("skipped_corrupt", "skipped_missing", "skipped_incomplete", "skipped_corrupt_shards")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def shard_files(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A folder's shards (sorted), a glob pattern's matches (sorted), one file, or a list."""
    if isinstance(shards, (str, os.PathLike)):
        entry = Path(shards)
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.name.endswith(SHARD_SUFFIXES))
        elif any(c in str(shards) for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(shards)))
        else:
            found = [entry]
        if not found:
            raise SourceError(f"no tar shards at {shards}")
        shards = found
    files = [Path(s) for s in shards]
    for file in files:
        if not file.exists():
            raise SourceError(f"no such shard: {file}")
        if not file.is_file():  # a FIFO would block the tar reader until something writes to it
            raise SourceError(f"{file} is not a regular file: a tar shard must be one")
    return files


def _shard_name(path: Path) -> str:
    for suffix in SHARD_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _samples(path: Path, skip: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(position, key, {extension: bytes}) per sample of a shard, from sample `skip` on; the
    members of earlier samples are stepped over unread."""
    with tarfile.open(path, "r|*") as tar:
        key, parts, position = None, {}, -1
        for member in tar:
            if not member.isfile():
                continue
            folder, name = posixpath.split(member.name)
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            member_key = posixpath.join(folder, stem)
            if member_key != key:
                if key is not None and position >= skip:
                    yield position, key, parts
                key, parts, position = member_key, {}, position + 1
            if position >= skip:
                parts[extension.lower()] = tar.extractfile(member).read()
        if key is not None and position >= skip:
            yield position, key, parts


class ShardPairs:
    """Iterable source over tar shards, one stream per (rank, worker)."""

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        transform: PairTransform,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        shuffle_shards: bool = True,
        epochs: int | None = None,
    ):
        self.shards = shard_files(shards)
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise ValueError(
                f"need 0 <= rank < world_size and 0 <= worker < num_workers; got "
                f"rank {rank} of {world_size}, worker {worker} of {num_workers}"
            )
        if len(self.shards) < world_size * num_workers:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {world_size} ranks x {num_workers} workers: "
                "every stream needs at least one shard"
            )
        self.transform, self.seed, self.shuffle_shards, self.epochs = transform, seed, shuffle_shards, epochs
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers
        self.shards_crc = zlib.crc32("\n".join(p.name for p in self.shards).encode())
        self.skips = SkipLog("shards", SKIP_KINDS)
        self.epoch, self.shard_pos, self.sample_offset = 0, 0, 0
        self._barren: set[Path] = set()  # shards read whole, since the last usable pair, without one

    def shards_for(self, epoch: int) -> list[Path]:
        """This stream's shards in epoch `epoch`, in reading order."""
        order = np.arange(len(self.shards))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.rank :: self.world_size][self.worker :: self.num_workers]]

    def vocabulary(self) -> None:
        return None

    def stats(self) -> dict[str, int]:
        return self.skips.stats()

    def skip_examples(self) -> dict[str, str]:
        """The first skip of each kind, "ref: reason"."""
        return dict(self.skips.examples)

    def __iter__(self) -> Iterator[PairRecord]:
        """Records from the current position on. One live iterator per object: it moves the
        position that `state_dict` reports."""
        while self.epochs is None or self.epoch < self.epochs:
            mine = self.shards_for(self.epoch)
            whole_pass, yielded = self.shard_pos == 0 and self.sample_offset == 0, False
            while self.shard_pos < len(mine):
                path = mine[self.shard_pos]
                try:
                    for position, key, parts in _samples(path, self.sample_offset):
                        self.sample_offset = position + 1
                        record = self._record(path, key, parts)
                        if record is not None:
                            yielded = True
                            yield record
                except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
                    self.skips.skip(
                        "skipped_corrupt_shards",
                        str(path),
                        f"unreadable after sample {self.sample_offset} ({type(err).__name__}: {err})",
                    )
                self.shard_pos, self.sample_offset = self.shard_pos + 1, 0
            if yielded:
                self._barren.clear()
            elif whole_pass:
                self._stop_if_barren(mine)
            self.epoch, self.shard_pos = self.epoch + 1, 0

    def _stop_if_barren(self, mine: list[Path]) -> None:
        """SourceError once every shard this stream can ever be given was read whole without one
        usable pair (all of them when the order is shuffled, else its fixed share): the stream
        would otherwise go round its epochs forever without yielding."""
        self._barren.update(mine)
        if self.shuffle_shards and not self._barren >= set(self.shards):
            return
        counts = ", ".join(f"{kind}={n}" for kind, n in self.skips.stats().items() if n)
        first = next(iter(self.skips.examples.values()), "the shards hold no samples")
        raise SourceError(
            f"no usable pair in the {len(self._barren)} shard(s) of this stream ({counts or 'empty'}); first: {first}"
        )

    def _record(self, path: Path, key: str, parts: dict[str, bytes]) -> PairRecord | None:
        ref = f"{path.name}:{key}"
        winner = next((v for k, v in parts.items() if k.startswith("winner.")), None)
        loser = next((v for k, v in parts.items() if k.startswith("loser.")), None)
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
            if not isinstance(meta, dict):
                raise BadSample(ref, f"json is a {type(meta).__name__}, not an object")
            prompt = meta.get("prompt")
            if prompt is None and "txt" in parts:
                prompt = parts["txt"].decode("utf-8")
            absent = [
                n
                for n, v in (("prompt", prompt), ("winner image", winner), ("loser image", loser))
                if v is None
            ]
            if absent:
                raise BadSample(
                    ref, f"no {', '.join(absent)} (members: {', '.join(sorted(parts))})", "skipped_incomplete"
                )
            if not isinstance(prompt, str):
                raise BadSample(ref, f"prompt is not a string: {prompt!r}")
            pair_id = str(meta.get("id") or f"{_shard_name(path)}/{key}")
            try:
                weight = pair_weight(meta.get("weight", 1.0), ref)
            except SourceError as err:
                raise BadSample(ref, str(err).removeprefix(f"{ref}: ")) from None
            map_bytes = next((v for k, v in parts.items() if k.startswith("weight_map.")), None)
            winner_pixels, loser_pixels, weights = self.transform.pair(
                winner,
                loser,
                refs=(f"{ref}.winner", f"{ref}.loser"),
                key=pair_id,
                epoch=self.epoch,
                weight_map=map_bytes,
                map_ref=f"{ref}.weight_map",
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self.skips.skip("skipped_corrupt", ref, f"bad prompt/json ({err})")
            return None
        except BadSample as bad:
            self.skips.skip(bad.kind, bad.ref, bad.reason)
            return None
        category = str(meta.get("category", ""))
        return PairRecord(pair_id, prompt, winner_pixels, loser_pixels, category, weight, weights)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_offset": self.sample_offset,
            "seed": self.seed,
            "shards_crc": self.shards_crc,
            "num_shards": len(self.shards),
            "rank": self.rank,
            "world_size": self.world_size,
            "worker": self.worker,
            "num_workers": self.num_workers,
            "shuffle_shards": self.shuffle_shards,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in (
            "seed",
            "shards_crc",
            "num_shards",
            "rank",
            "world_size",
            "worker",
            "num_workers",
            "shuffle_shards",
        ):
            if state[key] != mine[key]:
                raise ValueError(
                    f"checkpoint shard stream {key}={state[key]} does not match this run's {mine[key]}"
                )
        self.epoch, self.shard_pos, self.sample_offset = (
            state["epoch"],
            state["shard_pos"],
            state["sample_offset"],
        )
