"""PNG reports: metric curves drawn with matplotlib (`vipo plot RUN`, the demo's curves.png) and
image grids (PIL).

matplotlib is imported inside the plotting functions and draws on a `Figure` with its own Agg
canvas, which pyplot never sees: no display, no global state, and `vipo --help` stays light.

    plot_run("runs/x")                                    # runs/x/curves.png: loss, accuracy, ...
    plot_stages({"Stage 1: SFT": {"loss": pts}, "Stage 2: DPO": {...}}, "out.png")   # one page
"""

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Points = Sequence[tuple[float, float | None]]  # (step, value); a None, NaN or inf value is a gap

DEFAULT_KEYS = ("loss", "accuracy", "margin", "grad_norm")
PANEL_INCHES = (4.5, 3.0)  # one subplot; the default page grows with the number of subplots
MIN_WIDTH_INCHES = 6.4
HEADING_INCHES = 0.45  # room for the page title and for each stage's heading
DPI = 100
MAX_COLUMNS = 3
MIN_SMOOTHED = 8  # points below which a curve is drawn raw only
MAX_WINDOW = 51
MAX_MARKED = 30  # points up to which each raw value gets a marker
STAGE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
STAGE_TINTS = ("#eef3fa", "#fdf3e8", "#eef7ee", "#f4f0f8")  # a stage's background on a many-stage page
# y-axis labels with units for the metrics the trainer logs; any other key is labelled by its name.
AXIS_LABELS = {
    "loss": "loss",
    "accuracy": "batch implicit accuracy (share of pairs)",
    "margin": "implicit reward margin (z / β)",
    "mean_p": "mean σ(z) (probability)",
    "winner_change": "winner error − reference error (MSE)",
    "loser_change": "loser error − reference error (MSE)",
    "negative_margin_share": "negative margins (share of pairs)",
    "grad_factor": "mean |dL/dz|",
    "grad_norm": "gradient L2 norm (before clipping)",
    "lr": "learning rate",
    "pairs_per_s": "throughput (pairs / s)",
    "data_wait_s": "data wait (s per step)",
    "nonfinite_total": "non-finite steps skipped (count)",
}
# A dashed line where a metric means "no preference learned yet": (value, legend label).
GUIDES = {
    "accuracy": (0.5, "chance (0.5)"),
    "margin": (0.0, "no margin"),
    "winner_change": (0.0, "as the reference"),
    "loser_change": (0.0, "as the reference"),
}


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl. A torn last line (a run still writing, or one that was
    killed mid-write) is left out; a broken line before it is an error naming the line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    lines = [
        (n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()
    ]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path} line {number} is not JSON ({err.msg}): {line[:80]!r}") from None
    return rows


def metric_series(rows: Iterable[dict], keys: Iterable[str]) -> dict[str, list[tuple[float, float]]]:
    """{key: [(step, value), ...]} over the rows that logged the key; a key no row has is left out."""
    rows = list(rows)
    series = {key: [(row["step"], _as_float(row[key])) for row in rows if key in row] for key in keys}
    return {key: points for key, points in series.items() if points}


def plot_run(run_dir: Path, out: Path | None = None, keys: Sequence[str] | None = None) -> Path:
    """The curves of a run folder's metrics.jsonl -> <run>/curves.png. `keys`: the metrics to draw,
    each of which the run must have logged; None draws those of DEFAULT_KEYS it logged."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(run_dir)
    logged = sorted({key for row in rows for key in row} - {"step"})
    have = ", ".join(logged) or "no metrics"
    if keys is None:
        keys = [key for key in DEFAULT_KEYS if key in logged]
        if not keys:
            raise ValueError(
                f"{path} has none of {', '.join(DEFAULT_KEYS)}; it has: {have} (choose with --keys)"
            )
    missing = [key for key in dict.fromkeys(keys) if key not in logged]
    if missing:
        noun = "metric" if len(missing) == 1 else "metrics"
        raise ValueError(f"{path} has no {noun} {', '.join(map(repr, missing))}; it has: {have}")
    steps = [row["step"] for row in rows]
    title = f"{run_dir}: {len(rows)} rows, steps {min(steps):g} to {max(steps):g}"
    return plot_curves(
        metric_series(rows, dict.fromkeys(keys)), out or Path(run_dir) / "curves.png", title=title
    )


def plot_curves(
    series: Mapping[str, Points],
    out: Path,
    title: str = "",
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = DPI,
) -> Path:
    """One subplot per series name, titled with it: raw values faint under their centred mean."""
    return plot_stages({"": series}, out, title, figsize=figsize, dpi=dpi)


def plot_stages(
    stages: Mapping[str, Mapping[str, Points]],
    out: Path,
    title: str = "",
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = DPI,
) -> Path:
    """Several stages of a run on one page (see stages_figure) -> a PNG of figsize x dpi pixels."""
    figure = stages_figure(stages, title, figsize=figsize, dpi=dpi)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi, format="png")
    return out


def stages_figure(
    stages: Mapping[str, Mapping[str, Points]],
    title: str = "",
    *,
    figsize: tuple[float, float] | None = None,
    dpi: int = DPI,
):
    """A matplotlib Figure (on an Agg canvas) with one band per stage: its heading over its subplots,
    up to MAX_COLUMNS a row, in the stage's colour. A stage named "" has no heading. figsize
    (inches) defaults to PANEL_INCHES per subplot plus HEADING_INCHES per heading and title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = {heading: panels for heading, panels in stages.items() if panels}
    if not stages:
        raise ValueError("nothing to plot: no series given")
    grids = [_grid(len(panels)) for panels in stages.values()]
    headed = [HEADING_INCHES if heading else 0 for heading in stages]
    heights = [rows * PANEL_INCHES[1] + heading for (rows, _), heading in zip(grids, headed, strict=True)]
    if figsize is None:
        width = max(MIN_WIDTH_INCHES, max(columns for _, columns in grids) * PANEL_INCHES[0])
        figsize = (width, sum(heights) + (HEADING_INCHES if title else 0))
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained", facecolor="white")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title, fontweight="bold")
    bands = figure.subfigures(len(stages), 1, height_ratios=heights, squeeze=False)[:, 0]
    for number, (band, (heading, panels), (rows, columns)) in enumerate(
        zip(bands, stages.items(), grids, strict=True)
    ):
        if len(stages) > 1:
            band.set_facecolor(STAGE_TINTS[number % len(STAGE_TINTS)])
        if heading:
            band.suptitle(heading, x=0.01, ha="left", fontsize="large")
        axes = band.subplots(rows, columns, squeeze=False).ravel()
        for ax, (name, points) in zip(axes, panels.items(), strict=False):
            _draw_panel(ax, name, points, STAGE_COLOURS[number % len(STAGE_COLOURS)])
        for ax in axes[len(panels) :]:
            band.delaxes(ax)
    return figure


def smoothing_window(points: int) -> int:
    """Points in the centred mean: about a tenth of the curve, odd, 3 to MAX_WINDOW; 1 (no
    smoothing) under MIN_SMOOTHED points."""
    return 1 if points < MIN_SMOOTHED else min(MAX_WINDOW, max(3, (points // 10) | 1))


def centred_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of the finite values within window // 2 points either side (fewer at the ends, so
    the curve neither lags nor loses its ends); NaN where `values` is not finite, so a gap stays."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(len(values))
    low, high = np.maximum(index - window // 2, 0), np.minimum(index + window // 2 + 1, len(values))
    mean = (sums[high] - sums[low]) / np.maximum(counts[high] - counts[low], 1)
    return np.where(finite, mean, np.nan)


def _draw_panel(ax, name: str, points: Points, colour: str) -> None:
    from matplotlib.ticker import MaxNLocator

    steps = np.array([step for step, _ in points], dtype=float)
    values = np.array([_as_float(value) for _, value in points], dtype=float)
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    finite = np.isfinite(values)
    values[~finite] = np.nan  # matplotlib leaves a gap at NaN; inf would stretch the axis instead
    count = int(finite.sum())
    window = smoothing_window(count)
    if count:
        # Few points: mark each. Many: mark only a value between two gaps, which draws no segment.
        raw_alpha = 0.35 if window > 1 else 1.0
        marker = "o" if count <= MAX_MARKED else None
        ax.plot(
            steps,
            values,
            color=colour,
            alpha=raw_alpha,
            linewidth=1,
            marker=marker,
            markersize=3,
            label="raw",
        )
        alone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
        if marker is None and alone.any():
            ax.plot(
                steps[alone],
                values[alone],
                color=colour,
                alpha=raw_alpha,
                linestyle="none",
                marker="o",
                markersize=3,
            )
        if window > 1:
            ax.plot(
                steps,
                centred_mean(values, window),
                color=colour,
                linewidth=2,
                label=f"centred mean of {window} points",
            )
        if name in GUIDES:
            level, label = GUIDES[name]
            ax.axhline(level, color="0.45", linestyle="--", linewidth=1, label=label)
    else:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="0.4")
    if count < len(values):  # where the gaps are: a red cross on the x axis at each non-finite step
        ax.plot(
            steps[~finite],
            np.full(len(values) - count, 0.02),
            transform=ax.get_xaxis_transform(),
            color="tab:red",
            linestyle="none",
            marker="x",
            markersize=5,
            label=f"not finite ({len(values) - count})",
        )
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylabel(AXIS_LABELS.get(name, name))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(steps) and steps.max() - steps.min() < 2:  # one step: a window with integer ticks around it
        ax.set_xlim(steps.min() - 1, steps.max() + 1)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _grid(panels: int) -> tuple[int, int]:
    """(rows, columns) for a band of subplots: rows as even as they can be, MAX_COLUMNS at most."""
    rows = math.ceil(panels / MAX_COLUMNS)
    return rows, math.ceil(panels / rows)


def _as_float(value) -> float:
    return math.nan if value is None else float(value)


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
