"""PNG reports drawn with PIL alone: metric curves (`vipo plot RUN`) and image grids."""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(
    series: dict[str, list[tuple[float, float]]], out: Path, title: str = "", size=(640, 360)
) -> Path:
    """One panel per series name: (x, y) points as a line with its min/max labelled."""
    names = [n for n, pts in series.items() if any(math.isfinite(y) for _, y in pts)]
    panel_h = size[1]
    image = Image.new("RGB", (size[0], panel_h * max(1, len(names)) + 24), "white")
    pen = ImageDraw.Draw(image)
    pen.text((8, 4), title, fill="black")
    for row, name in enumerate(names):
        pts = [(x, y) for x, y in series[name] if math.isfinite(y)]
        top, left, right, bottom = 24 + row * panel_h + 20, 60, size[0] - 12, 24 + (row + 1) * panel_h - 24
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        pen.rectangle((left, top, right, bottom), outline=(160, 160, 160))
        pen.text((left, top - 16), name, fill="black")
        pen.text((4, top), f"{y1:.4g}", fill=(90, 90, 90))
        pen.text((4, bottom - 10), f"{y0:.4g}", fill=(90, 90, 90))
        pen.text((right - 60, bottom + 4), f"step {x1:g}", fill=(90, 90, 90))
        scaled = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
                  for x, y in pts]  # fmt: skip
        if len(scaled) > 1:
            pen.line(scaled, fill=COLOURS[row % len(COLOURS)], width=2)
        else:
            pen.ellipse(
                (scaled[0][0] - 2, scaled[0][1] - 2, scaled[0][0] + 2, scaled[0][1] + 2), fill=COLOURS[0]
            )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def plot_run(
    run_dir: Path,
    out: Path | None = None,
    keys: tuple[str, ...] = ("loss", "accuracy", "margin", "grad_norm"),
) -> Path:
    """The curves of a run folder's metrics.jsonl -> <run>/curves.png."""
    rows = read_metrics(run_dir)
    series = {k: [(r["step"], float(r[k])) for r in rows if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError(f"{run_dir}/metrics.jsonl has none of {', '.join(keys)}")
    return plot_curves(series, out or Path(run_dir) / "curves.png", title=str(run_dir))


def image_grid(
    rows: list[np.ndarray],
    row_labels: list[str],
    out: Path,
    scale: int = 4,
    col_labels: list[str] | None = None,
) -> Path:
    """rows: [N, H, W, 3] uint8 arrays of equal N; one labelled row each."""
    n, h, w, _ = rows[0].shape
    label_w, label_h = 110, 14 if col_labels else 0
    cell_w, cell_h = w * scale, h * scale
    image = Image.new("RGB", (label_w + n * (cell_w + 2), label_h + len(rows) * (cell_h + 2)), "white")
    pen = ImageDraw.Draw(image)
    for c, text in enumerate(col_labels or []):
        pen.text((label_w + c * (cell_w + 2), 0), text[: cell_w // 6], fill="black")
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = label_h + r * (cell_h + 2)
        pen.text((4, y + cell_h // 2 - 6), label, fill="black")
        for c in range(n):
            tile = Image.fromarray(images[c]).resize((cell_w, cell_h), Image.NEAREST)
            image.paste(tile, (label_w + c * (cell_w + 2), y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
