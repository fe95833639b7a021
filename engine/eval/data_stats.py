"""`vipo data stats`: what a data source holds before a run spends GPU hours on it.

    report = collect(cfg.data, cfg.model)        # one pass over the pairs, headers only
    print(format_report(report))                 # or json.dumps(report)

The report counts usable pairs, skips by reason (ties, unlabeled, identical and bad labels are
data policy; missing, corrupt, not_a_file (a folder or FIFO named like an image), short and
incomplete are damage that training would skip), the resolution and aspect-ratio histograms of
winners and losers, frames per clip and codecs for video, and pairs per category. Sizes come from
image headers (PIL reads the header, not the pixels) and clip probes (packets, no decoding), so a
pass over Pick-a-Pic costs a read of its image bytes, not a decode of them; `decode=True` decodes
every image, the only way to find a JPEG cut short after its header.
"""

import json
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

from ..errors import RunError
from ..families import family

POLICY_KINDS = ("ties", "unlabeled", "identical", "bad_label")
TOP_ROWS = 10  # histogram rows printed per table (the JSON has them all)


class _Tally:
    """Counters of one pass; a pair is usable or skipped for its first bad image."""

    def __init__(self, kinds):
        self.pairs, self.rows = 0, 0
        self.skipped: Counter[str] = Counter({kind.removeprefix("skipped_"): 0 for kind in kinds})
        self.examples: dict[str, str] = {}
        self.categories: Counter[str] = Counter()
        self.resolution = {"winner": Counter(), "loser": Counter()}
        self.aspect = {"winner": Counter(), "loser": Counter()}
        self.frames = {"winner": Counter(), "loser": Counter()}
        self.codecs: Counter[str] = Counter()

    def skip(self, kind: str, ref: str, count: int = 1) -> None:
        kind = kind.removeprefix("skipped_")
        self.skipped[kind] += count
        self.examples.setdefault(kind, ref)

    def size(self, role: str, width: int, height: int) -> None:
        self.resolution[role][f"{width}x{height}"] += 1
        self.aspect[role][f"{width / height:.2f}"] += 1

    def pair(self, category: str) -> None:
        self.pairs += 1
        self.categories[category or "(none)"] += 1

    def report(self, source: str, path: str | None, video: bool) -> dict:
        def ordered(counter: Counter) -> dict:
            return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))

        report = {
            "source": source,
            "path": path,
            "rows": self.rows,
            "pairs": self.pairs,
            "skipped": dict(self.skipped),
            "skipped_examples": self.examples,
            "categories": ordered(self.categories),
            "resolution": {role: ordered(c) for role, c in self.resolution.items()},
            "aspect": {role: ordered(c) for role, c in self.aspect.items()},
        }
        if video:
            report["frames"] = {role: dict(sorted(c.items())) for role, c in self.frames.items()}
            report["codecs"] = ordered(self.codecs)
        return report


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _image_size(data, ref: str, decode: bool) -> tuple[int, int]:
    from vipo.loaders.images import decode_image, image_size

    return decode_image(data, ref=ref).size if decode else image_size(data, ref=ref)


def _pair_sizes(tally: _Tally, winner, loser, ref: str, category: str, decode: bool) -> None:
    """Sizes of both images, or the pair's skip by the first bad image's reason."""
    from vipo.loaders.images import BadSample

    try:
        sizes = [
            _image_size(data, f"{ref}:{role}", decode)
            for role, data in (("winner", winner), ("loser", loser))
        ]
    except BadSample as bad:
        tally.skip(bad.kind, f"{bad.ref}: {bad.reason}")
        return
    for role, (width, height) in zip(("winner", "loser"), sizes, strict=True):
        tally.size(role, width, height)
    tally.pair(category)


def _manifest(data_cfg, tally: _Tally, progress: bool, decode: bool) -> None:
    from vipo.loaders.manifest import read_manifest

    entries = read_manifest(data_cfg.path, allow_outside_root=data_cfg.allow_outside_root)
    with _progress(len(entries), progress) as bar:
        for entry in entries:
            tally.rows += 1
            _pair_sizes(tally, entry.winner, entry.loser, entry.id, entry.category, decode)
            bar.update()


def _pickapic(data_cfg, tally: _Tally, progress: bool, decode: bool) -> None:
    import pyarrow.parquet as pq

    from vipo.loaders.images import PairTransform
    from vipo.loaders.pickapic import PickapicPairs

    # The source's own index pass (label columns only) classifies ties, unlabeled and identical rows.
    pairs = PickapicPairs(data_cfg.path, PairTransform(8), keep_ties=data_cfg.keep_ties)
    for kind, count in pairs.stats().items():
        if count:
            tally.skip(kind, "label columns", count)
    tally.rows = len(pairs) + sum(pairs.stats().values())
    with _progress(len(pairs), progress) as bar:
        start = 0
        while start < len(pairs):
            file_index, group = int(pairs.file_of[start]), int(pairs.group_of[start])
            stop = start
            while stop < len(pairs) and (pairs.file_of[stop], pairs.group_of[stop]) == (file_index, group):
                stop += 1
            table = pq.ParquetFile(pairs.files[file_index]).read_row_group(group, columns=["jpg_0", "jpg_1"])
            for index in range(start, stop):
                row, won = int(pairs.row_of[index]), int(pairs.winner_of[index])
                first = 1 if won == 1 else 0
                images = [table[f"jpg_{k}"][row].as_py() for k in (first, 1 - first)]
                ref = f"{pairs.files[file_index].name} row group {group} row {row}"
                if any(image is None for image in images):
                    tally.skip("skipped_missing", f"{ref}: image bytes are null")
                else:
                    _pair_sizes(tally, *images, ref, "tie" if won == 2 else "", decode)
            bar.update(stop - start)
            start = stop


def _video(data_cfg, model_cfg, tally: _Tally, progress: bool) -> None:
    from vipo.loaders.images import BadSample
    from vipo.loaders.video import FrameSampling, probe
    from vipo.loaders.video_manifest import VideoPairManifest

    entries = VideoPairManifest._read(Path(data_cfg.path), data_cfg.allow_outside_root)
    sampling = FrameSampling(
        data_cfg.num_frames,
        stride=None if data_cfg.fps else data_cfg.frame_stride,
        fps=data_cfg.fps or None,
        start="start",
        frame_chunk=family(model_cfg.family).frame_chunk,
    )
    with _progress(len(entries), progress) as bar:
        for entry in entries:
            tally.rows += 1
            bar.update()
            try:
                clips = {role: probe(entry[role]) for role in ("winner", "loser")}
                for clip in clips.values():
                    sampling.indices(clip)  # too short for data.num_frames: training would skip the pair
            except BadSample as bad:
                tally.skip(bad.kind, f"pair {entry['id']}: {bad}")
                continue
            for role, clip in clips.items():
                tally.size(role, clip.width, clip.height)
                tally.frames[role][clip.num_frames] += 1
                tally.codecs[clip.codec] += 1
            tally.pair(entry["category"])


def _shards(data_cfg, tally: _Tally, progress: bool, decode: bool) -> None:
    from vipo.loaders.shards import _samples, shard_files

    with _progress(None, progress) as bar:
        for path in shard_files(data_cfg.path):
            try:
                for _, key, parts in _samples(path, 0):
                    tally.rows += 1
                    bar.update()
                    ref = f"{path.name}:{key}"
                    winner = next((v for k, v in parts.items() if k.startswith("winner.")), None)
                    loser = next((v for k, v in parts.items() if k.startswith("loser.")), None)
                    try:
                        meta = json.loads(parts["json"]) if "json" in parts else {}
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        tally.skip("skipped_corrupt", f"{ref}: bad json ({err})")
                        continue
                    meta = meta if isinstance(meta, dict) else {}
                    if winner is None or loser is None or ("prompt" not in meta and "txt" not in parts):
                        tally.skip("skipped_incomplete", f"{ref}: members {', '.join(sorted(parts))}")
                        continue
                    _pair_sizes(tally, winner, loser, ref, str(meta.get("category", "")), decode)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                tally.skip("skipped_corrupt_shards", f"{path}: {err}")


def _procedural(data_cfg, model_cfg, tally: _Tally, progress: bool) -> None:
    from ..data import build_source

    source = build_source(data_cfg, model_cfg, seed=0)
    with _progress(len(source), progress) as bar:
        for index in range(len(source)):
            record = source[index]
            tally.rows += 1
            for role, pixels in (("winner", record.winner), ("loser", record.loser)):
                tally.size(role, pixels.shape[1], pixels.shape[0])
            tally.pair(record.category)
            bar.update()


KINDS = {
    "manifest": ("skipped_missing", "skipped_corrupt", "skipped_not_a_file"),
    "pickapic": (
        "skipped_ties",
        "skipped_unlabeled",
        "skipped_identical",
        "skipped_bad_label",
        "skipped_missing",
        "skipped_corrupt",
    ),
    "video": ("skipped_missing", "skipped_corrupt", "skipped_short", "skipped_not_a_file"),
    "shards": ("skipped_missing", "skipped_corrupt", "skipped_incomplete", "skipped_corrupt_shards"),
    "procedural": (),
}


def collect(data_cfg, model_cfg, *, progress: bool = True, decode: bool = False) -> dict:
    """One pass over the pairs of `data_cfg`; the report `vipo data stats --json` prints."""
    from vipo.loaders.images import SourceError

    tally = _Tally(KINDS[data_cfg.source])
    try:
        if data_cfg.source == "manifest":
            _manifest(data_cfg, tally, progress, decode)
        elif data_cfg.source == "pickapic":
            _pickapic(data_cfg, tally, progress, decode)
        elif data_cfg.source == "video":
            _video(data_cfg, model_cfg, tally, progress)
        elif data_cfg.source == "shards":
            _shards(data_cfg, tally, progress, decode)
        else:
            _procedural(data_cfg, model_cfg, tally, progress)
    except (SourceError, OSError, ValueError) as err:
        raise RunError(f"data ({data_cfg.source} {data_cfg.path}): {err}") from None
    return tally.report(data_cfg.source, data_cfg.path, video=data_cfg.source == "video")


def _row(counts: dict, limit: int = TOP_ROWS) -> str:
    if not counts:
        return "-"
    items = list(counts.items())
    text = ", ".join(f"{key} {value}" for key, value in items[:limit])
    return text + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def format_report(report: dict) -> str:
    """The report as a few readable lines: totals, skips with an example each, histograms."""
    skipped = {kind: n for kind, n in report["skipped"].items() if n}
    damaged = sum(n for kind, n in skipped.items() if kind not in POLICY_KINDS)
    lines = [
        f"{report['source']} {report['path'] or ''}".rstrip() + f": {report['pairs']} usable pairs of "
        f"{report['rows']} rows; {damaged} with bad files",
        f"skipped: {_row(skipped, limit=len(skipped) or 1)}",
    ]
    for kind, example in report["skipped_examples"].items():
        lines.append(f"  first {kind}: {example}")
    lines.append(f"categories: {_row(report['categories'])}")
    for role in ("winner", "loser"):
        lines.append(f"{role} sizes: {_row(report['resolution'][role])}")
        lines.append(f"{role} aspect (w/h): {_row(report['aspect'][role])}")
    if "frames" in report:
        for role in ("winner", "loser"):
            lines.append(f"{role} frames per clip: {_row(report['frames'][role])}")
        lines.append(f"codecs: {_row(report['codecs'])}")
    return "\n".join(lines)
