"""Weight maps from data: decoding, the pair's own crop and flip, the latent grid, and every
source that carries them (manifest, parquet, shards, video manifest)."""

import io
import json
import logging
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vipo.loaders.images import BadSample, PairTransform, SourceError, decode_image
from vipo.loaders.manifest import ManifestPairs
from vipo.loaders.pickapic import PickapicPairs
from vipo.loaders.shards import ShardPairs
from vipo.loaders.weight_maps import decode_weight_map, frame_weights, latent_weights, temporal_groups


def png(array, mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def step_image(width, height, edge):
    """Black left of column `edge`, white from it: a crop or flip moves the edge."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, edge:] = 255
    return array


# ---------------------------------------------------------------------------------------------
# Decoding


def test_grayscale_pngs_and_npy_arrays_decode_to_their_weights(seed):
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(decode_weight_map(png(grey)), grey.astype(np.float32) / 255)
    wide = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    np.testing.assert_allclose(decode_weight_map(png(wide)), wide / 65535.0, rtol=1e-6)
    values = rng.uniform(0, 3, (4, 6)).astype(np.float64)
    assert np.array_equal(decode_weight_map(npy(values)), values.astype(np.float32))
    assert np.array_equal(decode_weight_map(npy(values > 1)), (values > 1).astype(np.float32))


@pytest.mark.parametrize(
    "data, complaint",
    [
        (png(np.zeros((4, 4, 3), np.uint8)), "is RGB, not grayscale"),
        (npy(np.array([[1.0, -0.5]])), "negative, NaN or inf .first at .0, 1.: -0.5"),
        (npy(np.array([[1.0, np.nan]])), "negative, NaN or inf"),
        (npy(np.ones(3)), r"shape \(3,\): expected a 2-D"),
        (npy(np.array([[{"a": 1}]], dtype=object)), "cannot read the .npy weight map"),
        (b"\x89PNG\r\n\x1a\n broken", "cannot decode the weight map"),
    ],
)
def test_a_map_that_is_not_usable_is_a_bad_sample_naming_why(data, complaint):
    with pytest.raises(BadSample, match=complaint) as caught:
        decode_weight_map(data, ref="pair-7:weight_map")
    assert caught.value.ref == "pair-7:weight_map" and caught.value.kind == "skipped_corrupt"


def test_a_missing_map_file_is_a_skipped_missing_sample(tmp_path):
    with pytest.raises(BadSample) as caught:
        decode_weight_map(tmp_path / "nope.png")
    assert caught.value.kind == "skipped_missing"


def test_a_pickled_npy_never_runs_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    buffer = io.BytesIO()
    np.save(buffer, np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample, match="cannot read the .npy"):
        decode_weight_map(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# The pair's crop and flip


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_a_map_follows_the_pairs_random_crop_and_flip_at_any_resolution(seed, flip):
    """A map drawn at a quarter of the image's resolution lands on the pixels it was drawn for:
    its step edge sits where the transformed image's edge sits."""
    width, height, edge = 64, 48, 37  # every 48 px wide crop of the 64 holds the edge
    transform = PairTransform(32, random_crop=True, flip_prob=flip, seed=seed)
    winner = Image.fromarray(step_image(width, height, edge))
    small = np.zeros((height // 4, width // 4), np.float32)
    small[:, round(edge / 4) :] = 1.0
    for key in (f"pair-{seed}-{k}" for k in range(8)):  # eight crops of the pair's range
        pixels, _ = transform(winner, winner, key=key)
        weights = transform.weight_map(small, winner.size, key=key)
        assert weights.shape == (32, 32) and weights.dtype == np.float32
        assert 0.0 <= weights.min() and weights.max() <= 1.0  # bilinear: no overshoot
        bright, heavy = pixels[0, :, 0] > 127, weights[0] > 0.5
        moved = np.flatnonzero(bright != heavy)  # columns where they disagree: at most the edge's own
        assert moved.size <= 2 and (moved.size == 0 or np.ptp(moved) <= 1), key
        assert bright.any() and not bright.all()  # the edge is in view, so this means something
        fx, fy, flipped = transform.decisions(key)
        assert flipped == (flip == 1.0) and heavy[0] == flipped


# ---------------------------------------------------------------------------------------------
# The latent grid


def test_pixel_maps_average_over_latent_cells_and_pairs_without_a_map_weigh_one():
    pixel = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = latent_weights([pixel, None], (4, 4, 2, 2))
    assert out.shape == (2, 1, 2, 2)
    assert torch.equal(out[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert torch.equal(out[1], torch.ones(1, 2, 2))
    assert latent_weights([None, None], (4, 4, 2, 2)) is None
    with pytest.raises(ValueError, match="does not tile"):
        latent_weights([np.ones((5, 4), np.float32)], (2, 4, 2, 2))


def test_frame_weights_fold_like_wans_causal_vae():
    """Frame 0 is latent frame 0 alone; each later latent frame holds the next 4 frames."""
    assert temporal_groups(9, 3) == [slice(0, 1), slice(1, 5), slice(5, 9)]
    assert temporal_groups(5, 5) == [slice(i, i + 1) for i in range(5)]
    frames = np.array([2, 0, 0, 4, 4, 1, 1, 1, 1], np.float32)
    out = latent_weights([frames], (2, 16, 3, 4, 4))
    assert out.shape == (1, 1, 3, 1, 1) and out.flatten().tolist() == [2.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="do not fold"):
        temporal_groups(8, 3)


@pytest.mark.parametrize(
    "value, complaint",
    [
        ("1,2", "must be a non-empty list of numbers"),
        ([], "must be a non-empty list"),
        ([1, True], "must be a non-empty list"),
        ([1, -2], "entry 1 is -2"),
        ([1, 1e300], "entry 1 is 1e"),
    ],
)
def test_bad_frame_weights_are_refused_naming_the_line(value, complaint):
    with pytest.raises(SourceError, match=f"clips.jsonl:3: 'frame_weights' .*{complaint}"):
        frame_weights(value, "clips.jsonl:3")


# ---------------------------------------------------------------------------------------------
# Sources


def write_pairs(folder, count, *, maps=None):
    """A manifest of `count` 24x16 pairs; maps: {i: weight map file name, or None}."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        Image.fromarray(step_image(24, 16, 5 + i)).save(folder / f"w{i}.png")
        Image.fromarray(step_image(24, 16, 15 - i)).save(folder / f"l{i}.png")
        line = {"prompt": f"p{i}", "winner": f"w{i}.png", "loser": f"l{i}.png", "id": f"pair-{i}"}
        if maps and i in maps:
            line["weight_map"] = maps[i]
        lines.append(json.dumps(line))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def test_a_manifest_carries_maps_transformed_with_its_pairs_and_counts_broken_ones(tmp_path, caplog):
    grey = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (16, 1))
    (tmp_path / "m.png").write_bytes(png(grey))
    np.save(tmp_path / "m.npy", np.ones((8, 12)))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    path = write_pairs(tmp_path, 5, maps={0: "m.png", 1: "m.npy", 2: None, 3: "bad.png", 4: "gone.npy"})
    transform = PairTransform(16, random_crop=True, flip_prob=0.5, seed=3)
    with caplog.at_level(logging.WARNING):
        source = ManifestPairs(path, transform)
    assert "is not read" not in caplog.text  # weight_map is a known key
    first = source[0]
    expected = transform.weight_map(grey / np.float32(255), (24, 16), key="pair-0")
    assert np.array_equal(first.weight_map, expected) and first.weight_map.shape == first.winner.shape[:2]
    assert np.array_equal(source[1].weight_map, np.ones((16, 16), np.float32))
    assert source[2].weight_map is None
    with pytest.raises(BadSample, match="cannot decode the weight map"):
        source[3]
    with pytest.raises(BadSample):
        source[4]
    stats = source.stats()
    assert stats["skipped_corrupt"] == 1 and stats["skipped_missing"] == 1


def test_a_manifest_map_path_is_checked_like_an_image_path(tmp_path):
    path = write_pairs(tmp_path / "set", 1, maps={0: "../outside.png"})
    with pytest.raises(
        SourceError, match="weight_map path '../outside.png' is outside the manifest's folder"
    ):
        ManifestPairs(path, PairTransform(16))
    path = write_pairs(tmp_path / "set", 1, maps={0: 3})
    with pytest.raises(SourceError, match=r"pairs.jsonl:1: 'weight_map' must be a string, got int 3"):
        ManifestPairs(path, PairTransform(16))
    path = write_pairs(tmp_path / "set", 2, maps={1: "gone.png"})
    source = ManifestPairs(path, PairTransform(16), check_files=True)
    assert len(source) == 1 and source.stats()["skipped_missing"] == 1


def test_parquet_rows_and_shard_members_carry_maps_and_shard_json_a_weight(tmp_path):
    rows = {key: [] for key in ("caption", "jpg_0", "jpg_1", "image_0_uid", "image_1_uid")}
    rows.update(label_0=[], label_1=[], has_label=[], are_different=[], weight_map=[])
    half = np.zeros((16, 24), np.uint8)
    half[:, 12:] = 255
    for i, (l0, l1) in enumerate([(0.0, 1.0), (1.0, 0.0)]):
        rows["caption"].append(f"p{i}")
        rows["jpg_0"].append(png(step_image(24, 16, 4)))
        rows["jpg_1"].append(png(step_image(24, 16, 20)))
        rows["image_0_uid"].append(f"a{i}")
        rows["image_1_uid"].append(f"b{i}")
        rows["label_0"].append(l0)
        rows["label_1"].append(l1)
        rows["has_label"].append(True)
        rows["are_different"].append(True)
        rows["weight_map"].append(png(half) if i == 0 else None)
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    transform = PairTransform(16, flip_prob=1.0)  # every pair flipped: the heavy half moves left
    source = PickapicPairs(tmp_path / "train.parquet", transform)
    weights = source[0].weight_map
    assert weights[:, :6].min() == 1.0 and weights[:, 10:].max() == 0.0
    assert source[1].weight_map is None
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (
            ("k.json", json.dumps({"prompt": "p", "weight": 2.5}).encode()),
            ("k.winner.png", png(step_image(24, 16, 4))),
            ("k.loser.png", png(step_image(24, 16, 20))),
            ("k.weight_map.npy", npy(np.full((4, 6), 0.25))),
            ("j.json", json.dumps({"prompt": "q", "weight": -1}).encode()),
            ("j.winner.png", png(step_image(24, 16, 4))),
            ("j.loser.png", png(step_image(24, 16, 20))),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = ShardPairs(tmp_path / "s.tar", PairTransform(16), shuffle_shards=False, epochs=1)
    records = list(stream)
    assert [r.id for r in records] == ["s/k"] and records[0].weight == 2.5
    assert np.array_equal(records[0].weight_map, np.full((16, 16), 0.25, np.float32))
    assert stream.stats()["skipped_corrupt"] == 1  # the negative weight
    assert decode_image(png(step_image(24, 16, 4))).size == (24, 16)
