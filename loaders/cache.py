"""The latent cache: every pair encoded once -- the VAE posteriors of winner and loser (raw
latents for pixel-space models) and the text embeddings of its prompt -- into sharded
safetensors files, read back map-style by training and by the offline reference scoring.

    FOLDER/
      index.json                  format, fingerprint, shard plan, dtype, ids, shapes, complete flags
      empty-prompt.safetensors    the empty prompt's conditioning (caption dropout)
      shard-00000.safetensors     pairs [0, N); shard-00001.safetensors pairs [N, 2N); ...

A shard holds, for its pair in row r, `r/winner_mean`, `r/loser_mean` and, for posteriors,
`r/winner_logvar`, `r/loser_logvar`, and `r/weight_map` (float32, at the latent grid) for a pair
with a weight map (loaders/weight_maps.py); for each distinct prompt q of the shard, `prompt/q/KEY` for
every tensor of the adapter's `encode_prompts` (pairs of one prompt share it). Its metadata
names the ids, each row's prompt slot and pair weight, the rows with a weight map, the prompts
and the fingerprint digest: a shard describes itself.

Posteriors, not samples: the official Diffusion-DPO code draws a fresh latent from the VAE
posterior at every step. Keeping mean and log-variance lets training do the same (mean +
exp(logvar / 2) * n, n from the counter RNG) instead of freezing one draw. Both are stored in
the model's latent space (shifted and scaled as the family's pipeline expects), so reading
needs no family knowledge.

Storage dtype: float16 by default. It halves fp32's bytes, its 11-bit mantissa rounds at ~2^-12
relative (8x finer than bfloat16's), and latent means, log-variances (the VAE clamps them to
[-30, 20]) and text-encoder states sit far inside its range. A value that would overflow is
refused at write time, naming the pair; `float32` keeps the encoders' values exactly.

Writing resumes and splits across ranks: rank r of w writes shards r, r + w, ... Each shard is
written to a temporary file and renamed into place, so a shard file that exists is whole; a
restart keeps those and rebuilds the rest. The complete flags of `index.json` only ever turn
true, so ranks finishing in any order cannot make them wrong, and the reader checks the files.

This module knows no model: the engine passes an encoder (`encode_prompts`, `encode_posterior`)
and a fingerprint of what the cache depends on.
"""

import bisect
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from .atomic import (
    CacheError,
    describe_differences,
    digest_of,
    header,
    plain_json,
    read_json,
    remove_partials,
    save_atomic,
    whole_shard,
    write_json_atomic,
)
from .records import stack_pixels
from .weight_maps import latent_weights

log = logging.getLogger(__name__)

FORMAT = "vipo-latent-cache/1"
INDEX = "index.json"
EMPTY_PROMPT = "empty-prompt.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PairEncoder(Protocol):
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]: ...

    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, logvar) in the model's latent space; logvar None: the latents are exact."""


# ---------------------------------------------------------------------------------------------
# Writing


def to_pixels(arrays: list) -> torch.Tensor:
    """uint8 HxWx3 images -> [N, 3, H, W]; FxHxWx3 clips -> [N, 3, F, H, W]; values in [-1, 1],
    on the device the arrays are on (a batch DALI decoded on the GPU stays there)."""
    device = arrays[0].device if isinstance(arrays[0], torch.Tensor) else "cpu"
    try:
        return stack_pixels(arrays, device)
    except ValueError as err:
        raise CacheError(str(err)) from None


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _stored(value: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = value.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
    if not torch.isfinite(out).all():
        if not torch.isfinite(value).all():
            raise CacheError(f"{what}: the encoder returned non-finite values")
        raise CacheError(
            f"{what}: values up to {value.abs().max().item():.4g} overflow {dtype}; "
            "rerun with --dtype float32 (or bfloat16)"
        )
    return out


def _same_shape_runs(records: list) -> list[list]:
    """Consecutive records of one image shape: a bucketed source may mix sizes in a shard."""
    runs: list[list] = []
    for record in records:
        if record.winner.shape != record.loser.shape:
            raise CacheError(
                f"pair {record.id}: winner {record.winner.shape} and loser {record.loser.shape} "
                "differ in shape"
            )
        if runs and runs[-1][0].winner.shape == record.winner.shape:
            runs[-1].append(record)
        else:
            runs.append([record])
    return runs


def _cache_records(source, indices: list[int]) -> list:
    """The pairs at `indices`, decoded (by the batch decoder where the source leaves it one). A
    bad pair is left out, counted and logged by its source: a cache row is always the pair of
    its index, never SkipBadSamples' stand-in (whose id another row already holds)."""
    from .images import BadSample, SkipBadSamples

    raw = source.source if isinstance(source, SkipBadSamples) else source
    records, where = [], {}
    for i in indices:
        try:
            record = raw[i]
        except BadSample:
            continue
        records.append(record)
        where[record.id] = i
    if records and not isinstance(records[0].winner, np.ndarray):  # EncodedImages: decode the batch
        from .dali import batch_decoder, decode_pairs

        def drop(position, record, bad):
            if hasattr(raw, "_bad"):
                raw._bad(where[record.id], bad)
            return None

        records = decode_pairs(records, batch_decoder(raw), drop)
    return records


def _encode_shard(
    source,
    encoder: PairEncoder,
    first: int,
    count: int,
    dtype,
    batch_pairs: int,
    advance: Callable[[int], object],
) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {}
    ids: list[str] = []
    slots: list[int] = []
    prompts: dict[str, int] = {}  # prompt -> slot: pairs of one prompt share its embeddings
    weights: list[float] = []  # each row's pair weight
    mapped: list[int] = []  # rows with a weight map
    posterior = None
    skipped = 0  # bad pairs of this shard's range (the source counted and logged each)
    for start in range(first, first + count, batch_pairs):
        indices = list(range(start, min(start + batch_pairs, first + count)))
        records = _cache_records(source, indices)
        skipped += len(indices) - len(records)
        for run in _same_shape_runs(records):
            new = [p for p in dict.fromkeys(r.prompt for r in run) if p not in prompts]
            if new:
                cond = encoder.encode_prompts(new)
                for j, prompt in enumerate(new):
                    prompts[prompt] = len(prompts)
                    for key, value in cond.items():
                        tensors[f"prompt/{prompts[prompt]}/{key}"] = _stored(
                            value[j], dtype, f"prompt {prompt!r}: {key}"
                        )
            mean, logvar = encoder.encode_posterior(
                to_pixels([r.winner for r in run] + [r.loser for r in run])
            )
            posterior = logvar is not None
            n = len(run)
            maps = latent_weights([getattr(r, "weight_map", None) for r in run], mean.shape)
            for j, record in enumerate(run):
                row = len(ids)
                weights.append(float(getattr(record, "weight", 1.0)))
                if getattr(record, "weight_map", None) is not None:
                    tensors[f"{row}/weight_map"] = _stored(
                        maps[j], torch.float32, f"pair {record.id}: weight map"
                    )
                    mapped.append(row)
                for side, offset in (("winner", 0), ("loser", n)):
                    tensors[f"{row}/{side}_mean"] = _stored(
                        mean[offset + j], dtype, f"pair {record.id}: {side}"
                    )
                    if posterior:
                        tensors[f"{row}/{side}_logvar"] = _stored(
                            logvar[offset + j], dtype, f"pair {record.id}: {side}"
                        )
                ids.append(str(record.id))
                slots.append(prompts[record.prompt])
            advance(n)
        advance(len(indices) - len(records))
    metadata = {
        "skipped": str(skipped),
        "ids": json.dumps(ids),
        "prompt_slots": json.dumps(slots),
        "prompts": json.dumps(list(prompts)),
        "posterior": "1" if posterior else "0",
        "weights": json.dumps(weights),
        "weight_map_rows": json.dumps(mapped),
    }
    return tensors, metadata


def _start_index(
    folder: Path, fingerprint: dict, num_pairs: int, pairs_per_shard: int, dtype_name: str, vocabulary
) -> dict:
    """The folder's index: created with the plan, or an existing one checked against this run."""
    index = read_json(folder / INDEX)
    if index is None:
        starts = range(0, num_pairs, pairs_per_shard)
        shards = [
            {
                "file": shard_name(s),
                "first": first,
                "count": min(pairs_per_shard, num_pairs - first),
                "complete": False,
            }
            for s, first in enumerate(starts)
        ]
        index = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "digest": digest_of(fingerprint),
            "num_pairs": num_pairs,
            "pairs_per_shard": pairs_per_shard,
            "dtype": dtype_name,
            "vocabulary": vocabulary,
            "shards": shards,
            "complete": False,
        }
        write_json_atomic(folder / INDEX, index)
        return index
    if index.get("format") != FORMAT:
        raise CacheError(f"{folder}: index.json is not a {FORMAT} index (format {index.get('format')!r})")
    if index["fingerprint"] != fingerprint:
        raise CacheError(
            f"{folder} holds a cache for another model or data set "
            f"({describe_differences(index['fingerprint'], fingerprint)}); "
            "choose another data.cache folder or delete this one"
        )
    for key, value in (("num_pairs", num_pairs), ("pairs_per_shard", pairs_per_shard), ("dtype", dtype_name)):
        if index[key] != value:
            raise CacheError(
                f"{folder} was started with {key}={index[key]}, this run asks {value}: resume with the same "
                "setting, or choose another data.cache folder"
            )
    return index


def write_cache(
    source,
    encoder: PairEncoder,
    folder: str | Path,
    fingerprint: dict,
    *,
    pairs_per_shard: int = 256,
    batch_pairs: int = 8,
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Encode `source` (a map-style pair source) into `folder`: this rank's shards r, r + w, ...,
    keeping the shards a previous run finished. Returns a summary of what was written and kept."""
    if dtype not in DTYPES:
        raise CacheError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if pairs_per_shard < 1 or batch_pairs < 1:
        raise CacheError(
            f"pairs_per_shard and batch_pairs must be >= 1, got {pairs_per_shard}, {batch_pairs}"
        )
    if not 0 <= rank < world_size:
        raise CacheError(f"rank {rank} is outside a world of {world_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = plain_json(fingerprint)
    vocabulary = source.vocabulary() if hasattr(source, "vocabulary") else None
    index = _start_index(folder, fingerprint, len(source), pairs_per_shard, dtype, vocabulary)
    digest = index["digest"]
    torch_dtype = DTYPES[dtype]
    empty_meta = header(folder / EMPTY_PROMPT)
    if empty_meta is None or empty_meta.get("digest") != digest:
        empty = {
            key: _stored(value[0], torch_dtype, f"empty prompt: {key}")
            for key, value in encoder.encode_prompts([""]).items()
        }
        save_atomic(empty, folder / EMPTY_PROMPT, {"format": FORMAT, "digest": digest})
    mine = [index["shards"][s] for s in range(rank, len(index["shards"]), world_size)]
    kept = [s["file"] for s in mine if whole_shard(folder / s["file"], digest, s["count"])]
    todo = [s for s in mine if s["file"] not in kept]
    written, skipped, tried = [], 0, 0
    with tqdm(
        total=sum(s["count"] for s in todo),
        desc=f"cache rank {rank}/{world_size}",
        unit="pair",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for shard in todo:
            path = folder / shard["file"]
            if remove_partials(path):
                log.info("%s: removed a partial write, rebuilding", path)
            tensors, metadata = _encode_shard(
                source, encoder, shard["first"], shard["count"], torch_dtype, batch_pairs, bar.update
            )
            save_atomic(tensors, path, {"format": FORMAT, "digest": digest, **metadata})
            written.append(shard["file"])
            skipped += int(metadata["skipped"])
            tried += shard["count"]
    if tried and skipped == tried:
        raise CacheError(f"all {tried} pairs this rank encoded are bad files (see the skips logged above)")
    index = finalize_index(folder)
    return {
        "folder": str(folder),
        "written": written,
        "kept": kept,
        "skipped": skipped,
        "complete": index["complete"],
        "shards": len(index["shards"]),
        "rank": rank,
        "world_size": world_size,
    }


def _shard_contents(folder: Path, shard: dict) -> dict:
    meta = header(folder / shard["file"])
    with safe_open(str(folder / shard["file"]), framework="pt") as handle:
        shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return {"ids": json.loads(meta["ids"]), "posterior": meta["posterior"] == "1", "shapes": shapes}


def finalize_index(folder: str | Path, write: bool = True) -> dict:
    """Turn on the complete flags of the shards that are whole; once all are, record ids, the
    latent and conditioning shapes, and mark the cache complete. `write=False` (a read-only
    folder) returns the completed index without saving it."""
    folder = Path(folder)
    index = read_json(folder / INDEX)
    if index is None:
        raise CacheError(f"no latent cache in {folder} (index.json missing)")
    changed = False
    for shard in index["shards"]:
        if not shard["complete"] and whole_shard(folder / shard["file"], index["digest"], shard["count"]):
            shard["complete"] = changed = True
    if not index["complete"] and all(s["complete"] for s in index["shards"]):
        ids, latent_shapes, cond_shapes, posterior = [], set(), {}, None
        for shard in index["shards"]:
            contents = _shard_contents(folder, shard)
            ids += contents["ids"]
            shard["rows"] = len(contents["ids"])  # fewer than count where bad pairs were left out
            posterior = contents["posterior"]
            for key, shape in contents["shapes"].items():
                if key.startswith("prompt/"):
                    cond_shapes[key.split("/", 2)[2]] = shape
                elif key.endswith("_mean"):
                    latent_shapes.add(tuple(shape))
        repeated = len(ids) - len(set(ids))
        if repeated:
            first = next(i for i in ids if ids.count(i) > 1)
            raise CacheError(f"{folder}: {repeated} pair ids repeat (first {first!r}); ids must be unique")
        shapes = {"latents": sorted(list(s) for s in latent_shapes), "cond": cond_shapes}
        index.update(ids=ids, posterior=posterior, complete=True, shapes=shapes)
        changed = True
    if changed and write:
        write_json_atomic(folder / INDEX, index)
    return index


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class CachedPair:
    id: str
    prompt: str
    winner_mean: torch.Tensor
    loser_mean: torch.Tensor
    winner_logvar: torch.Tensor | None  # None: the means are exact latents (pixel-space models)
    loser_logvar: torch.Tensor | None
    cond: dict[str, torch.Tensor]  # one prompt's tensors, without a batch dim
    weight: float = 1.0  # the pair's loss weight
    weight_map: torch.Tensor | None = None  # float32 [1, h, w] or [1, f, 1, 1] at the latent grid


class LatentCache:
    """Map-style reader: `len(cache)`, `cache[i]` -> CachedPair, in the source's pair order.

    `fingerprint`, where given, must equal the one the cache was written with: a cache of another
    model or data set is refused with the keys that differ."""

    def __init__(self, folder: str | Path, fingerprint: dict | None = None):
        self.folder = Path(folder)
        index = read_json(self.folder / INDEX)
        if index is None:
            raise CacheError(
                f"no latent cache in {self.folder} (index.json missing): run `vipo cache RECIPE` first"
            )
        if index.get("format") != FORMAT:
            raise CacheError(f"{self.folder}: index.json is not a {FORMAT} index")
        if fingerprint is not None and index["fingerprint"] != plain_json(fingerprint):
            raise CacheError(
                f"latent cache {self.folder} was written for another model or data set "
                f"({describe_differences(index['fingerprint'], plain_json(fingerprint))}); "
                "run `vipo cache` for this recipe into another data.cache folder"
            )
        if not index["complete"]:
            missing = [
                s["file"]
                for s in index["shards"]
                if not whole_shard(self.folder / s["file"], index["digest"], s["count"])
            ]
            if missing:
                raise CacheError(
                    f"latent cache {self.folder} is incomplete: {len(missing)} of {len(index['shards'])} "
                    f"shards missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                    "rerun `vipo cache` to finish it"
                )
            index = finalize_index(self.folder, write=os.access(self.folder, os.W_OK))
        self.index = index
        self.fingerprint, self.digest = index["fingerprint"], index["digest"]
        self.ids: list[str] = index["ids"]
        self.posterior: bool = index["posterior"]
        self._rows = {pair_id: i for i, pair_id in enumerate(self.ids)}
        # Row i's (shard, row in shard): shards hold `count` rows less the bad pairs left out
        # ("rows"; an index written before skips were left out has full shards).
        rows = [shard.get("rows", shard["count"]) for shard in index["shards"]]
        self._starts = [0, *itertools.accumulate(rows)][:-1]  # each shard's first row
        if sum(rows) != len(self.ids):
            raise CacheError(f"{self.folder}: index.json lists {len(self.ids)} ids for {sum(rows)} rows")
        self._handles: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, pair_id: str) -> int:
        try:
            return self._rows[pair_id]
        except KeyError:
            raise CacheError(f"pair {pair_id!r} is not in latent cache {self.folder}") from None

    def vocabulary(self) -> list[str] | None:
        return self.index.get("vocabulary")

    def _shard(self, shard: int) -> tuple:
        if shard not in self._handles:
            path = self.folder / self.index["shards"][shard]["file"]
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata()
            if meta.get("digest") != self.digest:
                raise CacheError(
                    f"{path} belongs to another cache (digest {meta.get('digest')}, index {self.digest})"
                )
            weights = json.loads(meta.get("weights", "null"))  # caches written before weights: none
            mapped = set(json.loads(meta.get("weight_map_rows", "[]")))
            self._handles[shard] = (
                handle,
                json.loads(meta["prompt_slots"]),
                json.loads(meta["prompts"]),
                weights,
                mapped,
            )
        return self._handles[shard]

    def __getitem__(self, i: int) -> CachedPair:
        if not 0 <= i < len(self.ids):
            raise IndexError(f"pair {i} out of range [0, {len(self.ids)})")
        shard = bisect.bisect_right(self._starts, i) - 1
        row = i - self._starts[shard]
        handle, slots, prompts, weights, mapped = self._shard(shard)
        slot = slots[row]
        cond = {key: handle.get_tensor(f"prompt/{slot}/{key}") for key in self.index["shapes"]["cond"]}

        def get(name):
            return handle.get_tensor(f"{row}/{name}") if self.posterior or name.endswith("mean") else None

        return CachedPair(
            self.ids[i],
            prompts[slot],
            get("winner_mean"),
            get("loser_mean"),
            get("winner_logvar"),
            get("loser_logvar"),
            cond,
            weights[row] if weights is not None else 1.0,
            handle.get_tensor(f"{row}/weight_map") if row in mapped else None,
        )

    def empty_cond(self) -> dict[str, torch.Tensor]:
        """The empty prompt's conditioning, for caption dropout."""
        path = self.folder / EMPTY_PROMPT
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    def __getstate__(self) -> dict:  # open files do not travel to loader workers
        return {**self.__dict__, "_handles": {}}
