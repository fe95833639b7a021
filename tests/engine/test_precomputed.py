"""The counter-based noise, the reference-error table and reference.mode=precomputed: a run that
reads e_ref from the table trains exactly like one that runs a frozen copy."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from vipo.engine.cli import main
from vipo.engine.config import ConfigError, load_config
from vipo.engine.data.cache import CacheBatchSource, open_cache, run_cache
from vipo.engine.errors import RunError
from vipo.engine.models import build_model
from vipo.engine.noise import CounterNoise, batch_noise, caption_dropout, gaussian, sample_key
from vipo.engine.objectives import LatentPairBatch, forward_loss
from vipo.engine.reference import CopyReference, build_reference
from vipo.engine.reference.precomputed import (
    PrecomputedReference,
    build_frozen_adapter,
    epochs_needed,
    open_reference_table,
    score_reference,
    table_file,
)
from vipo.engine.trainer import Trainer
from vipo.loaders.sampler import PairSampler

from vipo_testing import assert_close

CPU = torch.device("cpu")
SEED = 3


def run_config(tmp_path, *overrides):
    return load_config(
        None,
        [
            "model.config=sd15-tiny",
            "data.num_pairs=10",
            "data.resolution=16",
            "data.caption_dropout=0.5",
            "train.batch_pairs=2",
            "train.max_steps=6",
            "train.log_every_steps=1",
            f"train.seed={SEED}",
            "loss.beta=500",
            "loss.alpha=2",
            "optim.lr=1e-4",
            f"train.output_dir={tmp_path / 'run'}",
            f"data.cache={tmp_path / 'cache'}",
            *overrides,
        ],
    )


def cached_and_scored(tmp_path, epochs=2, *overrides):
    cfg = run_config(tmp_path, *overrides)
    run_cache(cfg, pairs_per_shard=4, progress=False)
    score_reference(cfg, epochs, progress=False)
    return cfg


# -- the counter RNG ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_noise_is_a_pure_function_of_seed_id_and_epoch(family):
    cfg = load_config(None, [f"model.family={family}", f"model.config={family}-tiny"])
    adapter = build_model(cfg.model, CPU)
    latents = torch.randn(8, 3, 16, 16)
    ids = ["pair-a", "pair-b", "pair-c", "pair-d"]
    x_t, t, target = batch_noise(adapter, latents, ids, 0, 3)
    again = batch_noise(adapter, latents, ids, 0, 3)
    assert all(torch.equal(a, b) for a, b in zip((x_t, t, target), again, strict=True))

    eps = target if family == "sd15" else target + latents  # flow target = eps - x0
    assert torch.equal(t[:4], t[4:]) and torch.allclose(eps[:4], eps[4:], atol=1e-6)  # winner and loser share
    if family == "sd15":
        assert not t.is_floating_point() and bool(((t >= 0) & (t < 1000)).all())  # DDPM step indices
    else:
        assert t.is_floating_point() and bool(((t > 0) & (t < 1)).all())  # flow-matching t

    # Any batch: a pair draws the same noise wherever it lands.
    rows = [2, 0, 6, 4]
    shuffled = batch_noise(adapter, latents[rows], ["pair-c", "pair-a"], 0, 3)
    assert all(torch.equal(a[rows], b) for a, b in zip((x_t, t, target), shuffled, strict=True))

    for other_seed, other_epoch in ((0, 4), (1, 3)):  # a new epoch or seed: new noise and timesteps
        _, other_t, other_target = batch_noise(adapter, latents, ids, other_seed, other_epoch)
        other_eps = other_target if family == "sd15" else other_target + latents
        assert all(not torch.allclose(eps[i], other_eps[i]) for i in range(4))
        assert not torch.equal(t, other_t)


def test_timesteps_come_from_the_adapters_schedule():
    adapter = build_model(load_config(None, ["model.family=sd3", "model.config=sd3-tiny"]).model, CPU)
    calls = []
    original = adapter.sample_timesteps

    def recording(n, generator):
        calls.append((n, generator.device.type))
        return original(n, generator)

    adapter.sample_timesteps = recording
    batch_noise(adapter, torch.zeros(6, 3, 16, 16), ["x", "y", "z"], 0, 0)
    assert calls == [(1, "cpu")] * 3


def test_draws_are_standard_normal_and_keys_are_128_bits():
    values = gaussian(0, "some-id", 0, "noise", (20000,))
    assert abs(values.mean().item()) < 0.03 and abs(values.std().item() - 1) < 0.03
    keys = {sample_key(0, f"id-{i}", epoch, "noise") for i in range(200) for epoch in range(5)}
    assert len(keys) == 1000 and max(keys) >= 2**64  # distinct, and wider than torch's 32-bit CPU seeds
    assert sample_key(0, "a", 0, "noise") != sample_key(0, "a", 0, "latent")


def test_caption_dropout_is_drawn_once_per_pair_and_epoch():
    ids = [f"pair-{i}" for i in range(2000)]
    drops = caption_dropout(ids, 0, 0, 0.3)
    assert drops == caption_dropout(ids, 0, 0, 0.3)
    assert 0.25 < sum(drops) / len(ids) < 0.35
    assert drops != caption_dropout(ids, 0, 1, 0.3)
    assert not any(caption_dropout(ids, 0, 0, 0.0))


# -- the reference-error table -----------------------------------------------------------------


def test_reference_table_equals_a_fresh_reference_forward(tmp_path):
    cfg = cached_and_scored(tmp_path)
    cache = open_cache(cfg)
    adapter = build_frozen_adapter(cfg, CPU, cache.vocabulary())
    reference = CopyReference(adapter)
    table = open_reference_table(cfg, adapter)
    batches = CacheBatchSource(cache, SEED, cfg.data.caption_dropout, CPU)
    assert any(caption_dropout(cache.ids, SEED, 0, 0.5)) and not all(caption_dropout(cache.ids, SEED, 0, 0.5))
    looked_up = {}
    for epoch in (0, 1):
        batch = batches.batch([7, 2, 5], epoch)  # not the batches the scoring pass ran
        x_t, t, target = batch_noise(adapter, batch.latents, batch.ids, SEED, epoch)
        fresh = reference.errors(x_t, t, batch.cond, target)
        looked_up[epoch] = table.lookup(batch.ids, epoch)
        assert_close(looked_up[epoch], fresh, atol=1e-7, rtol=1e-5, name=f"e_ref epoch {epoch}")
        stored = load_file(str(tmp_path / "cache" / "reference" / table_file(epoch, 0)))
        first = batches.batch([0, 1, 2, 3], epoch)
        _, first_t, _ = batch_noise(adapter, first.latents, first.ids, SEED, epoch)
        assert torch.equal(stored["t"], first_t[:4].float())
    assert not torch.allclose(looked_up[0], looked_up[1])


def test_score_reference_resumes_and_refuses_a_table_of_another_run(tmp_path):
    cfg = run_config(tmp_path)
    run_cache(cfg, pairs_per_shard=4, progress=False)
    first = score_reference(cfg, 1, progress=False)
    assert first["written"] == [table_file(0, s) for s in range(3)] and first["complete_epochs"] == [0]
    folder = tmp_path / "cache" / "reference"
    kept_state = (folder / table_file(0, 0)).stat().st_mtime_ns, (folder / table_file(0, 0)).read_bytes()
    (folder / table_file(0, 1)).unlink()
    (folder / f"{table_file(0, 1)}.tmp.123").write_bytes(b"partial")

    second = score_reference(cfg, 2, progress=False)
    assert second["kept"] == [table_file(0, 0), table_file(0, 2)]
    assert second["written"] == [table_file(0, 1), *(table_file(1, s) for s in range(3))]
    assert second["complete_epochs"] == [0, 1] and not list(folder.glob("*.tmp.*"))
    assert (
        (folder / table_file(0, 0)).stat().st_mtime_ns,
        (folder / table_file(0, 0)).read_bytes(),
    ) == kept_state

    adapter = build_frozen_adapter(cfg, CPU, open_cache(cfg).vocabulary())
    table = open_reference_table(cfg, adapter)
    with pytest.raises(RunError, match=r"no complete epoch 5 \(complete: 0, 1\).*--epochs 6"):
        table.lookup(open_cache(cfg).ids[:2], 5)
    other = run_config(tmp_path, "train.mixed_precision=bf16")
    with pytest.raises(RunError, match="train.mixed_precision: cache has 'no', this run 'bf16'"):
        open_reference_table(other, adapter)
    with pytest.raises(RunError, match="scored for another run"):
        score_reference(other, 1, progress=False)
    with pytest.raises(ConfigError, match="data.cache is not set"):
        build_reference("precomputed", adapter, run_config(tmp_path, "data.cache=null"))
    with pytest.raises(RunError, match="train from a latent cache"):
        PrecomputedReference(adapter, table).errors(None, None, None, None)


# -- training with the table -------------------------------------------------------------------


def cached_trainer(cfg, mode) -> Trainer:
    """A trainer on the latent cache (data.cache is set) with the given reference mode."""
    trainer = Trainer(
        dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference, mode=mode)), progress=False
    )
    assert isinstance(trainer.next_batch(), LatentPairBatch)
    trainer.batches.load_state_dict(
        PairSampler(len(trainer.data), trainer.sampler.batch_size, cfg.train.seed).state_dict()
    )  # back to the start
    return trainer


@pytest.mark.slow
def test_training_with_the_precomputed_reference_matches_the_copy_reference(tmp_path, monkeypatch):
    cfg = cached_and_scored(tmp_path)
    assert epochs_needed(cfg, 10) == 2  # 6 steps of 2 pairs over 5 batches per epoch
    curves = {}
    for mode in ("copy", "precomputed"):
        trainer = cached_trainer(cfg, mode)
        if mode == "precomputed":  # no second model: the reference holds a table, no weights
            assert not any(isinstance(v, torch.nn.Module) for v in vars(trainer.reference).values())
        steps = [trainer.train_step() for _ in range(cfg.train.max_steps)]
        assert trainer.sampler.epoch == 1  # the run crossed into the second scored epoch
        curves[mode] = {
            key: torch.stack([s[key] for s in steps]) for key in ("loss", "e_ref_w", "e_ref_l", "e_pol_w")
        }
    for key, copy_curve in curves["copy"].items():
        assert_close(curves["precomputed"][key], copy_curve, atol=1e-6, rtol=1e-5, name=key)

    # Stopped after 3 steps and resumed from the checkpoint: the same draws, the same curve.
    first = cached_trainer(cfg, "precomputed")
    resumed_losses = [first.train_step()["loss"] for _ in range(3)]
    first.save()
    second = cached_trainer(cfg, "precomputed")
    assert second.resume() and second.step == 3
    resumed_losses += [second.train_step()["loss"] for _ in range(3)]
    assert_close(
        torch.stack(resumed_losses), curves["precomputed"]["loss"], atol=1e-6, rtol=1e-5, name="resumed"
    )
    assert len(set(curves["copy"]["loss"].tolist())) == cfg.train.max_steps  # the steps did differ
    assert not torch.allclose(curves["copy"]["e_pol_w"], curves["copy"]["e_ref_w"])  # and the policy moved


def test_a_table_with_fewer_epochs_than_the_run_needs_is_refused_at_start(tmp_path):
    cfg = cached_and_scored(tmp_path, 1)  # 6 steps of 2 pairs over 5 batches per epoch: 2 needed
    with pytest.raises(
        RunError,
        match=r"lacks epoch 1 of the 2 .*complete epochs: 0\); run `vipo score-reference RECIPE --epochs 2`",
    ):
        cached_trainer(cfg, "precomputed")
    score_reference(cfg, 2, progress=False)  # the finished epoch is kept, the second one added
    assert cached_trainer(cfg, "precomputed").reference.table.errors.keys() == {0, 1}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_a_cached_run_frees_its_encoders_and_feeds_the_denoisers_dtype(tmp_path, param_dtype):
    cfg = run_config(tmp_path, f"model.param_dtype={param_dtype}", "train.max_steps=1")
    run_cache(cfg, pairs_per_shard=4, progress=False)
    with Trainer(cfg, progress=False) as trainer:
        batch = trainer.next_batch()
        assert batch.latents.dtype == trainer.adapter.dtype == getattr(torch, param_dtype)
        assert torch.isfinite(trainer.train_step()["loss"])
        with pytest.raises(RunError, match="text_encoder was freed: this run trains from the latent cache"):
            trainer.adapter.encode_prompts(["a red square"])
        assert not isinstance(trainer.adapter.text_encoder, torch.nn.Module)  # its memory is free


def test_sft_from_the_cache_draws_counter_noise(tmp_path):
    cfg = run_config(tmp_path, "loss.objective=sft", "data.caption_dropout=0")
    run_cache(cfg, pairs_per_shard=4, progress=False)
    cache = open_cache(cfg)
    adapter = build_frozen_adapter(cfg, CPU, cache.vocabulary())
    batch = CacheBatchSource(cache, SEED, 0.0, CPU).batch([1, 4], 0)
    noise = CounterNoise(SEED)
    loss, metrics = forward_loss("sft", adapter, adapter.network, None, batch, noise, cfg.loss)
    again, _ = forward_loss("sft", adapter, adapter.network, None, batch, noise, cfg.loss)
    both = dataclasses.replace(cfg.loss, winners_only=False)
    loss_both, _ = forward_loss("sft", adapter, adapter.network, None, batch, noise, both)
    assert torch.isfinite(loss) and torch.equal(loss, again) and not torch.equal(loss, loss_both)


# -- the commands ------------------------------------------------------------------------------


def test_cache_and_score_reference_commands(tmp_path, monkeypatch, capsys):
    args = [
        "tiny-sd15-poly",
        "data.num_pairs=6",
        f"data.cache={tmp_path / 'cache'}",
        "train.batch_pairs=2",
        "train.max_steps=4",
    ]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["cache", *args, "--pairs-per-shard", "2", "-q"]) == 0
    assert "rank 0/2: wrote 2 shards" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    assert main(["cache", *args, "--pairs-per-shard", "2", "-q"]) == 0
    assert (
        "wrote 1 shards (0 bad pairs left out), kept 0 finished ones" in (out := capsys.readouterr().out)
        and "is complete" in out
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert main(["score-reference", *args, "-q"]) == 0
    captured = capsys.readouterr()
    assert "scoring 2 epochs" in captured.err and ": 2 epochs complete (epochs 0, 1)" in captured.out
    assert main(["score-reference", "tiny-sd15-poly", "-q"]) == 2
    assert "data.cache is not set" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "3")
    assert main(["cache", *args, "-q"]) == 2
    assert "RANK 3 is outside WORLD_SIZE 1" in capsys.readouterr().err
