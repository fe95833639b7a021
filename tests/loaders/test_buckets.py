"""Aspect-ratio buckets and the one-bucket-per-batch sampler."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from vipo.loaders.buckets import BucketBatchSampler, Buckets
from vipo.loaders.images import PairTransform
from vipo.loaders.manifest import ManifestPairs


def test_buckets_at_one_megapixel_are_maximal_multiples_of_64_within_the_aspect_limit():
    area, step = 1024 * 1024, 64
    buckets = Buckets.at_area(area, step=step, max_aspect=4.0)
    assert (1024, 1024) in buckets.sizes and (1344, 768) in buckets.sizes and (768, 1344) in buckets.sizes
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= area
        assert (w + step) * h > area and w * (h + step) > area, (w, h)  # neither side can grow
        assert max(w / h, h / w) <= 4.0 and (h, w) in buckets.sizes
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects) and len(set(aspects)) == len(aspects)
    # The same set by brute force over every pair of sides, at another area and step.
    area, step, limit = 512 * 512, 32, 2.0
    brute = {
        (w, h)
        for w in range(step, 2048, step)
        for h in range(step, 2048, step)
        if w * h <= area < min((w + step) * h, w * (h + step)) and max(w / h, h / w) <= limit
    }
    assert set(Buckets.at_area(area, step=step, max_aspect=limit).sizes) == brute


def test_an_image_goes_to_the_bucket_of_the_closest_aspect_ratio(seed):
    buckets = Buckets.at_area(1024 * 1024)
    rng = np.random.default_rng(seed)
    for width, height in rng.integers(64, 5000, size=(200, 2)):
        best = min(abs(math.log(width / height) - math.log(w / h)) for w, h in buckets)
        chosen = buckets[buckets.bucket_of(width, height)]
        assert abs(math.log(width / height) - math.log(chosen[0] / chosen[1])) == pytest.approx(best)
    assert buckets[buckets.bucket_of(1920, 1080)] == (1344, 768)
    assert buckets[buckets.bucket_of(10, 1000)] == (512, 2048)  # beyond the limit: the extreme bucket


def test_explicit_video_buckets_serve_720p_and_square():
    video = Buckets([(1280, 720), (960, 960)])
    assert video[video.bucket_of(1920, 1080)] == (1280, 720)
    assert video[video.bucket_of(1000, 1000)] == (960, 960)
    assert video[video.bucket_of(720, 1280)] == (960, 960)  # portrait is nearer 1:1 than 16:9
    assert video.assign([(640, 360), None, (500, 480)]).tolist() == [0, -1, 1]
    with pytest.raises(ValueError, match="duplicate"):
        Buckets([(960, 960), (960, 960)])
    with pytest.raises(ValueError, match="positive whole pixels"):
        Buckets([(1280, 720.5)])


def assignment(seed, num_items=103, num_buckets=4):
    return np.random.default_rng(seed).integers(-1, num_buckets, num_items)


def test_every_batch_comes_from_one_bucket_and_an_epoch_draws_each_item_at_most_once(seed):
    ids = assignment(seed)
    sampler = BucketBatchSampler(ids, batch_size=4, seed=seed)
    expected = sum(int((ids == b).sum()) // 4 for b in range(4))
    assert sampler.batches_per_epoch == expected
    seen = []
    for _ in range(expected):
        batch = sampler.next_batch()
        assert len(batch) == 4 and {int(ids[i]) for i in batch} == {sampler.last_bucket}
        seen += batch
    assert len(seen) == len(set(seen)) and all(ids[i] >= 0 for i in seen)
    sampler.next_batch()
    assert sampler.epoch == 1


def test_bucket_batches_are_deterministic_given_seed_and_epoch(seed):
    ids = assignment(seed)

    def run(s):
        return [BucketBatchSampler(ids, 3, seed=s).plan(e)[k][1].tolist() for e in (0, 1) for k in range(3)]

    assert run(seed) == run(seed)
    assert run(seed) != run(seed + 1)
    plan = BucketBatchSampler(ids, 3, seed=seed)
    assert [b.tolist() for _, b in plan.plan(0)] != [b.tolist() for _, b in plan.plan(1)]


def test_bucket_sampler_resumes_the_same_order_across_an_epoch_boundary(seed):
    ids = assignment(seed)
    sampler = BucketBatchSampler(ids, 2, seed=seed)
    for _ in range(sampler.batches_per_epoch - 2):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))
    ahead = [(sampler.next_batch(), sampler.last_bucket) for _ in range(5)]
    resumed = BucketBatchSampler(ids, 2, seed=seed)
    resumed.load_state_dict(state)
    assert [(resumed.next_batch(), resumed.last_bucket) for _ in range(5)] == ahead
    other = ids.copy()
    other[np.flatnonzero(other >= 0)[0]] = (other[np.flatnonzero(other >= 0)[0]] + 1) % 4
    with pytest.raises(ValueError, match="buckets changed"):
        BucketBatchSampler(other, 2, seed=seed).load_state_dict(state)


def test_ranks_share_the_bucket_of_each_step_and_take_disjoint_items(seed):
    ids = assignment(seed, num_items=160)
    ranks = [BucketBatchSampler(ids, 2, seed=seed, rank=r, world_size=3) for r in range(3)]
    for _ in range(ranks[0].batches_per_epoch):
        batches = [r.next_batch() for r in ranks]
        assert len({r.last_bucket for r in ranks}) == 1
        flat = sum(batches, [])
        assert len(set(flat)) == 6 and {int(ids[i]) for i in flat} == {ranks[0].last_bucket}


def test_bucket_sampler_refuses_what_cannot_fill_a_batch():
    with pytest.raises(ValueError, match="no bucket holds one global batch"):
        BucketBatchSampler([0, 0, 1, -1, -1], batch_size=2, seed=0, world_size=2)
    sampler = BucketBatchSampler([0, 0, 0, 0, 1], batch_size=2, seed=0)  # bucket 1 starves
    assert sampler.batches_per_epoch == 2 and all(i != 4 for _ in range(6) for i in sampler.next_batch())


def test_a_bucketed_source_gives_batches_that_stack_at_their_bucket_size(tmp_path):
    sizes = [(60, 30), (30, 60), (40, 40), (64, 30), (32, 60), (41, 40), (62, 32), (28, 61)]
    lines = []
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (k * 20, 0, 0)).save(tmp_path / f"w{k}.png")
        Image.new("RGB", (h, w), (0, k * 20, 0)).save(tmp_path / f"l{k}.png")  # loser turned: cropped alike
        lines.append(json.dumps({"prompt": f"p{k}", "winner": f"w{k}.png", "loser": f"l{k}.png"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    buckets = Buckets([(32, 16), (16, 32), (24, 24)])
    data = ManifestPairs(
        tmp_path / "m.jsonl", PairTransform(buckets=buckets, random_crop=True, flip_prob=0.5)
    )
    ids = buckets.assign(data.image_sizes())
    assert sorted(np.bincount(ids).tolist()) == [2, 3, 3]
    sampler = BucketBatchSampler(ids, batch_size=2, seed=0)
    for _ in range(2 * sampler.batches_per_epoch):
        records = [data[i] for i in sampler.next_batch()]
        width, height = buckets[sampler.last_bucket]
        stacked = np.stack([r.winner for r in records] + [r.loser for r in records])
        assert stacked.shape == (4, height, width, 3)
