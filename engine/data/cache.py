"""The latent cache as training sees it: what a cache depends on (its fingerprint), how it is
opened and checked, how cached pairs become batches, and `vipo cache`, which writes it
(loaders/cache.py holds the format).

    vipo cache RECIPE data.cache=FOLDER           encode every pair once

A cached batch draws its posterior sample and caption dropout from the counter RNG of
(train.seed, pair id, epoch) (engine/noise.py), so any rank, batch or resume sees the same ones,
and a precomputed reference (engine/reference/precomputed.py) can re-make its inputs. The build
splits its shards over RANK / WORLD_SIZE and resumes: finished shards are kept.
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch

from vipo.loaders.atomic import plain_json
from vipo.loaders.cache import CacheError, LatentCache, write_cache
from vipo.loaders.images import SourceError

from ..config import ConfigError, to_dict
from ..errors import RunError
from ..noise import caption_dropout, posterior_noise
from ..objectives import LatentPairBatch

# Data keys that change how pairs are used, not what they are: the cache does not depend on them.
RUNTIME_DATA_KEYS = ("cache", "caption_dropout")


def model_identity(cfg) -> dict:
    """The model a cache (and a reference table) was made with."""
    model = cfg.model
    if model.path:
        return {"model.family": model.family, "model.path": str(Path(model.path).resolve())}
    from ..models import load_architecture

    architecture = json.dumps(load_architecture(model.config), sort_keys=True).encode()
    # Random weights: the encoders (and the reference) are made from train.seed.
    return {
        "model.family": model.family,
        "model.config": model.config,
        "model.architecture_sha256": hashlib.sha256(architecture).hexdigest()[:16],
        "train.seed": cfg.train.seed,
    }


def cache_fingerprint(cfg) -> dict:
    """The model's frozen encoders and the pair data: a cache is valid for runs that agree on these."""
    fingerprint = model_identity(cfg)
    for key, value in to_dict(cfg.data).items():
        if key not in RUNTIME_DATA_KEYS:
            fingerprint[f"data.{key}"] = value
    if cfg.data.source == "procedural":  # the pairs themselves are drawn from the seed
        fingerprint["train.seed"] = cfg.train.seed
    return plain_json(fingerprint)


def open_cache(cfg) -> LatentCache:
    """The recipe's latent cache (data.cache), checked against its model and data."""
    if not cfg.data.cache:
        raise ConfigError("data.cache is not set: name the latent cache folder (data.cache=FOLDER)")
    try:
        return LatentCache(cfg.data.cache, cache_fingerprint(cfg))
    except CacheError as err:
        raise RunError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Encoding for the cache


class CacheBatchSource:
    """Batches of cached pairs: a posterior sample per image and caption dropout per pair, both
    from the counter RNG of (seed, id, epoch), so any rank, batch or resume sees the same ones."""

    def __init__(
        self,
        cache: LatentCache,
        seed: int,
        caption_dropout: float,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        self.cache, self.seed, self.caption_dropout = cache, seed, caption_dropout
        self.device, self.dtype = torch.device(device), dtype
        self.empty = cache.empty_cond() if caption_dropout > 0 else None

    def batch(self, indices: list[int], epoch: int) -> LatentPairBatch:
        return self.from_pairs([self.cache[i] for i in indices], epoch)

    def from_pairs(self, pairs: list, epoch: int) -> LatentPairBatch:
        ids = [p.id for p in pairs]
        shapes = {tuple(p.winner_mean.shape) for p in pairs}
        if len(shapes) > 1:
            raise RunError(f"pairs {ids} mix latent shapes {sorted(shapes)}: batch them by bucket")
        latents = torch.cat(
            [torch.stack([p.winner_mean for p in pairs]), torch.stack([p.loser_mean for p in pairs])]
        ).float()
        if self.cache.posterior:
            logvar = torch.cat(
                [torch.stack([p.winner_logvar for p in pairs]), torch.stack([p.loser_logvar for p in pairs])]
            ).float()
            latents = latents + torch.exp(0.5 * logvar) * posterior_noise(
                ids, self.seed, epoch, latents.shape[1:]
            )
        drop = caption_dropout(ids, self.seed, epoch, self.caption_dropout)
        sources = [self.empty if dropped else p.cond for p, dropped in zip(pairs, drop, strict=True)]
        cond = {key: torch.stack([s[key] for s in sources]) for key in pairs[0].cond}
        move = {"device": self.device, "dtype": self.dtype, "non_blocking": True}
        weights = None
        if any(p.weight != 1.0 for p in pairs):
            weights = torch.tensor([p.weight for p in pairs], device=self.device)
        elem_weight = None
        maps = [p.weight_map for p in pairs]
        if any(m is not None for m in maps):
            like = next(m for m in maps if m is not None)
            elem_weight = torch.stack([torch.ones_like(like) if m is None else m for m in maps])
            elem_weight = elem_weight.to(self.device, non_blocking=True)
        return LatentPairBatch(
            ids,
            epoch,
            latents.to(**move),
            {k: v.to(**move) for k, v in cond.items()},
            weights=weights,
            elem_weight=elem_weight,
        )


# ---------------------------------------------------------------------------------------------
# The reference-error table


def run_cache(
    cfg,
    *,
    pairs_per_shard: int = 256,
    batch_pairs: int | None = None,
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    progress: bool = True,
) -> dict:
    """`vipo cache` without the argument parsing: this rank's share of the recipe's latent cache."""
    from ..models import build_adapter
    from . import build_source

    if not cfg.data.cache:
        raise ConfigError(
            "data.cache is not set: name the folder to write the latent cache to (data.cache=FOLDER)"
        )
    source = build_source(cfg.data, cfg.model, cfg.train.seed, batch_decode=True)
    # Built whole as the trainer builds it (random-weight encoders follow the denoiser in the seed's
    # stream), then the denoiser is dropped: encoding needs the frozen encoders only.
    adapter = build_adapter(
        cfg.model,
        device or torch.device("cpu"),
        seed=cfg.train.seed,
        trainable=False,
        vocabulary=source.vocabulary(),
    )
    adapter.network = None
    try:
        return write_cache(
            source,
            adapter,
            cfg.data.cache,
            cache_fingerprint(cfg),
            pairs_per_shard=pairs_per_shard,
            batch_pairs=batch_pairs or cfg.train.batch_pairs,
            dtype=dtype,
            rank=rank,
            world_size=world_size,
            progress=progress,
        )
    except (CacheError, SourceError) as err:  # SourceError: e.g. every pair tried is a bad file
        raise RunError(str(err)) from None


def cmd_cache(args: argparse.Namespace) -> int:
    from ..cli import load_recipe
    from ..parallel import device_from_env, world_from_env

    cfg = load_recipe(args.recipe, args.overrides)
    rank, world_size = world_from_env()
    summary = run_cache(
        cfg,
        pairs_per_shard=args.pairs_per_shard,
        batch_pairs=args.batch_pairs,
        dtype=args.dtype,
        rank=rank,
        world_size=world_size,
        device=device_from_env(cfg.train.device),
        progress=not args.quiet,
    )
    state = "complete" if summary["complete"] else "not complete yet (other ranks, or a rerun, finish it)"
    print(
        f"rank {rank}/{world_size}: wrote {len(summary['written'])} shards ({summary['skipped']} bad pairs "
        f"left out), kept {len(summary['kept'])} finished ones; cache {summary['folder']} "
        f"({summary['shards']} shards) is {state}"
    )
    return 0
