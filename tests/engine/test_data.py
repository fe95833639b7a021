"""data.* -> source, sampler and pixel batches: every source through one path, one shape a batch."""

import json
import tarfile

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vipo.engine.config import load_config
from vipo.engine.data import BatchStream, build_source, to_pixels
from vipo.engine.errors import ConfigError, RunError
from vipo.loaders.records import PairRecord

from vipo_testing import write_clips

CPU = torch.device("cpu")


def image(path, width, height, value):
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path.name


def write_manifest(root, sizes, missing=()):
    lines = []
    for i, (width, height) in enumerate(sizes):
        winner = image(root / f"w{i}.png", width, height, 200)
        loser = image(root / f"l{i}.png", width, height, 50)
        if i in missing:
            (root / winner).unlink()
        lines.append(json.dumps({"prompt": f"prompt {i}", "winner": winner, "loser": loser}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def config(*overrides):
    return load_config(None, list(overrides))


def test_a_manifest_with_buckets_gives_one_bucket_a_batch_and_winner_rows_first(tmp_path):
    path = write_manifest(tmp_path, [(64, 32), (32, 64), (64, 32), (32, 64), (64, 32), (32, 64)])
    cfg = config("data.source=manifest", f"data.path={path}", "data.buckets=[[32,16],[16,32]]")
    source = build_source(cfg.data, cfg.model, seed=0)
    stream = BatchStream(source, 2, seed=0)
    for _ in range(6):
        pixels = to_pixels(stream.next_records(), CPU)
        assert pixels.shape[0] == 4 and tuple(pixels.shape[2:]) in ((16, 32), (32, 16))
        assert torch.all(pixels[:2] > 0.5) and torch.all(pixels[2:] < -0.5)  # winners 200, losers 50


def test_a_missing_image_is_replaced_and_counted_not_fatal(tmp_path):
    path = write_manifest(tmp_path, [(16, 16)] * 4, missing={1})
    cfg = config("data.source=manifest", f"data.path={path}", "data.resolution=16")
    stream = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0)
    ids = {r.id for _ in range(4) for r in stream.next_records()}
    assert len(ids) == 3
    stats = stream.stats()
    assert stats["skipped_missing"] >= 1 and stats["replaced_bad_indices"] >= 1


def test_the_stream_position_resumes_the_same_order(tmp_path):
    path = write_manifest(tmp_path, [(16, 16)] * 6)
    cfg = config("data.source=manifest", f"data.path={path}", "data.resolution=16")
    first = BatchStream(build_source(cfg.data, cfg.model, seed=3), 2, seed=3)
    first.next_records()
    state = first.state_dict()
    expected = [[r.id for r in first.next_records()] for _ in range(4)]
    second = BatchStream(build_source(cfg.data, cfg.model, seed=3), 2, seed=3)
    second.load_state_dict(json.loads(json.dumps(state)))
    assert [[r.id for r in second.next_records()] for _ in range(4)] == expected


def test_tar_shards_stream_and_resume(tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(6):
            for name in (f"{i:03d}.txt", f"{i:03d}.winner.png", f"{i:03d}.loser.png"):
                if name.endswith(".txt"):
                    (tmp_path / name).write_text(f"prompt {i}")
                else:
                    image(tmp_path / name, 16, 16, 200 if "winner" in name else 50)
                tar.add(tmp_path / name, arcname=name)
    cfg = config("data.source=shards", f"data.path={tmp_path / 'shard-0.tar'}", "data.resolution=16")
    stream = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0)
    stream.next_records()
    state = stream.state_dict()
    expected = [r.id for r in stream.next_records()]
    again = BatchStream(build_source(cfg.data, cfg.model, seed=0), 2, seed=0)
    again.load_state_dict(state)
    assert [r.id for r in again.next_records()] == expected


def test_video_pairs_become_five_dimensional_pixels(tmp_path):
    for name in ("w.webm", "l.webm"):
        with av.open(str(tmp_path / name), "w") as container:
            stream = container.add_stream("libvpx-vp9", rate=10)
            stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
            for _ in range(8):
                frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 128, np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    (tmp_path / "v.jsonl").write_text(
        json.dumps({"prompt": "p", "winner": "w.webm", "loser": "l.webm"}) + "\n"
    )
    cfg = config(
        "model.family=wan",
        "model.config=wan-tiny",
        "data.source=video",
        f"data.path={tmp_path / 'v.jsonl'}",
        "data.num_frames=5",
        "data.resolution=16",
        "data.video_backend=pyav",
    )
    records = BatchStream(build_source(cfg.data, cfg.model, seed=0), 1, seed=0).next_records()
    assert to_pixels(records, CPU).shape == (2, 3, 5, 16, 16)
    with pytest.raises(ConfigError, match="1 \\+ 4k"):
        config("model.family=wan", "data.source=video", "data.path=x", "data.num_frames=6")


def test_data_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="set data.path"):
        config("data.source=pickapic")
    with pytest.raises(ConfigError, match="keep_ties is only for loss.objective=sft"):
        config("data.source=pickapic", "data.path=x", "data.keep_ties=true")
    with pytest.raises(ConfigError, match="cannot batch by bucket"):
        config("data.source=shards", "data.path=x", "data.bucket_area=4096")


def test_a_missing_data_file_is_a_run_error_naming_it(tmp_path):
    cfg = config("data.source=manifest", f"data.path={tmp_path / 'none.jsonl'}")
    with pytest.raises(RunError, match="none.jsonl"):
        build_source(cfg.data, cfg.model, seed=0)


def test_a_batch_of_mixed_shapes_is_refused():
    records = [
        PairRecord(str(i), "p", np.zeros((s, s, 3), np.uint8), np.zeros((s, s, 3), np.uint8))
        for i, s in enumerate((8, 16))
    ]
    with pytest.raises(RunError, match="set data.buckets"):
        to_pixels(records, CPU)


def tiny_run(tmp_path, *overrides):
    from vipo.engine.trainer import Trainer

    cfg = config(
        "train.batch_pairs=2",
        "train.max_steps=2",
        "train.log_every_steps=1",
        "loss.beta=500",
        "optim.lr=1e-4",
        f"train.output_dir={tmp_path / 'run'}",
        *overrides,
    )
    with Trainer(cfg, progress=False) as trainer:
        return trainer.train(), trainer


def test_the_trainer_trains_on_a_bucketed_manifest_and_counts_skips(tmp_path):
    path = write_manifest(tmp_path, [(64, 32), (32, 64)] * 3, missing={2})
    summary, trainer = tiny_run(
        tmp_path,
        "data.source=manifest",
        f"data.path={path}",
        "data.buckets=[[32,16],[16,32]]",
        "train.max_steps=3",
    )
    assert summary["steps"] == 3 and summary["loss_is_finite"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("data_skipped", 0) >= 1 for row in rows)


def test_wan_trains_on_video_pairs(tmp_path):
    path = write_clips(tmp_path, 2)  # vipo_testing
    summary, trainer = tiny_run(
        tmp_path,
        "model.family=wan",
        "model.config=wan-tiny",
        "data.source=video",
        f"data.path={path}",
        "data.num_frames=5",
        "data.resolution=16",
        "data.video_backend=pyav",
    )
    assert summary["steps"] == 2 and summary["loss_is_finite"]


def test_the_pickapic_recipe_runs_on_local_copies(tmp_path):
    """The paper's recipe as shipped, pointed at a tiny SD1.5 folder and a tiny parquet shard."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vipo.configs import find_recipe
    from vipo.engine.trainer import Trainer

    from vipo_testing import make_sd15_folder

    def jpeg(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(buffer, format="JPEG")
        return buffer.getvalue()

    rows = {
        "caption": [],
        "jpg_0": [],
        "jpg_1": [],
        "label_0": [],
        "label_1": [],
        "image_0_uid": [],
        "image_1_uid": [],
        "model_0": [],
        "model_1": [],
        "best_image_uid": [],
        "are_different": [],
        "has_label": [],
    }
    for i, (l0, l1) in enumerate([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0)]):
        for key, value in (
            ("caption", f"prompt {i}"),
            ("jpg_0", jpeg(200)),
            ("jpg_1", jpeg(40)),
            ("label_0", l0),
            ("label_1", l1),
            ("image_0_uid", f"a{i}"),
            ("image_1_uid", f"b{i}"),
            ("model_0", "m"),
            ("model_1", "m"),
            ("best_image_uid", f"a{i}" if l0 > l1 else f"b{i}"),
            ("are_different", True),
            ("has_label", True),
        ):
            rows[key].append(value)
    pq.write_table(pa.table(rows), tmp_path / "train-0.parquet", row_group_size=2)
    model = make_sd15_folder(tmp_path / "sd15")
    cfg = load_config(
        find_recipe("sd15-pickapic-poly"),
        [
            f"model.path={model}",
            f"data.path={tmp_path / 'train-0.parquet'}",
            "data.resolution=16",
            "train.batch_pairs=2",
            "train.grad_accum_steps=1",
            "train.max_steps=2",
            "train.mixed_precision=no",
            "parallel.strategy=none",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    with Trainer(cfg, progress=False) as trainer:
        summary = trainer.train()
        assert len(trainer.data) == 4 and trainer.data.stats()["skipped_ties"] == 1
    assert summary["steps"] == 2 and summary["loss_is_finite"]
    assert (cfg.loss.alpha, cfg.loss.beta) == (8.0, 5000.0)


def test_manifest_pair_weights_reach_the_loss_and_bad_ones_are_refused(tmp_path):
    from vipo.engine.trainer import Trainer
    from vipo.kernels import poly_dpo_loss

    path = write_manifest(tmp_path, [(16, 16)] * 4)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line, weight in zip(lines, (0.0, 2.0, 1.0, 3.5), strict=True):
        line["weight"] = weight
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = config(
        "data.source=manifest",
        f"data.path={path}",
        "data.resolution=16",
        "train.batch_pairs=4",
        "loss.objective=poly_dpo",
        "loss.alpha=2",
        "loss.beta=500",
        f"train.output_dir={tmp_path / 'r'}",
    )
    trainer = Trainer(cfg, progress=False)
    batch = trainer.next_batch()
    assert sorted(batch.weights.tolist()) == [0.0, 1.0, 2.0, 3.5]
    # The trainer's loss is the kernel's with these pair weights.
    calls = []
    original = poly_dpo_loss

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pair_weight"))
        return original(*args, **kwargs)

    import vipo.engine.objectives as objectives

    objectives.poly_dpo_loss, saved = spy, objectives.poly_dpo_loss
    try:
        trainer.train_step()
    finally:
        objectives.poly_dpo_loss = saved
    assert calls and sorted(calls[0].tolist()) == [0.0, 1.0, 2.0, 3.5]
    lines[0]["weight"] = -1
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(RunError, match=r"pairs.jsonl:1: 'weight' must be a finite number >= 0, got -1"):
        build_source(cfg.data, cfg.model, seed=0)
