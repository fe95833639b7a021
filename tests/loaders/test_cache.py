"""The latent cache: round trip against a fresh encode, posterior sampling, resume after a crash,
the split over ranks, and refusing a cache of another model or data set."""

import json

import pytest
import torch
from safetensors import safe_open

from vipo.engine.config import load_config
from vipo.engine.data.cache import CacheBatchSource, cache_fingerprint, open_cache, run_cache
from vipo.engine.errors import RunError
from vipo.engine.noise import posterior_noise
from vipo.engine.reference.precomputed import build_frozen_adapter
from vipo.engine.trainer import build_data
from vipo.loaders.cache import CacheError, LatentCache, to_pixels, write_cache

from vipo_testing import assert_close

CPU = torch.device("cpu")


def tiny_config(tmp_path, *overrides, family="sd15"):
    return load_config(
        None,
        [
            f"model.family={family}",
            f"model.config={family}-tiny",
            "data.num_pairs=10",
            "data.resolution=16",
            "train.batch_pairs=2",
            f"data.cache={tmp_path / 'cache'}",
            *overrides,
        ],
    )


def shard_files(folder):
    return sorted(p.name for p in folder.glob("shard-*.safetensors"))


def shard_contents(path):
    """Tensors (copied out of the file mapping) and metadata: safetensors orders its header
    differently from write to write, so bytes cannot be compared."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).clone() for key in handle.keys()}, handle.metadata()


def file_state(path):
    stat = path.stat()
    return stat.st_mtime_ns, path.read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_latents_and_embeddings_equal_a_fresh_encode(tmp_path, dtype):
    cfg = tiny_config(tmp_path)
    summary = run_cache(cfg, pairs_per_shard=4, dtype=dtype, progress=False)
    assert summary["complete"] and summary["written"] == shard_files(tmp_path / "cache")
    assert len(summary["written"]) == 3  # 4 + 4 + 2 pairs
    source = build_data(cfg.data, cfg.train.seed)
    adapter = build_frozen_adapter(cfg, CPU, source.vocabulary())
    cache = open_cache(cfg)
    assert cache.ids == [source[i].id for i in range(len(source))]
    assert not cache.posterior  # sd15-tiny works in pixel space: the latents are exact
    stored = getattr(torch, dtype)
    for i in (0, 5, 9):
        record, pair = source[i], cache[i]
        fresh = adapter.encode_pixels(to_pixels([record.winner, record.loser]))
        assert pair.winner_mean.dtype == stored and pair.winner_logvar is None
        assert torch.equal(pair.winner_mean, fresh[0].to(stored))
        assert torch.equal(pair.loser_mean, fresh[1].to(stored))
        cond = adapter.encode_prompts([record.prompt])
        assert pair.prompt == record.prompt and set(pair.cond) == set(cond)
        for key, value in cond.items():
            assert torch.equal(pair.cond[key], value[0].to(stored)), key
    empty = adapter.encode_prompts([""])
    assert all(torch.equal(cache.empty_cond()[k], v[0].to(stored)) for k, v in empty.items())
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["complete"] and all(s["complete"] for s in index["shards"])
    assert index["shapes"] == {"latents": [[3, 16, 16]], "cond": {"encoder_hidden_states": [16, 32]}}
    assert index["fingerprint"] == cache_fingerprint(cfg)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_vae_posteriors_are_stored_in_latent_space_and_sampled_reproducibly(tmp_path, family):
    """FLUX shifts and scales its latents, Wan normalises them per channel: the cached mean is
    what encode_pixels returns, and a cached sample is the VAE's posterior sample, transformed."""
    cfg = tiny_config(tmp_path, "data.num_pairs=4", family=family)
    run_cache(cfg, pairs_per_shard=4, dtype="float32", progress=False)
    source = build_data(cfg.data, cfg.train.seed)
    adapter = build_frozen_adapter(cfg, CPU, source.vocabulary())
    cache = open_cache(cfg)
    assert cache.posterior
    records = [source[i] for i in range(4)]
    pixels = to_pixels([r.winner for r in records] + [r.loser for r in records])
    means = torch.cat(
        [
            torch.stack([cache[i].winner_mean for i in range(4)]),
            torch.stack([cache[i].loser_mean for i in range(4)]),
        ]
    )
    assert_close(means, adapter.encode_pixels(pixels), atol=1e-6, rtol=1e-6, name="posterior mean")

    batches = CacheBatchSource(cache, seed=7, caption_dropout=0.0, device=CPU)
    latents = batches.batch([0, 1, 2, 3], epoch=2).latents
    ids = [r.id for r in records]
    noise = posterior_noise(ids, 7, 2, latents.shape[1:])
    vae = adapter.vae
    raw = vae.encode(pixels.unsqueeze(2) if family == "wan" else pixels).latent_dist
    sample = raw.mean + raw.std * noise  # the VAE's own sampling formula, with the counter noise
    if family == "wan":
        view = (1, -1, 1, 1, 1)
        expected = (sample - torch.tensor(vae.config.latents_mean).view(view)) / torch.tensor(
            vae.config.latents_std
        ).view(view)
    else:
        expected = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    assert_close(latents, expected, atol=1e-5, rtol=1e-5, name="posterior sample")
    assert torch.equal(batches.batch([0, 1, 2, 3], epoch=2).latents, latents)  # same (id, epoch): same draw
    assert torch.equal(batches.batch([2, 0], epoch=2).latents[[0, 2]], latents[[2, 6]])  # any batch
    assert not torch.allclose(
        batches.batch([0, 1, 2, 3], epoch=3).latents, latents
    )  # a new epoch: a new draw


def test_resume_after_a_crash_keeps_finished_shards_and_rebuilds_the_rest(tmp_path):
    cfg = tiny_config(tmp_path)
    folder = tmp_path / "cache"
    source = build_data(cfg.data, cfg.train.seed)
    encoder = build_frozen_adapter(cfg, CPU, source.vocabulary())
    fingerprint = cache_fingerprint(cfg)

    class CrashingSource:  # a decoder failure in the middle of shard 1 (pairs 4..7)
        def __len__(self):
            return len(source)

        def __getitem__(self, i):
            if i == 6:
                raise OSError("simulated crash")
            return source[i]

        def vocabulary(self):
            return source.vocabulary()

    with pytest.raises(OSError, match="simulated crash"):
        write_cache(CrashingSource(), encoder, folder, fingerprint, pairs_per_shard=4, progress=False)
    assert shard_files(folder) == ["shard-00000.safetensors"]
    with pytest.raises(CacheError, match="incomplete: 2 of 3 shards missing"):
        LatentCache(folder, fingerprint)
    finished = file_state(folder / "shard-00000.safetensors")
    (folder / "shard-00001.safetensors.tmp.999").write_bytes(b"half a shard")  # a rename that never came

    summary = write_cache(source, encoder, folder, fingerprint, pairs_per_shard=4, progress=False)
    assert summary["kept"] == ["shard-00000.safetensors"]
    assert summary["written"] == ["shard-00001.safetensors", "shard-00002.safetensors"]
    assert file_state(folder / "shard-00000.safetensors") == finished  # untouched: same mtime, same bytes
    assert not list(folder.glob("*.tmp.*"))

    # A shard damaged on disk is rebuilt with the same contents; the others stay as they are.
    before = shard_contents(folder / "shard-00002.safetensors")
    (folder / "shard-00002.safetensors").write_bytes(b"\x00" * 100)
    kept = {
        name: file_state(folder / name) for name in ("shard-00000.safetensors", "shard-00001.safetensors")
    }
    summary = write_cache(source, encoder, folder, fingerprint, pairs_per_shard=4, progress=False)
    assert summary["written"] == ["shard-00002.safetensors"] and summary["complete"]
    after = shard_contents(folder / "shard-00002.safetensors")
    assert after[1] == before[1] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][key], before[0][key]) for key in before[0])
    assert {name: file_state(folder / name) for name in kept} == kept
    assert len(LatentCache(folder, fingerprint)) == 10


def test_two_ranks_write_disjoint_shards_that_together_complete_the_cache(tmp_path):
    cfg = tiny_config(tmp_path, "data.num_pairs=14")
    first = run_cache(cfg, pairs_per_shard=3, rank=0, world_size=2, progress=False)
    assert first["written"] == [
        "shard-00000.safetensors",
        "shard-00002.safetensors",
        "shard-00004.safetensors",
    ]
    assert not first["complete"]
    with pytest.raises(RunError, match="shard-00001.safetensors, shard-00003.safetensors"):
        open_cache(cfg)
    second = run_cache(cfg, pairs_per_shard=3, rank=1, world_size=2, progress=False)
    assert second["written"] == ["shard-00001.safetensors", "shard-00003.safetensors"]
    assert second["complete"] and not set(first["written"]) & set(second["written"])
    source = build_data(cfg.data, cfg.train.seed)
    cache = open_cache(cfg)
    assert cache.ids == [source[i].id for i in range(14)]
    assert [cache.index_of(i) for i in cache.ids] == list(range(14))


def test_a_cache_of_another_model_or_data_set_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "data.num_pairs=4")
    run_cache(cfg, pairs_per_shard=4, progress=False)
    other = tiny_config(tmp_path, "data.num_pairs=4", "data.regime=noisy")
    with pytest.raises(RunError, match="data.regime: cache has 'clean', this run 'noisy'"):
        open_cache(other)
    with pytest.raises(RunError, match="another model or data set"):
        run_cache(other, pairs_per_shard=4, progress=False)
    with pytest.raises(RunError, match="pairs_per_shard=4, this run asks 2"):
        run_cache(cfg, pairs_per_shard=2, progress=False)
    # Settings of how pairs are used (caption dropout, where the cache is) do not invalidate it.
    assert len(open_cache(tiny_config(tmp_path, "data.num_pairs=4", "data.caption_dropout=0.2"))) == 4


def test_overflow_in_float16_and_missing_caches_are_clear_errors(tmp_path):
    cfg = tiny_config(tmp_path, "data.num_pairs=2")
    source = build_data(cfg.data, cfg.train.seed)

    class HugeEncoder:
        def encode_prompts(self, prompts):
            return {"hidden": torch.zeros(len(prompts), 4)}

        def encode_posterior(self, pixels):
            return pixels * 1e6, None

    with pytest.raises(
        CacheError, match=f"pair {source[0].id}: winner: values up to .* overflow torch.float16"
    ):
        write_cache(source, HugeEncoder(), tmp_path / "huge", {"k": 1}, progress=False)
    summary = write_cache(source, HugeEncoder(), tmp_path / "wide", {"k": 1}, dtype="float32", progress=False)
    assert summary["complete"]
    with pytest.raises(CacheError, match="index.json missing"):
        LatentCache(tmp_path / "nothing-here")
    with pytest.raises(CacheError, match="cache dtype must be one of"):
        write_cache(source, HugeEncoder(), tmp_path / "x", {"k": 1}, dtype="int8", progress=False)
