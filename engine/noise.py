"""Counter-based draws: eps, t, posterior noise and caption dropout of a sample as a pure
function of (seed, sample id, epoch).

The precomputed reference (DESIGN.md Section 3) scores e_ref offline at the (eps, t) the trainer
draws later, so a draw must not depend on the rank, on the batch a pair lands in, on the device
or on a resume. A per-rank torch.Generator cannot give that; a generator per sample can.

The generator: numpy's Philox (a counter-based bit generator) keyed by a 128-bit blake2b hash of
(seed, id, epoch, stream), run on the host. Why not torch's:
  - torch's CPU generator seeds its mt19937 with the low 32 bits of a seed only (measured on
    torch 2.13: manual_seed(1) and manual_seed(1 + 2**32) draw the same numbers); with millions
    of (id, epoch) keys, thousands of samples would share their noise;
  - CUDA's Philox kernels lay values out by the launch grid, which follows the GPU's SM count
    once a tensor passes one wave of threads (pytorch/pytorch#87992), so a table scored on one
    GPU model would not match a run on another.
numpy keeps its bit generators' streams stable across releases; a reference table also records a
probe of the stream and refuses to open where the probe no longer matches. The cost is a host
draw and a host-to-device copy of one latent per pair (measured on one CPU core: about
45 ms for a 4.8M-value Wan 720p latent, 0.5 ms for a 65K-value SDXL 1024px one).

Timesteps go through the adapter's own `sample_timesteps` (DDPM integers, logit-normal flow t,
...) with a torch CPU generator seeded from the sample's `timestep` stream, so every family keeps
its schedule; that seed's 32 effective bits can only repeat a scalar t, never the noise.

One stream per kind of draw, so that adding a draw to one never shifts another:
    noise     eps, shared by a pair's winner and loser
    timestep  t, shared by a pair's winner and loser
    latent    posterior noise: the winner's latent, then the loser's (latent cache)
    dropout   caption dropout: one uniform per pair, winner and loser alike
"""

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

NOISE_VERSION = "vipo-noise/1"  # part of every key: changing the derivation changes it
STREAMS = ("noise", "timestep", "latent", "dropout")
PROBE_ID = "vipo-noise-probe"


def sample_key(seed: int, sample_id: str, epoch: int, stream: str) -> int:
    """The 128-bit Philox key of one sample's stream."""
    if stream not in STREAMS:
        raise ValueError(f"unknown noise stream {stream!r} (known: {', '.join(STREAMS)})")
    text = f"{NOISE_VERSION}\x1f{int(seed)}\x1f{sample_id}\x1f{int(epoch)}\x1f{stream}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), "little")


def sample_rng(seed: int, sample_id: str, epoch: int, stream: str) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=sample_key(seed, sample_id, epoch, stream)))


def gaussian(seed: int, sample_id: str, epoch: int, stream: str, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal float32 values of `shape` (CPU) from one sample's stream."""
    values = sample_rng(seed, sample_id, epoch, stream).standard_normal(math.prod(shape), dtype=np.float32)
    return torch.from_numpy(values).view(tuple(shape))


def sample_timestep(adapter, seed: int, sample_id: str, epoch: int) -> torch.Tensor:
    """One training timestep [1] (CPU) from the adapter's schedule."""
    torch_seed = int(sample_rng(seed, sample_id, epoch, "timestep").integers(0, 2**63))
    return adapter.sample_timesteps(1, torch.Generator().manual_seed(torch_seed))


def pair_noise(
    adapter, shape: Sequence[int], seed: int, ids: Sequence[str], epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps [len(ids), *shape] and t [len(ids)] on the CPU, one draw per id."""
    eps = torch.stack([gaussian(seed, i, epoch, "noise", shape) for i in ids])
    t = torch.cat([sample_timestep(adapter, seed, i, epoch) for i in ids])
    return eps, t


def batch_noise(
    adapter, latents: torch.Tensor, ids: Sequence[str], seed: int, epoch: int, paired: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t, t and target for `latents`, like `adapter.noisy_inputs` but keyed by sample.

    `paired` (latents [2B, ...], winners then losers, `ids` of the B pairs): a pair's winner and
    loser share eps and t. Otherwise `ids` names every row and each row draws its own."""
    rows = latents.shape[0]
    expected = rows // 2 if paired else rows
    if len(ids) != expected or (paired and rows % 2):
        raise ValueError(f"{len(ids)} ids for {rows} latent rows (paired={paired}): expected {expected}")
    eps, t = pair_noise(adapter, latents.shape[1:], seed, ids, epoch)
    if paired:
        eps, t = torch.cat([eps, eps]), torch.cat([t, t])
    eps = eps.to(latents.device, latents.dtype, non_blocking=True)
    t = t.to(latents.device, non_blocking=True)
    x_t, target = adapter.add_noise(latents, eps, t)
    return x_t, t, target


def posterior_noise(ids: Sequence[str], seed: int, epoch: int, shape: Sequence[int]) -> torch.Tensor:
    """Noise [2B, *shape] for sampling cached posteriors: winners' rows, then losers'."""
    draws = [gaussian(seed, i, epoch, "latent", (2, *shape)) for i in ids]
    return torch.cat([torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])])


def caption_dropout(ids: Sequence[str], seed: int, epoch: int, prob: float) -> list[bool]:
    """Whether each pair's prompt is dropped this epoch (one draw per pair)."""
    if prob <= 0:
        return [False] * len(ids)
    return [bool(sample_rng(seed, i, epoch, "dropout").random() < prob) for i in ids]


def noise_probe(adapter, shape: Sequence[int], seed: int) -> dict:
    """A few values of a fixed sample's draws: stored with a reference table and compared when
    it is opened, so a changed generator or schedule is caught instead of silently mismatching."""
    eps, t = pair_noise(adapter, shape, seed, [PROBE_ID], 0)
    return {"shape": list(shape), "eps_head": eps.flatten()[:4].tolist(), "t": float(t[0])}


def probe_matches(expected: dict, actual: dict, rel: float = 1e-6) -> bool:
    values = [*expected["eps_head"], expected["t"]], [*actual["eps_head"], actual["t"]]
    return expected["shape"] == actual["shape"] and all(
        math.isclose(a, b, rel_tol=rel, abs_tol=1e-9) for a, b in zip(*values, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Noise sources: where a step's eps, t and caption dropout come from


class GeneratorNoise:
    """One torch.Generator: a process's own stream, or under `parallel.noise_draw=per_rank` a
    stream per (seed, rank), drawing this rank's rows only."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def draw(self, adapter, latents: torch.Tensor, *, ids: Sequence[str], epoch: int | None, paired: bool):
        return adapter.noisy_inputs(latents, self.generator, paired)

    def caption_dropout(self, ids: Sequence[str], epoch: int | None, prob: float) -> list[bool]:
        drop = torch.rand(len(ids), generator=self.generator, device=self.generator.device) < prob
        return drop.tolist()


class GlobalDrawNoise(GeneratorNoise):
    """`parallel.noise_draw=global`: every rank draws eps, t and dropout for the whole global
    micro-batch from the one shared stream (its latents at their global rows, zeros elsewhere)
    and keeps its own rows, so N processes consume the stream exactly as one process with the
    global batch does. Cost: the global micro-batch's noise and x_t for a moment; `per_rank`
    draws only local rows instead."""

    def __init__(self, generator: torch.Generator, rank: int, world_size: int):
        super().__init__(generator)
        self.rank, self.world_size = rank, world_size

    def _rows(self, rows: int, pairs: int) -> tuple[int, torch.Tensor]:
        """Global row count and this rank's global row indices for `rows` local rows made of
        blocks of `pairs` rows (winners only: 1 block; winners then losers: 2)."""
        blocks = max(1, rows // max(pairs, 1))
        total = pairs * self.world_size
        start = self.rank * pairs
        index = torch.cat([torch.arange(b * total + start, b * total + start + pairs) for b in range(blocks)])
        return total * blocks, index

    def draw(self, adapter, latents, *, ids, epoch, paired):
        total, index = self._rows(latents.shape[0], len(ids))
        index = index.to(latents.device)
        placed = latents.new_zeros((total, *latents.shape[1:])).index_copy_(0, index, latents)
        x_t, t, target = adapter.noisy_inputs(placed, self.generator, paired)
        return x_t[index], t[index.to(t.device)], target[index]

    def caption_dropout(self, ids, epoch, prob):
        pairs = len(ids)
        drop = (
            torch.rand(pairs * self.world_size, generator=self.generator, device=self.generator.device) < prob
        )
        return drop[self.rank * pairs : (self.rank + 1) * pairs].tolist()


class CounterNoise:
    """The counter RNG of (seed, pair id, epoch): what a step from the latent cache draws, and
    what `vipo score-reference` re-made, so a precomputed reference matches it exactly."""

    def __init__(self, seed: int):
        self.seed = seed

    def draw(self, adapter, latents, *, ids, epoch, paired):
        if not paired and latents.shape[0] == 2 * len(ids):  # both images of SFT: each draws its own
            ids = [*ids, *(f"{i}#loser" for i in ids)]
        return batch_noise(adapter, latents, ids, self.seed, epoch, paired=paired)

    def caption_dropout(self, ids, epoch, prob):
        return caption_dropout(ids, self.seed, epoch, prob)
