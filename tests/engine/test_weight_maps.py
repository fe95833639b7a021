"""Weight maps in training: they reach the kernel's elem_weight on the latent grid for the policy
and the reference alike, zero weights mean zero gradient where they lie, a map of ones is no map,
and the latent cache, the precomputed reference and context parallelism keep them."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vipo.engine.objectives as objectives
from vipo.engine.config import load_config
from vipo.engine.context_parallel import ContextParallel, loss_inputs
from vipo.engine.data.cache import CacheBatchSource, open_cache, run_cache
from vipo.engine.reference.precomputed import score_reference
from vipo.engine.trainer import Trainer
from vipo.loaders.sampler import PairSampler
from vipo.loaders.weight_maps import latent_weights

from vipo_testing import write_clips


def write_pairs(root, count, *, maps=None, weights=None, side=16):
    """`count` pairs of seeded noise images; maps: {i: array saved as .npy}; weights: {i: w}."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        line = {"prompt": f"prompt {i % 2}", "winner": f"w{i}.png", "loser": f"l{i}.png", "id": f"pair-{i}"}
        for name in (line["winner"], line["loser"]):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name)
        if maps is not None and i in maps:
            np.save(root / f"m{i}.npy", maps[i])
            line["weight_map"] = f"m{i}.npy"
        if weights is not None and i in weights:
            line["weight"] = weights[i]
        lines.append(json.dumps(line))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def run_config(tmp_path, path, *overrides):
    return load_config(
        None,
        [
            "data.source=manifest",
            f"data.path={path}",
            "data.resolution=16",
            "train.batch_pairs=2",
            "train.max_steps=2",
            "train.log_every_steps=1",
            "loss.objective=poly_dpo",
            "loss.alpha=2",
            "loss.beta=500",
            "optim.lr=1e-4",
            f"train.output_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


class LossSpy:
    """Records what the trainer hands the kernel: the policy prediction (its gradient kept) and
    elem_weight, and the elem_weight the reference was asked with."""

    def __init__(self, monkeypatch, trainer):
        self.preds, self.weights, self.ref_weights = [], [], []
        original, reference = objectives.poly_dpo_loss, trainer.reference.errors

        def loss(pred, *args, **kwargs):
            pred.retain_grad()
            self.preds.append(pred)
            self.weights.append(kwargs.get("elem_weight"))
            return original(pred, *args, **kwargs)

        def errors(*args, **kwargs):
            self.ref_weights.append(kwargs.get("elem_weight"))
            return reference(*args, **kwargs)

        monkeypatch.setattr(objectives, "poly_dpo_loss", loss)
        monkeypatch.setattr(trainer.reference, "errors", errors)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_zero_weights_over_half_the_image_give_that_half_of_the_latents_no_gradient(
    tmp_path, monkeypatch, flip
):
    half = np.ones((16, 16), np.float32)
    half[:, :8] = 0.0  # the left half of every winner weighs nothing
    path = write_pairs(tmp_path, 4, maps={i: half for i in range(4)})
    trainer = Trainer(run_config(tmp_path, path, f"data.hflip_prob={flip}"), progress=False)
    spy = LossSpy(monkeypatch, trainer)
    metrics = trainer.train_step()
    # Step 0: the reference is the policy and weighs the same elements, so every pair ties.
    assert torch.equal(metrics["e_pol_w"], metrics["e_ref_w"]) and metrics["margin"] == 0
    pred, weights = spy.preds[0], spy.weights[0]
    assert weights.shape == (4, 1) + pred.shape[-2:]  # [2B, 1, h, w] at the latent grid
    assert spy.ref_weights[0] is weights  # the reference's errors weigh the same elements
    grad, mid = pred.grad, pred.shape[-1] // 2
    dead, live = (grad[..., mid:], grad[..., :mid]) if flip else (grad[..., :mid], grad[..., mid:])
    assert torch.count_nonzero(dead) == 0  # a flip moves the zero half with the images
    assert torch.count_nonzero(live) == live.numel()


def test_a_map_of_ones_trains_exactly_like_no_map(tmp_path):
    plain = write_pairs(tmp_path, 4)
    (tmp_path / "ones").mkdir()
    ones = write_pairs(tmp_path / "ones", 4, maps={i: np.ones((8, 8)) for i in (0, 2, 3)})
    curves = {}
    for name, path in (("plain", plain), ("ones", ones)):
        with Trainer(run_config(tmp_path / name, path), progress=False) as trainer:
            assert (trainer.next_batch().weight_maps is None) == (name == "plain")
            trainer.batches.load_state_dict(PairSampler(4, 2, trainer.cfg.train.seed).state_dict())
            curves[name] = [trainer.train_step() for _ in range(3)]
    for plain_step, ones_step in zip(curves["plain"], curves["ones"], strict=True):
        for key in ("loss", "e_pol_w", "e_ref_l", "grad_norm"):
            assert torch.equal(plain_step[key], ones_step[key]), key


def test_the_latent_cache_and_the_precomputed_reference_keep_maps_and_pair_weights(tmp_path):
    rng = np.random.default_rng(1)
    maps = {i: rng.uniform(0, 2, (16, 16)).astype(np.float32) for i in (0, 1, 3)}
    path = write_pairs(tmp_path, 4, maps=maps, weights={1: 2.5, 2: 0.5})
    cfg = run_config(tmp_path, path, f"data.cache={tmp_path / 'cache'}", "data.hflip_prob=0.5")
    run_cache(cfg, pairs_per_shard=2, dtype="float32", progress=False)
    cache = open_cache(cfg)
    source = CacheBatchSource(cache, cfg.train.seed, 0.0, torch.device("cpu"))
    batch = source.batch([0, 1, 2, 3], 0)
    assert batch.weights.tolist() == [1.0, 2.5, 0.5, 1.0]
    records = Trainer(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=None)), progress=False
    )
    expected = latent_weights([records.data[i].weight_map for i in range(4)], batch.latents.shape)
    assert torch.equal(batch.elem_weight, expected) and torch.equal(
        batch.elem_weight[2], torch.ones_like(expected[2])
    )

    score_reference(cfg, 1, progress=False)
    steps = {}
    for mode in ("copy", "precomputed"):
        run = dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference, mode=mode))
        with Trainer(run, progress=False) as trainer:
            steps[mode] = trainer.train_step()
    for key in ("loss", "e_ref_w", "e_ref_l"):  # scored with the maps the copy reference uses
        torch.testing.assert_close(steps["precomputed"][key], steps["copy"][key], atol=1e-6, rtol=1e-5)


def test_frame_weights_reach_the_latent_frames_of_a_video_pair(tmp_path, monkeypatch):
    """Wan's causal VAE keeps frame 0 alone and folds runs of r frames (4 in Wan2.1, 2 in the tiny
    config: 5 frames -> 3 latent frames): zero weights on frames 1-4 leave latent frames 1 and 2
    without gradient."""
    # One weight per stored frame (6); frames 0-4 are sampled.
    path = write_clips(tmp_path, 2, frame_weights=[1.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    cfg = run_config(
        tmp_path,
        path,
        "model.family=wan",
        "model.config=wan-tiny",
        "data.source=video",
        "data.num_frames=5",
        "data.video_backend=pyav",
    )
    trainer = Trainer(cfg, progress=False)
    spy = LossSpy(monkeypatch, trainer)
    trainer.train_step()
    pred = spy.preds[0]
    assert pred.shape[2] == 3 and spy.weights[0].flatten().tolist() == [1.0, 0.0, 0.0] * 4
    assert torch.count_nonzero(pred.grad[:, :, 1:]) == 0 and torch.count_nonzero(pred.grad[:, :, 0]) > 0


@pytest.mark.parametrize(
    "family, shape, weight_shape",
    [("wan", (4, 3, 2, 4, 6), (4, 1, 2, 1, 1)), ("flux", (4, 3, 4, 6), (4, 1, 4, 6))],
)
def test_context_parallel_shards_split_the_weighted_errors_exactly(family, shape, weight_shape, seed):
    """Each rank's token shard of pred, target and weights: the ranks' weighted sums add up to
    the whole sample's."""
    pred, target = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    weights = torch.rand(weight_shape, dtype=torch.float64)
    whole = (weights * (pred - target) ** 2).flatten(1).sum(1)
    parts = []
    for rank in range(2):
        context = ContextParallel(
            2, 1, None, "group", rank, (1, 1, 1) if family == "wan" else (1, 2, 2), family
        )
        adapter = type("Adapter", (), {"context": context})()
        p, t, extra = loss_inputs(adapter, pred, target, weights)
        assert extra["reduce_group"] == "group" and extra["elem_weight"].shape == p.shape
        parts.append((extra["elem_weight"] * (p - t) ** 2).flatten(1).sum(1))
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=0)
    assert not torch.allclose(parts[0], parts[1])
