"""BatchStream: background prefetch keeps the order and the resume position; too many bad files stop the run."""

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vipo.engine.config import load_config
from vipo.engine.data import BatchStream, build_source
from vipo.engine.errors import ConfigError, RunError
from vipo.loaders.records import PairRecord


def write_manifest(root, count, missing=(), corrupt=()):
    """`count` pairs of 24x16 PNGs whose pixels tell pairs apart; some winners missing or corrupt."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        for role in ("w", "l"):
            Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / f"{role}{i}.png")
        if i in missing:
            (root / f"w{i}.png").unlink()
        if i in corrupt:
            (root / f"w{i}.png").write_bytes(b"not an image")
        lines.append(
            json.dumps({"prompt": f"prompt {i}", "winner": f"w{i}.png", "loser": f"l{i}.png", "id": f"p{i}"})
        )
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def manifest_source(path, *overrides):
    cfg = load_config(
        None,
        [
            "data.source=manifest",
            f"data.path={path}",
            "data.resolution=12",
            "data.random_crop=true",
            "data.hflip_prob=0.5",
            *overrides,
        ],
    )
    return build_source(cfg.data, cfg.model, seed=5)


def batches(stream, count):
    return [stream.next_records() for _ in range(count)]


def same_records(left, right):
    assert [[r.id for r in batch] for batch in left] == [[r.id for r in batch] for batch in right]
    for batch_left, batch_right in zip(left, right, strict=True):
        for a, b in zip(batch_left, batch_right, strict=True):
            assert np.array_equal(a.winner, b.winner) and np.array_equal(a.loser, b.loser), a.id


def test_prefetch_gives_the_same_records_in_the_same_order_across_epochs(tmp_path):
    path = write_manifest(tmp_path, 6)
    plain = batches(
        BatchStream(manifest_source(path), 2, seed=5), 8
    )  # 3 batches an epoch: crosses two epochs
    stream = BatchStream(manifest_source(path), 2, seed=5, prefetch_batches=3)
    prefetched = batches(stream, 8)
    stream.close()
    same_records(plain, prefetched)
    assert len({r.id for batch in plain[:3] for r in batch}) == 6


def test_state_dict_is_the_position_after_the_last_batch_handed_out_not_after_prefetched_ones(tmp_path):
    path = write_manifest(tmp_path, 6)
    plain = BatchStream(manifest_source(path), 2, seed=5)
    prefetching = BatchStream(manifest_source(path), 2, seed=5, prefetch_batches=2)
    assert prefetching.state_dict() == plain.state_dict()
    batches(plain, 4)
    batches(prefetching, 4)
    state = prefetching.state_dict()
    assert state == plain.state_dict()
    expected = batches(prefetching, 5)
    resumed = BatchStream(manifest_source(path), 2, seed=5, prefetch_batches=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    same_records(batches(resumed, 5), expected)
    for stream in (prefetching, resumed):
        stream.close()


def test_tar_shards_resume_from_the_handed_out_position_with_prefetch(tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(8):
            (tmp_path / f"{i:03d}.txt").write_text(f"prompt {i}")
            tar.add(tmp_path / f"{i:03d}.txt", arcname=f"{i:03d}.txt")
            for role, value in (("winner", 200), ("loser", 50)):
                name = f"{i:03d}.{role}.png"
                Image.fromarray(np.full((16, 16, 3), value + i, np.uint8)).save(tmp_path / name)
                tar.add(tmp_path / name, arcname=name)
    cfg = load_config(
        None, ["data.source=shards", f"data.path={tmp_path / 'shard-0.tar'}", "data.resolution=16"]
    )
    plain = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0)
    expected = batches(plain, 6)
    stream = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0, prefetch_batches=2)
    same_records(batches(stream, 2), expected[:2])
    state = stream.state_dict()
    two_batches = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0)
    batches(two_batches, 2)
    assert state == two_batches.state_dict() and state["stream"]["sample_offset"] == 4
    resumed = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0, prefetch_batches=2)
    resumed.load_state_dict(state)
    same_records(batches(resumed, 4), expected[2:])
    for s in (stream, resumed):
        s.close()


class FailingPairs:
    """Pairs 0..n-1; reading `fail_at` raises, as a decoder bug would."""

    def __init__(self, count, fail_at):
        self.count, self.fail_at = count, fail_at
        self.counters = {"skipped_ties": 0, "skipped_corrupt": 0}

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if index == self.fail_at:
            raise ValueError(f"decoder exploded on pair {index}")
        pixels = np.full((2, 2, 3), index % 256, np.uint8)
        return PairRecord(f"p{index}", "p", pixels, pixels)

    def stats(self):
        return dict(self.counters)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_the_prefetch_thread_surfaces_in_next_records_and_the_position_stays(tmp_path, workers):
    order = BatchStream(FailingPairs(12, fail_at=-1), 2, seed=1)
    ids = [[r.id for r in order.next_records()] for _ in range(6)]
    failing_batch = 3
    fail_at = int(ids[failing_batch][1][1:])
    stream = BatchStream(
        FailingPairs(12, fail_at=fail_at), 2, seed=1, prefetch_batches=2, num_workers=workers
    )
    assert [[r.id for r in stream.next_records()] for _ in range(failing_batch)] == ids[:failing_batch]
    state = stream.state_dict()
    with pytest.raises(ValueError, match=f"decoder exploded on pair {fail_at}"):
        stream.next_records()
    assert stream.state_dict() == state
    stream.source.fail_at = -1  # fixed: the retry starts at the batch that failed
    assert [r.id for r in stream.next_records()] == ids[failing_batch]
    stream.close()


def test_too_many_missing_files_stop_the_run_naming_count_fraction_and_limit(tmp_path):
    path = write_manifest(tmp_path, 60, missing=set(range(0, 60, 6)))  # 10 of 60 winners missing
    stream = BatchStream(manifest_source(path), 4, seed=0)
    with pytest.raises(RunError) as caught:
        batches(stream, 15)
    message = str(caught.value)
    assert "skipped_missing=" in message and "data.max_bad_fraction=0.01" in message and "%" in message
    tolerant = BatchStream(manifest_source(path), 4, seed=0, max_bad_fraction=0.2, prefetch_batches=2)
    batches(tolerant, 15)
    assert tolerant.stats()["skipped_missing"] == 10
    tolerant.close()


def test_one_bad_file_is_judged_only_after_enough_attempts_and_ties_never_count():
    source = FailingPairs(400, fail_at=-1)
    source.counters["skipped_ties"] = 10_000  # data policy, not damage
    stream = BatchStream(source, 4, seed=0)
    source.counters["skipped_corrupt"] = 1
    batches(stream, 12)  # 48 served + 1 bad = 49 tried: too few to judge
    with pytest.raises(RunError, match=r"1 of 53 pairs tried were bad files \(1.9%: skipped_corrupt=1\)"):
        stream.next_records()
    relaxed = BatchStream(source, 4, seed=0, max_bad_fraction=0.02)
    batches(relaxed, 13)


def test_a_header_scan_that_finds_many_corrupt_files_stops_before_the_first_batch(tmp_path):
    path = write_manifest(tmp_path, 60, corrupt=set(range(0, 60, 3)))
    with pytest.raises(RunError, match=r"20 of 60 pairs tried .*skipped_corrupt=20"):
        BatchStream(manifest_source(path, "data.buckets=[[12,8],[8,12]]"), 2, seed=0)


def test_data_config_checks_the_new_keys():
    with pytest.raises(ConfigError, match="data.max_bad_fraction"):
        load_config(None, ["data.max_bad_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.prefetch_batches"):
        load_config(None, ["data.prefetch_batches=-1"])
    cfg = load_config(None, [])
    assert cfg.data.max_bad_fraction == 0.01 and cfg.data.prefetch_batches == 2


def test_next_indices_moves_the_saved_position_like_next_records():
    from vipo.engine.data import BatchStream
    from vipo.loaders.procedural import ProceduralPairs

    by_records = BatchStream(ProceduralPairs(12, 8), 3, seed=1)
    by_indices = BatchStream(ProceduralPairs(12, 8), 3, seed=1)
    for _ in range(5):  # across an epoch boundary (4 batches an epoch)
        records = by_records.next_records()
        indices, epoch = by_indices.next_indices()
        assert [r.id for r in records] == [f"procedural-0-{i}" for i in indices]
        assert by_indices.state_dict() == by_records.state_dict()
    assert epoch == 1


# -- DataLoader workers (data.num_workers) -------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_batches_of_no_workers_and_resume_from_the_handed_out_position(tmp_path, workers):
    """Random crops and flips are keyed by (seed, epoch, pair id): the same pixels whichever
    process decodes a batch; 8 batches of 3 an epoch cross two epochs."""
    path = write_manifest(tmp_path, 6, corrupt={4})
    expected = batches(BatchStream(manifest_source(path), 2, seed=5), 8)
    stream = BatchStream(manifest_source(path), 2, seed=5, num_workers=workers, prefetch_batches=2)
    same_records(batches(stream, 3), expected[:3])
    state = stream.state_dict()  # the workers prepared more; the position is after batch 3
    three = BatchStream(manifest_source(path), 2, seed=5)
    batches(three, 3)
    assert state == three.state_dict()
    same_records(batches(stream, 5), expected[3:])
    assert sorted(stream._worker_stats) == list(range(workers))  # every worker decoded batches
    assert stream.stats()["skipped_corrupt"] >= 1  # the corrupt winner, counted by a worker
    resumed = BatchStream(manifest_source(path), 2, seed=5, num_workers=workers)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    same_records(batches(resumed, 5), expected[3:])
    for s in (stream, resumed):
        s.close()


def test_a_run_with_workers_trains_like_one_without(tmp_path):
    from vipo.engine.trainer import Trainer

    losses = {}
    for workers in (0, 2):
        cfg = load_config(
            None,
            [
                "model.config=sd15-tiny",
                "data.num_pairs=12",
                "data.resolution=16",
                "train.batch_pairs=2",
                "train.max_steps=3",
                "train.log_every_steps=1",
                "loss.beta=500",
                "optim.lr=1e-3",
                f"data.num_workers={workers}",
                f"train.output_dir={tmp_path / str(workers)}",
            ],
        )
        with Trainer(cfg, progress=False) as trainer:
            losses[workers] = [float(trainer.train_step()["loss"]) for _ in range(3)]
    assert losses[2] == losses[0] and len(set(losses[0])) > 1


def test_workers_are_spawned_only_next_to_a_cuda_context():
    from vipo.engine.data import worker_start

    assert worker_start(True) == "spawn" and worker_start(False) is None
