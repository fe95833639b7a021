"""`vipo data stats`: pairs, skips by reason, size histograms, frames and categories, from headers."""

import io
import json

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vipo.engine.cli import main
from vipo.engine.config import load_config
from vipo.engine.errors import RunError
from vipo.engine.eval.data_stats import collect, format_report


def jpeg(width, height, seed=0):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_manifest(root):
    """Five pairs: three good (two categories, two sizes), one missing loser, one corrupt winner."""
    specs = [((64, 32), (32, 32), "motion"), ((64, 32), (64, 32), "motion"), ((32, 48), (32, 48), "")]
    lines = []
    for i, (winner, loser, category) in enumerate(specs):
        (root / f"w{i}.jpg").write_bytes(jpeg(*winner, seed=i))
        (root / f"l{i}.jpg").write_bytes(jpeg(*loser, seed=10 + i))
        lines.append({"prompt": f"p{i}", "winner": f"w{i}.jpg", "loser": f"l{i}.jpg", "category": category})
    (root / "w3.jpg").write_bytes(jpeg(16, 16))
    lines.append({"prompt": "gone", "winner": "w3.jpg", "loser": "never-written.jpg", "category": "motion"})
    (root / "w4.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "l4.jpg").write_bytes(jpeg(16, 16))
    lines.append({"prompt": "broken", "winner": "w4.jpg", "loser": "l4.jpg", "category": "style"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "pairs.jsonl"


def data_config(*overrides):
    cfg = load_config(None, list(overrides))
    return cfg.data, cfg.model


def test_manifest_stats_count_pairs_skips_by_reason_sizes_and_categories(tmp_path):
    path = write_manifest(tmp_path)
    report = collect(*data_config("data.source=manifest", f"data.path={path}"), progress=False)
    assert report["rows"] == 5 and report["pairs"] == 3
    assert report["skipped"] == {"missing": 1, "corrupt": 1, "not_a_file": 0}
    assert "never-written.jpg" in report["skipped_examples"]["missing"]
    assert "w4.jpg" in report["skipped_examples"]["corrupt"]
    assert report["categories"] == {"motion": 2, "(none)": 1}
    assert report["resolution"]["winner"] == {"64x32": 2, "32x48": 1}
    assert report["resolution"]["loser"] == {"32x32": 1, "32x48": 1, "64x32": 1}
    assert report["aspect"]["winner"] == {"2.00": 2, "0.67": 1}
    text = format_report(report)
    assert "3 usable pairs of 5 rows; 2 with bad files" in text and "missing 1" in text


def test_sizes_come_from_headers_and_decode_finds_a_truncated_jpeg(tmp_path, monkeypatch):
    full = jpeg(64, 64, seed=3)
    (tmp_path / "w.jpg").write_bytes(full[: len(full) // 2])  # header intact, pixels cut off
    (tmp_path / "l.jpg").write_bytes(jpeg(64, 64, seed=4))
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "p", "winner": "w.jpg", "loser": "l.jpg"}) + "\n"
    )
    cfg = data_config("data.source=manifest", f"data.path={tmp_path / 'pairs.jsonl'}")
    import vipo.loaders.images as images

    decoded = []
    original = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda *a, **k: decoded.append(a) or original(*a, **k))
    headers_only = collect(*cfg, progress=False)
    assert headers_only["pairs"] == 1 and not decoded
    checked = collect(*cfg, progress=False, decode=True)
    assert checked["pairs"] == 0 and checked["skipped"]["corrupt"] == 1 and decoded


def write_pickapic(path):
    """Five rows: three preferences, a tie, and a corrupt winner image."""
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.0, 1.0), (1.0, 0.0)]
    rows = {
        key: []
        for key in (
            "caption",
            "jpg_0",
            "jpg_1",
            "label_0",
            "label_1",
            "image_0_uid",
            "image_1_uid",
            "model_0",
            "model_1",
            "best_image_uid",
            "are_different",
            "has_label",
        )
    }
    for i, (l0, l1) in enumerate(labels):
        image_0, image_1 = jpeg(48, 32, seed=i), jpeg(32, 32, seed=20 + i)
        if i == 3:
            image_1 = b"corrupt bytes"
        for key, value in (
            ("caption", f"prompt {i}"),
            ("jpg_0", image_0),
            ("jpg_1", image_1),
            ("label_0", l0),
            ("label_1", l1),
            ("image_0_uid", f"a{i}"),
            ("image_1_uid", f"b{i}"),
            ("model_0", "m"),
            ("model_1", "m"),
            ("best_image_uid", f"a{i}"),
            ("are_different", True),
            ("has_label", True),
        ):
            rows[key].append(value)
    pq.write_table(pa.table(rows), path, row_group_size=2)
    return path


def test_pickapic_stats_count_the_tie_and_the_corrupt_image_and_size_winners_by_label(tmp_path, capsys):
    path = write_pickapic(tmp_path / "train-0.parquet")
    code = main(["data", "stats", "--source", "pickapic", "--path", str(path), "--json", "-q"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and report["rows"] == 5
    assert report["skipped"]["ties"] == 1 and report["skipped"]["corrupt"] == 1
    assert report["skipped"]["missing"] == 0 and report["categories"] == {"(none)": 3}
    # Rows 0 and 4 prefer the 48x32 image 0, row 1 the 32x32 image 1.
    assert report["resolution"]["winner"] == {"48x32": 2, "32x32": 1}
    assert report["resolution"]["loser"] == {"32x32": 2, "48x32": 1}


def write_clip(path, frames, codec="libvpx-vp9"):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 20 * k, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_stats_probe_frames_and_codecs_and_count_short_and_missing_clips(tmp_path):
    write_clip(tmp_path / "a.webm", 9)
    write_clip(tmp_path / "b.mp4", 7, codec="libx264")
    write_clip(tmp_path / "short.webm", 3)
    lines = [
        {"prompt": "ok", "winner": "a.webm", "loser": "b.mp4", "category": "motion"},
        {"prompt": "short", "winner": "a.webm", "loser": "short.webm"},
        {"prompt": "gone", "winner": "a.webm", "loser": "nowhere.mkv"},
    ]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = collect(
        *data_config("data.source=video", f"data.path={tmp_path / 'v.jsonl'}", "data.num_frames=5"),
        progress=False,
    )
    assert report["pairs"] == 1 and report["skipped"] == {
        "missing": 1,
        "corrupt": 0,
        "short": 1,
        "not_a_file": 0,
    }
    assert report["frames"] == {"winner": {9: 1}, "loser": {7: 1}}
    assert report["codecs"] == {"h264": 1, "vp9": 1} and report["categories"] == {"motion": 1}
    assert report["resolution"]["winner"] == {"32x24": 1}
    assert "frames per clip" in format_report(report)


def test_a_recipe_with_overrides_names_the_data_and_prints_a_readable_report(tmp_path, capsys):
    path = write_manifest(tmp_path)
    recipe = tmp_path / "run.yaml"
    recipe.write_text("data:\n  source: manifest\n  path: elsewhere.jsonl\n")
    assert main(["data", "stats", str(recipe), f"data.path={path}", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"manifest {path}: 3 usable pairs of 5 rows" in out and "categories: motion 2, (none) 1" in out


def test_bad_invocations_end_in_one_clear_line(tmp_path, capsys):
    assert main(["data", "stats", "-q"]) == 1
    assert "needs a data path, a recipe, or --source" in capsys.readouterr().err
    assert main(["data", "stats", "--source", "manifest", "--path", str(tmp_path / "nope.jsonl"), "-q"]) == 1
    assert "nope.jsonl" in capsys.readouterr().err
    with pytest.raises(RunError, match="no .parquet files"):
        collect(*data_config("data.source=pickapic", f"data.path={tmp_path}"), progress=False)


def test_a_data_path_is_read_with_its_source_told_from_it(tmp_path, capsys):
    path = write_manifest(tmp_path)
    assert main(["data", "stats", str(path), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "manifest" and report["pairs"] == 3
    # --source overrides what the path looks like: read as a tar shard, the manifest is a corrupt one.
    assert main(["data", "stats", str(path), "--source", "shards", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shards ") and "corrupt_shards 1" in out
    # A data path that does not exist is named as one, not looked up as a recipe.
    assert main(["data", "stats", str(tmp_path / "missing.parquet"), "-q"]) == 1
    assert "data path not found" in capsys.readouterr().err


def test_infer_source_from_what_the_path_is(tmp_path):
    from vipo.engine.data.infer import infer_source

    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "a.parquet")
    assert infer_source(str(tmp_path / "a.parquet")) == "pickapic"
    folder = tmp_path / "parquets"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["x"]}), folder / "part-0.parquet")
    assert infer_source(str(folder)) == "pickapic"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "000.tar").write_bytes(b"")
    assert infer_source(str(tmp_path / "s")) == "shards"
    assert infer_source(str(tmp_path / "s" / "000.tar")) == "shards"
    assert infer_source(str(tmp_path / "s" / "{000..009}.tar")) == "shards"
    images = tmp_path / "images.jsonl"
    images.write_text('\n{"prompt": "p", "winner": "a.jpg", "loser": "b.jpg"}\n')
    assert infer_source(str(images)) == "manifest"
    clips = tmp_path / "clips.jsonl"
    clips.write_text('{"prompt": "p", "winner": "a.MP4", "loser": "b.webm"}\n')
    assert infer_source(str(clips)) == "video"
    for bad, words in (
        (tmp_path / "nope.parquet", "not found"),
        (tmp_path / "notes.txt", "cannot tell"),
        (tmp_path / "empty", "no .parquet"),
        (tmp_path / "blank.jsonl", "empty"),
        (tmp_path / "binary.jsonl", "not a JSONL manifest"),
    ):
        if bad.name == "notes.txt":
            bad.write_text("hello")
        elif bad.name == "empty":
            bad.mkdir()
        elif bad.name == "blank.jsonl":
            bad.write_text("\n\n")
        elif bad.name == "binary.jsonl":
            bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
        with pytest.raises(RunError, match=words):
            infer_source(str(bad))


def test_agreement_opens_parquet_pairs_by_path_and_counts_the_corrupt_one(tmp_path):
    from vipo.engine.eval.scoring.evaluation import open_pairs

    source = open_pairs(str(write_pickapic(tmp_path / "train-0.parquet")))
    items = [source.get(i) for i in range(len(source))]
    good = [item for item in items if item is not None]
    assert len(source) == 4 and len(good) == 3 and source.skipped == 1  # the tie is left out
    prompt, winner, loser = good[0]
    assert prompt.startswith("prompt ") and winner.shape == loser.shape
    (tmp_path / "s.tar").write_bytes(b"")
    with pytest.raises(RunError, match="is shards: agreement reads"):
        open_pairs(str(tmp_path / "s.tar"))
