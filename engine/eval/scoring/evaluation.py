"""The two scoring jobs behind the CLI: score sample folders into the Table 2 layout (`vipo eval`),
and score the pairs of a data set for agreement (`vipo data agreement`).

Both go through their inputs in chunks of the scorers' batch size, so a folder of videos is
never held in memory whole.
"""

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...errors import RunError
from .agreement import agreement, suggest_alpha
from .table import summarize, to_markdown

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")

# ---------------------------------------------------------------------------------------------
# Sample folders


def read_index(folder: Path) -> list[dict]:
    """The rows of a sample folder's index.jsonl (written by `vipo sample`)."""
    path = Path(folder) / "index.jsonl"
    if not path.is_file():
        raise RunError(f"{folder}: no index.jsonl (a folder written by `vipo sample`)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        missing = [k for k in ("prompt", "file") if not isinstance(row.get(k), str)]
        if missing:
            raise RunError(f"{path}:{number}: missing {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise RunError(f"{path} lists no samples")
    return rows


def read_video(path: Path, max_frames: int) -> np.ndarray:
    """Up to `max_frames` evenly spaced frames of a video file, [F, H, W, 3] uint8."""
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("no video frames")
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    return np.stack([frames[i] for i in picks])


def load_media(path: Path, max_frames: int):
    from PIL import Image

    if not path.is_file():
        raise RunError(f"sample file not found: {path}")
    try:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return read_video(path, max_frames)
        with Image.open(path) as image:
            return image.convert("RGB")
    except RunError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL and av raise many types for a broken file
        raise RunError(f"cannot decode sample {path}: {err}") from None


def model_names(folders: list[Path]) -> list[str]:
    names = [f.name for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


def score_folder(folder: Path, scorers: dict, progress: bool = True) -> list[dict]:
    """Per-image rows of a sample folder: its index row plus one score per scorer."""
    rows = read_index(folder)
    batch = max(s.batch_size for s in scorers.values())
    frames = max(s.video_frames for s in scorers.values())
    bar = tqdm(
        total=len(rows), desc=f"score {folder.name}", unit="img", disable=not progress, dynamic_ncols=True
    )
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        media = [load_media(folder / row["file"], frames) for row in chunk]
        prompts = [row["prompt"] for row in chunk]
        for name, scorer in scorers.items():
            for row, value in zip(chunk, scorer.score(media, prompts).tolist(), strict=True):
                row[name] = value
        bar.update(len(chunk))
    bar.close()
    return rows


def per_prompt(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean over each prompt's images (the paper's 'average reward of 4 images a prompt')."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row.get("prompt_index"), row["prompt"])].append(row)
    out = []
    for (index, prompt), items in groups.items():
        out.append(
            {
                "prompt_index": index,
                "prompt": prompt,
                "images": len(items),
                **{m: float(np.mean([r[m] for r in items])) for m in metrics},
            }
        )
    return out


def evaluate_folders(
    folders: list[Path], scorers: dict, out_dir: Path, base: Path | None = None, progress: bool = True
) -> dict:
    """Score every folder; write scores.jsonl (per prompt), images.jsonl (per image), table.md
    and table.json into `out_dir`; return the table."""
    folders = [Path(f) for f in folders]
    if base is not None and Path(base) not in folders:
        folders = [Path(base), *folders]
    names = model_names(folders)
    base_name = names[folders.index(Path(base))] if base is not None else None
    metrics = list(scorers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt_rows: dict[str, list[dict]] = {}
    with open(out_dir / "images.jsonl", "w", encoding="utf-8") as images_file:
        for name, folder in zip(names, folders, strict=True):
            rows = score_folder(folder, scorers, progress)
            images_file.writelines(json.dumps({"model": name, **row}) + "\n" for row in rows)
            prompt_rows[name] = per_prompt(rows, metrics)
    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as scores_file:
        for name, rows in prompt_rows.items():
            scores_file.writelines(json.dumps({"model": name, **row}) + "\n" for row in rows)
    if base_name is not None:
        base_prompts = {r["prompt"] for r in prompt_rows[base_name]}
        for name, rows in prompt_rows.items():
            if {r["prompt"] for r in rows} != base_prompts:
                log.warning(
                    "%s was sampled for other prompts than the base %s: gains compare different sets",
                    name,
                    base_name,
                )
    table = summarize(
        {name: {m: [r[m] for r in rows] for m in metrics} for name, rows in prompt_rows.items()},
        {name: scorer.gain for name, scorer in scorers.items()},
        base_name,
    )
    table["folders"] = {name: str(folder) for name, folder in zip(names, folders, strict=True)}
    (out_dir / "table.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    (out_dir / "table.md").write_text(to_markdown(table), encoding="utf-8")
    return table


# ---------------------------------------------------------------------------------------------
# Pair sources for agreement


class ManifestImages:
    """The pairs of a JSONL manifest (loaders/manifest.py's format) as whole decoded images:
    reward models do their own resizing, so no training transform is applied. A missing or
    corrupt image is a counted, logged skip."""

    def __init__(self, path: Path, allow_outside_root: bool = False):
        from vipo.loaders.images import SourceError
        from vipo.loaders.manifest import read_manifest

        try:
            self.entries = read_manifest(path, allow_outside_root=allow_outside_root)
        except SourceError as err:
            raise RunError(str(err)) from None
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, index: int):
        from vipo.loaders.images import BadSample, decode_image

        entry = self.entries[index]
        try:
            return entry.prompt, decode_image(entry.winner), decode_image(entry.loser)
        except BadSample as bad:
            self.skipped += 1
            log.warning("skipped pair %s: %s (%d skipped so far)", entry.id, bad, self.skipped)
            return None


class RecordImages:
    """A map-style PairRecord source (e.g. the procedural pairs) behind the same `get`."""

    def __init__(self, source):
        self.source, self.skipped = source, 0

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int):
        from vipo.loaders.images import BadSample

        try:
            record = self.source[index]
        except BadSample as bad:
            self.skipped += 1
            log.warning("skipped pair %d: %s (%d skipped so far)", index, bad, self.skipped)
            return None
        return record.prompt, record.winner, record.loser


# Parquet pairs are cropped to this square for scoring (reward models resize to their own input).
PARQUET_SIDE = 512


def open_pairs(
    spec: str,
    *,
    source: str | None = None,
    pairs: int = 256,
    resolution: int = 64,
    flip_prob: float = 0.3,
    seed: int = 0,
    allow_outside_root: bool = False,
):
    """`procedural:clean|noisy|shuffled`, or a data path: a JSONL manifest or Pick-a-Pic parquet
    (a file or a folder), its kind told from the path (engine/data/infer.py) unless `source` says."""
    if spec.startswith("procedural:"):
        from vipo.loaders.procedural import REGIMES, ProceduralPairs

        regime = spec.split(":", 1)[1]
        if regime not in REGIMES:
            raise RunError(f"unknown procedural regime {regime!r} (known: {', '.join(REGIMES)})")
        return RecordImages(ProceduralPairs(pairs, resolution, regime, flip_prob, seed))
    from ...data.infer import infer_source

    kind = source or infer_source(spec)
    if kind == "manifest":
        return ManifestImages(Path(spec), allow_outside_root)
    if kind == "pickapic":
        from vipo.loaders.images import PairTransform, SourceError
        from vipo.loaders.pickapic import PickapicPairs

        try:
            return RecordImages(PickapicPairs(spec, PairTransform(PARQUET_SIDE)))
        except (SourceError, OSError, ValueError) as err:
            raise RunError(f"data (pickapic {spec}): {err}") from None
    raise RunError(
        f"data source {spec!r} is {kind}: agreement reads image pairs from procedural:REGIME, a "
        f"JSONL manifest or Pick-a-Pic parquet (tar shards and video: not yet)"
    )


def score_pairs(source, scorers: dict, progress: bool = True) -> tuple[list[dict], int]:
    """Per-pair rows {index, prompt, <scorer>: [winner, loser]} and the skip count."""
    batch = max(s.batch_size for s in scorers.values())
    rows = []
    bar = tqdm(total=len(source), desc="score pairs", unit="pair", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(source), batch):
        items = [(i, source.get(i)) for i in range(start, min(start + batch, len(source)))]
        items = [(i, item) for i, item in items if item is not None]
        if items:
            prompts = [item[0] for _, item in items]
            images = [item[1] for _, item in items] + [item[2] for _, item in items]
            scored = {
                name: scorer.score(images, prompts + prompts).view(2, -1) for name, scorer in scorers.items()
            }
            for k, (index, item) in enumerate(items):
                rows.append(
                    {
                        "index": index,
                        "prompt": item[0],
                        **{n: [s[0, k].item(), s[1, k].item()] for n, s in scored.items()},
                    }
                )
        bar.update(min(batch, len(source) - start))
    bar.close()
    return rows, source.skipped


def pair_agreement(source, scorers: dict, *, easy_margin: float = 1.0, progress: bool = True) -> dict:
    rows, skipped = score_pairs(source, scorers, progress)
    if not rows:
        raise RunError(f"no pair could be scored ({skipped} skipped)")
    winners = {n: torch.tensor([r[n][0] for r in rows]) for n in scorers}
    losers = {n: torch.tensor([r[n][1] for r in rows]) for n in scorers}
    stats = agreement(winners, losers, easy_margin=easy_margin, skipped=skipped)
    return {"stats": stats, "suggestion": suggest_alpha(stats), "rows": rows}
