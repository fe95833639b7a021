"""The procedural pair source and the resumable sampler."""

import numpy as np
import pytest

from vipo.loaders.procedural import COLOURS, POSITIONS, SHAPES, ProceduralPairs, draw
from vipo.loaders.sampler import PairSampler


def parse(prompt):
    words = prompt.split()
    return words[2], words[1], words[-1]  # shape, colour, position


def test_winner_follows_the_prompt_and_the_loser_breaks_one_attribute():
    data = ProceduralPairs(40, resolution=24, seed=3)
    for i in range(len(data)):
        pair = data[i]
        shape, colour, position = parse(pair.prompt)
        assert np.array_equal(pair.winner, draw(shape, colour, position, 24))
        # Exactly one attribute differs: the loser equals exactly one of the one-change drawings.
        one_change = [draw(s, colour, position, 24) for s in SHAPES if s != shape]
        one_change += [draw(shape, c, position, 24) for c in COLOURS if c != colour]
        one_change += [draw(shape, colour, p, 24) for p in POSITIONS if p != position]
        assert sum(np.array_equal(pair.loser, img) for img in one_change) == 1
        assert pair.category in ("shape", "colour", "position")


def test_pairs_are_a_pure_function_of_seed_and_index():
    a, b = ProceduralPairs(10, seed=5), ProceduralPairs(10, seed=5)
    assert all(np.array_equal(a[i].winner, b[i].winner) and a[i].prompt == b[i].prompt for i in range(10))
    assert ProceduralPairs(10, seed=6)[0].prompt != a[0].prompt or not np.array_equal(
        ProceduralPairs(10, seed=6)[0].loser, a[0].loser
    )


def test_noisy_regime_flips_about_flip_prob_of_labels():
    clean, noisy = ProceduralPairs(400, seed=1), ProceduralPairs(400, regime="noisy", flip_prob=0.3, seed=1)
    flipped = sum(np.array_equal(noisy[i].loser, clean[i].winner) for i in range(400))
    assert 80 <= flipped <= 160


def test_shuffled_regime_draws_losers_for_other_prompts():
    data = ProceduralPairs(50, regime="shuffled", seed=2)
    for i in range(50):
        pair = data[i]
        assert pair.category == "shuffled" and not np.array_equal(pair.winner, pair.loser)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown regime"):
        ProceduralPairs(4, regime="odd")
    with pytest.raises(IndexError):
        ProceduralPairs(4)[4]


def test_sampler_covers_an_epoch_then_reshuffles_and_resumes_in_order():
    sampler = PairSampler(10, 3, seed=0)
    epoch0 = [sampler.next_batch() for _ in range(3)]
    flat = sum(epoch0, [])
    assert len(set(flat)) == 9  # 3 full batches, the 10th index dropped
    state = sampler.state_dict()
    ahead = [sampler.next_batch() for _ in range(4)]
    resumed = PairSampler(10, 3, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(4)] == ahead
    assert sampler.epoch == 2  # 3 batches per epoch: epoch 1 whole, one batch of epoch 2


def test_sampler_ranks_take_disjoint_batches():
    ranks = [PairSampler(12, 2, seed=4, rank=r, world_size=3) for r in range(3)]
    taken = [i for r in ranks for i in r.next_batch()]
    assert len(set(taken)) == 6
    with pytest.raises(ValueError, match="does not match"):
        ranks[0].load_state_dict({**ranks[1].state_dict(), "seed": 9})


def old_batches(n, batch, seed, rank, world_size, count):
    """What the sampler gave when it drew the epoch's permutation afresh for every micro-batch."""
    per_epoch, out = n // (batch * world_size), []
    for k in range(count):
        epoch, b = divmod(k, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        start = (b * world_size + rank) * batch
        out.append(order[start : start + batch].tolist())
    return out


@pytest.mark.parametrize(
    "n, batch, seed, world_size", [(10, 3, 0, 1), (37, 2, 5, 3), (100, 4, 11, 8), (1000, 8, 2, 8)]
)
def test_cached_sampler_gives_the_per_call_order_for_every_rank_across_epochs(n, batch, seed, world_size):
    count = 3 * (n // (batch * world_size)) + 2  # three epochs and into the fourth
    for rank in range(world_size):
        sampler = PairSampler(n, batch, seed=seed, rank=rank, world_size=world_size)
        assert [sampler.next_batch() for _ in range(count)] == old_batches(
            n, batch, seed, rank, world_size, count
        )
        assert sampler.epoch == 3


def test_cached_order_is_the_permutation_at_a_million_pairs_and_is_held_as_int32():
    n = 1_000_003
    sampler = PairSampler(n, 8, seed=7, rank=3, world_size=8)
    got = sampler._order(2)
    assert got.dtype == np.int32 and np.array_equal(got, np.random.default_rng([7, 2]).permutation(n))


def test_resuming_mid_epoch_gives_the_same_batches_and_draws_the_resumed_epoch():
    n, batch, world_size = 50, 3, 2  # 8 global batches an epoch
    for rank in range(world_size):
        sampler = PairSampler(n, batch, seed=1, rank=rank, world_size=world_size)
        for _ in range(13):  # epoch 1, batch 5: the cache holds epoch 1
            sampler.next_batch()
        state = sampler.state_dict()
        ahead = [sampler.next_batch() for _ in range(12)]  # crosses into epoch 2
        resumed = PairSampler(n, batch, seed=1, rank=rank, world_size=world_size)
        resumed.next_batch()  # a fresh sampler already holds epoch 0's order: loading must replace it
        resumed.load_state_dict(state)
        assert (
            [resumed.next_batch() for _ in range(12)]
            == ahead
            == old_batches(n, batch, 1, rank, world_size, 25)[13:]
        )


def test_the_permutation_is_drawn_once_per_epoch_at_ten_million_pairs(monkeypatch):
    drawn = []
    original = PairSampler._order

    def counting(self, epoch):
        drawn.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(PairSampler, "_order", counting)
    sampler = PairSampler(10_000_000, 8, seed=0, rank=5, world_size=8)
    batches = [sampler.next_batch() for _ in range(100)]
    assert drawn == [0] and all(len(b) == 8 for b in batches)
    assert len({i for b in batches for i in b}) == 800
    # Only an epoch change draws again: jump to the epoch's last batch, then over the boundary.
    sampler.batch_in_epoch = sampler.batches_per_epoch - 1
    sampler.next_batch()
    assert drawn == [0]
    sampler.next_batch()
    assert drawn == [0, 1] and sampler.epoch == 1
