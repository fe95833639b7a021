"""reference.mode=precomputed: e_ref read from a table that `vipo score-reference` wrote, by pair
id and epoch, so a run holds no reference model at all.

    vipo score-reference RECIPE --epochs E        e_ref of every cached pair for epochs 0..E-1

The table is exact only because a step from the latent cache draws its inputs from the counter
RNG (engine/noise.py): the posterior sample, caption dropout, eps and t of a pair are functions of
(train.seed, pair id, epoch), so the scoring pass re-makes the very inputs the trainer will see.

    FOLDER/reference/               (or reference.table)
      index.json                    fingerprint, noise probe, complete flags per epoch and shard
      errors-e0000-s00000.safetensors   ref_err [n, 2] float64 (winner, loser) and t [n] of cache shard 0

Scoring splits its shards over RANK / WORLD_SIZE and resumes like the cache does.
"""

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

from vipo.kernels import sample_errors
from vipo.loaders.atomic import (
    describe_differences,
    digest_of,
    header,
    plain_json,
    read_json,
    remove_partials,
    save_atomic,
    write_json_atomic,
)
from vipo.loaders.cache import LatentCache

from ..config import ConfigError
from ..data.cache import CacheBatchSource, model_identity, open_cache
from ..errors import RunError
from ..noise import NOISE_VERSION, batch_noise, noise_probe, probe_matches
from ..objectives import element_weights

log = logging.getLogger(__name__)

TABLE_FORMAT = "vipo-reference-table/1"


def reference_fingerprint(cfg, cache: LatentCache) -> dict:
    """The reference weights and every input of its pass: a table is valid for runs that agree."""
    init_from = cfg.model.init_from
    return plain_json(
        {
            **model_identity(cfg),
            "cache": cache.digest,
            "noise": NOISE_VERSION,
            "train.seed": cfg.train.seed,
            "model.init_from": str(Path(init_from).resolve()) if init_from else None,
            "data.caption_dropout": cfg.data.caption_dropout,
            "train.mixed_precision": cfg.train.mixed_precision,
        }
    )


def table_folder(cfg) -> Path:
    return Path(cfg.reference.table) if cfg.reference.table else Path(cfg.data.cache) / "reference"


def table_file(epoch: int, shard: int) -> str:
    return f"errors-e{epoch:04d}-s{shard:05d}.safetensors"


def build_frozen_adapter(cfg, device: torch.device, vocabulary):
    """The model as the trainer builds it before any step, frozen: its denoiser is the reference."""
    from ..models import build_adapter

    return build_adapter(cfg.model, device, seed=cfg.train.seed, trainable=False, vocabulary=vocabulary)


def epochs_needed(cfg, num_pairs: int) -> int:
    """Epochs a run of the recipe touches, on any number of processes: `train.batch_pairs` is the
    global micro-batch, and PairSampler drops each epoch's last partial batch."""
    per_epoch = num_pairs // cfg.train.batch_pairs
    if per_epoch < 1:
        raise ConfigError(f"{num_pairs} cached pairs cannot fill a batch of {cfg.train.batch_pairs}")
    return max(1, math.ceil(cfg.train.max_steps * cfg.train.grad_accum_steps / per_epoch))


def _table_is_whole(path: Path, digest: str, ids: list[str]) -> bool:
    meta = header(path)
    return meta is not None and meta.get("digest") == digest and json.loads(meta.get("ids", "[]")) == ids


def _start_table(folder: Path, fingerprint: dict, probe: dict, shards: int) -> dict:
    index = read_json(folder / "index.json")
    if index is None:
        index = {
            "format": TABLE_FORMAT,
            "fingerprint": fingerprint,
            "digest": digest_of(fingerprint),
            "probe": probe,
            "shards": shards,
            "epochs": {},
        }
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "index.json", index)
    elif index.get("fingerprint") != fingerprint:
        raise RunError(
            f"reference table {folder} was scored for another run "
            f"({describe_differences(index.get('fingerprint', {}), fingerprint)}); "
            "set reference.table to another folder or delete this one"
        )
    return index


def _shard_ids(cache: LatentCache, shard: int) -> list[str]:
    entry = cache.index["shards"][shard]
    return cache.ids[entry["first"] : entry["first"] + entry["count"]]


def _finalize_table(folder: Path, cache: LatentCache, epochs: list[int]) -> dict:
    """Turn on the complete flags of whole table files (flags only ever turn true)."""
    index = read_json(folder / "index.json")
    for epoch in epochs:
        flags = index["epochs"].setdefault(str(epoch), [False] * index["shards"])
        for shard, done in enumerate(flags):
            if not done:
                flags[shard] = _table_is_whole(
                    folder / table_file(epoch, shard), index["digest"], _shard_ids(cache, shard)
                )
    write_json_atomic(folder / "index.json", index)
    return index


def score_reference(
    cfg,
    epochs: int,
    *,
    batch_pairs: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    progress: bool = True,
) -> dict:
    """e_ref (winner, loser) of every cached pair for epochs [0, epochs), at the counter-RNG
    inputs of (train.seed, id, epoch): this rank's shards r, r + w, ... of each epoch."""
    from tqdm import tqdm

    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    device = device or torch.device("cpu")
    cache = open_cache(cfg)
    folder = table_folder(cfg)
    adapter = build_frozen_adapter(cfg, device, cache.vocabulary())
    fingerprint = reference_fingerprint(cfg, cache)
    seed = cfg.train.seed
    probe = noise_probe(adapter, cache.index["shapes"]["latents"][0], seed)
    index = _start_table(folder, fingerprint, probe, len(cache.index["shards"]))
    if not probe_matches(index["probe"], probe):
        raise RunError(
            f"reference table {folder}: this machine's noise draws differ from the table's (probe)"
        )
    source = CacheBatchSource(cache, seed, cfg.data.caption_dropout, device, dtype=adapter.dtype)
    batch_pairs = batch_pairs or cfg.train.batch_pairs
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    jobs = [(e, s) for e in range(epochs) for s in range(rank, len(cache.index["shards"]), world_size)]
    kept, written = [], []
    with tqdm(
        total=len(jobs),
        desc=f"score-reference rank {rank}/{world_size}",
        unit="shard",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for epoch, shard in jobs:
            path, ids = folder / table_file(epoch, shard), _shard_ids(cache, shard)
            if _table_is_whole(path, index["digest"], ids):
                kept.append(path.name)
                bar.update(1)
                continue
            remove_partials(path)
            first = cache.index["shards"][shard]["first"]
            errors, timesteps = [], []
            for start in range(0, len(ids), batch_pairs):
                pairs = [cache[first + i] for i in range(start, min(start + batch_pairs, len(ids)))]
                for run in _same_shape_runs(pairs):
                    batch = source.from_pairs(run, epoch)
                    x_t, t, target = batch_noise(adapter, batch.latents, batch.ids, seed, epoch)
                    weights = element_weights(batch, batch.latents)
                    with torch.no_grad(), autocast:
                        pred = adapter.predict(adapter.network, x_t, t, batch.cond)
                        err = sample_errors(pred, target, weights)
                    # float64 as sample_errors gives them: the step subtracts a nearly equal policy error.
                    errors.append(torch.stack([err[: batch.pairs], err[batch.pairs :]], dim=1).double().cpu())
                    timesteps.append(t[: batch.pairs].float().cpu())
            tensors = {"ref_err": torch.cat(errors), "t": torch.cat(timesteps)}
            save_atomic(
                tensors, path, {"format": TABLE_FORMAT, "digest": index["digest"], "ids": json.dumps(ids)}
            )
            written.append(path.name)
            bar.update(1)
    index = _finalize_table(folder, cache, list(range(epochs)))
    log.info("reference table %s: wrote %d files, kept %d finished ones", folder, len(written), len(kept))
    complete = [
        int(e) for e, flags in sorted(index["epochs"].items(), key=lambda kv: int(kv[0])) if all(flags)
    ]
    return {
        "folder": str(folder),
        "written": written,
        "kept": kept,
        "complete_epochs": complete,
        "rank": rank,
        "world_size": world_size,
    }


def _same_shape_runs(pairs: list) -> list[list]:
    runs: list[list] = []
    for pair in pairs:
        if runs and runs[-1][0].winner_mean.shape == pair.winner_mean.shape:
            runs[-1].append(pair)
        else:
            runs.append([pair])
    return runs


class ReferenceTable:
    """The e_ref of `vipo score-reference`, in memory: [pairs, epochs, 2] float32 (a million pairs
    over ten epochs is 80 MB), looked up by pair ids and epoch."""

    def __init__(self, folder: Path, cache: LatentCache, errors: dict[int, torch.Tensor]):
        self.folder, self.cache, self.errors = folder, cache, errors

    @classmethod
    def open(cls, cfg, adapter) -> "ReferenceTable":
        if cfg is None:
            raise ValueError("reference.mode=precomputed needs the run config to find its table")
        cache = open_cache(cfg)
        folder = table_folder(cfg)
        index = read_json(folder / "index.json")
        if index is None or index.get("format") != TABLE_FORMAT:
            raise RunError(
                f"no reference table in {folder}: run `vipo score-reference RECIPE` first "
                "(reference.mode=precomputed reads it)"
            )
        fingerprint = reference_fingerprint(cfg, cache)
        if index["fingerprint"] != fingerprint:
            raise RunError(
                f"reference table {folder} was scored for another run "
                f"({describe_differences(index['fingerprint'], fingerprint)}); rerun `vipo score-reference`"
            )
        probe = noise_probe(adapter, index["probe"]["shape"], cfg.train.seed)
        if not probe_matches(index["probe"], probe):
            raise RunError(
                f"reference table {folder}: the noise this run draws differs from the scored one "
                f"(probe {index['probe']} vs {probe}); rescore with this torch/numpy"
            )
        errors = {}
        for epoch, flags in index["epochs"].items():
            paths = [folder / table_file(int(epoch), s) for s in range(index["shards"])]
            if not all(flags) and not all(
                _table_is_whole(p, index["digest"], _shard_ids(cache, s)) for s, p in enumerate(paths)
            ):
                continue  # an unfinished epoch: a lookup of it says so
            errors[int(epoch)] = torch.cat([_load_table_file(p) for p in paths])
        return cls(folder, cache, errors)

    def lookup(self, ids: list[str], epoch: int) -> torch.Tensor:
        """e_ref [2B] for B pairs: winners' errors, then losers'."""
        if epoch not in self.errors:
            have = ", ".join(map(str, sorted(self.errors))) or "none"
            raise RunError(
                f"reference table {self.folder} has no complete epoch {epoch} (complete: {have}); "
                f"run `vipo score-reference RECIPE --epochs {epoch + 1}`"
            )
        rows = torch.tensor([self.cache.index_of(i) for i in ids])
        values = self.errors[epoch][rows]
        return torch.cat([values[:, 0], values[:, 1]])


def _load_table_file(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["ref_err"]


def open_reference_table(cfg, adapter) -> ReferenceTable:
    return ReferenceTable.open(cfg, adapter)


class PrecomputedReference:
    """e_ref read from the table `vipo score-reference` wrote, by pair id and epoch: no reference
    forward and no second model in memory. Exact because a step from the latent cache draws its
    inputs (posterior sample, dropout, eps, t) from engine/noise.py's counter RNG, which the
    scoring pass re-made."""

    mode = "precomputed"

    def __init__(self, adapter, table):
        self.adapter = adapter
        self.table = table

    @classmethod
    def from_config(cls, cfg, adapter) -> "PrecomputedReference":
        table = ReferenceTable.open(cfg, adapter)
        # At start-up, not at the first step of a missing epoch (hours in, with no checkpoint).
        needed = epochs_needed(cfg, len(table.cache))
        missing = [e for e in range(needed) if e not in table.errors]
        if missing:
            have = ", ".join(map(str, sorted(table.errors))) or "none"
            raise RunError(
                f"reference table {table.folder} lacks epoch {missing[0]} of the {needed} this run's "
                f"{cfg.train.max_steps} steps go through (complete epochs: {have}); run "
                f"`vipo score-reference RECIPE --epochs {needed}` (it keeps the finished ones)"
            )
        return cls(adapter, table)

    def errors(self, x_t, t, cond, target, *, ids=None, epoch=None, elem_weight=None) -> torch.Tensor:
        """e_ref [2B] (winners, then losers) of the B pairs `ids` in `epoch`. `elem_weight` is the
        cached weight maps', which the scoring pass read from the same cache."""
        if ids is None or epoch is None:
            raise RunError(
                "reference.mode=precomputed looks e_ref up by pair id and epoch: train from a latent "
                "cache (data.cache) so that steps draw the scored noise"
            )
        return self.table.lookup(ids, epoch).to(self.adapter.device, non_blocking=True)


def cmd_score_reference(args: argparse.Namespace) -> int:
    from ..cli import load_recipe
    from ..parallel import device_from_env, world_from_env

    cfg = load_recipe(args.recipe, args.overrides)
    rank, world_size = world_from_env()
    epochs = args.epochs
    if epochs is None:
        epochs = epochs_needed(cfg, len(open_cache(cfg)))
        print(
            f"scoring {epochs} epochs: what the recipe's train.max_steps needs (more: pass --epochs)",
            file=sys.stderr,
        )
    summary = score_reference(
        cfg,
        epochs,
        batch_pairs=args.batch_pairs,
        rank=rank,
        world_size=world_size,
        device=device_from_env(cfg.train.device),
        progress=not args.quiet,
    )
    complete = summary["complete_epochs"]  # epoch numbers count from 0
    done = f"{len(complete)} epoch{'' if len(complete) == 1 else 's'} complete"
    if complete:
        done += f" (epoch{'' if len(complete) == 1 else 's'} {', '.join(map(str, complete))})"
    print(
        f"rank {rank}/{world_size}: wrote {len(summary['written'])} table files, "
        f"kept {len(summary['kept'])}; table {summary['folder']}: {done}"
    )
    return 0
