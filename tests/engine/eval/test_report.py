"""Metric curves drawn with matplotlib: real PNGs of the stated size, one subplot per metric over
steps, a centred mean over faint raw values, gaps for non-finite values, both demo stages on one
page, and a clear error for a metric the run did not log."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vipo.engine.config import load_demo_config
from vipo.engine.eval.demo import plot_demo_curves
from vipo.engine.eval.report import (
    AXIS_LABELS,
    DPI,
    HEADING_INCHES,
    PANEL_INCHES,
    STAGE_TINTS,
    centred_mean,
    metric_series,
    plot_curves,
    plot_run,
    read_metrics,
    smoothing_window,
    stages_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run, rows, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return run


def training_rows(steps, seed=0, keys=("loss", "accuracy", "margin", "grad_norm")):
    rng = np.random.default_rng(seed)
    return [{"step": step, **{key: float(1 / step + 0.1 * rng.random()) for key in keys}} for step in steps]


def assert_png(path, size, colours=250, shades=50):
    """A real PNG of `size` pixels (within one), with more than `colours` distinct colours and
    `shades` saturated ones: antialiased curves, not a few flat pen colours (PIL's drawing had ~230
    and 4)."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert abs(image.width - size[0]) <= 1 and abs(image.height - size[1]) <= 1, image.size
        counted = image.convert("RGB").getcolors(maxcolors=1 << 20)
    saturated = [rgb for _, rgb in counted if max(rgb) - min(rgb) > 40]
    assert len(counted) > colours and len(saturated) > shades, (
        f"{len(counted)} colours, {len(saturated)} saturated"
    )
    return {rgb for _, rgb in counted}


def panel(figure, title):
    (ax,) = [ax for ax in figure.axes if ax.get_title() == title]
    return ax


def lines_labelled(ax, label):
    return [line for line in ax.get_lines() if line.get_label() == label]


def test_plot_run_writes_a_png_of_the_default_size_with_many_colours(tmp_path):
    run = write_metrics(tmp_path / "run", training_rows(range(1, 61)))
    out = plot_run(run)
    assert out == run / "curves.png"
    # Four metrics: two rows of two panels under the title.
    width = 2 * PANEL_INCHES[0] * DPI
    assert_png(out, (width, (2 * PANEL_INCHES[1] + HEADING_INCHES) * DPI))


def test_figsize_and_dpi_set_the_png_size_in_pixels(tmp_path):
    out = plot_curves(
        {"loss": [(s, 1 / s) for s in range(1, 30)]}, tmp_path / "c.png", figsize=(5, 3), dpi=80
    )
    assert_png(out, (400, 240))


def test_each_metric_is_a_subplot_titled_with_its_name_over_steps():
    series = {key: [(s, float(s)) for s in range(1, 11)] for key in ("loss", "accuracy", "my_metric")}
    figure = stages_figure({"": series})
    assert [ax.get_title() for ax in figure.axes] == ["loss", "accuracy", "my_metric"]
    for ax in figure.axes:
        assert ax.get_xlabel() == "step" and ax.get_legend() is not None
    assert panel(figure, "accuracy").get_ylabel() == AXIS_LABELS["accuracy"]
    assert panel(figure, "my_metric").get_ylabel() == "my_metric"  # an unknown key is labelled by name


def test_the_centred_mean_is_drawn_over_faint_raw_values():
    rng = np.random.default_rng(1)
    values = rng.random(100)
    ax = stages_figure({"": {"loss": list(zip(range(100), values, strict=True))}}).axes[0]
    window = smoothing_window(100)
    (raw,) = lines_labelled(ax, "raw")
    (smooth,) = lines_labelled(ax, f"centred mean of {window} points")
    assert window == 11 and raw.get_alpha() < 0.5 and smooth.get_alpha() in (None, 1.0)
    np.testing.assert_allclose(smooth.get_ydata(), centred_mean(values, window))
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["raw", "centred mean of 11 points"]


def test_centred_mean_averages_the_finite_neighbours_and_keeps_gaps():
    rng = np.random.default_rng(2)
    values = rng.normal(size=40)
    values[[0, 7, 8, 30]] = np.nan
    window = 5
    expected = [
        np.nan if math.isnan(v) else np.nanmean(values[max(i - 2, 0) : i + 3]) for i, v in enumerate(values)
    ]
    np.testing.assert_allclose(centred_mean(values, window), expected)
    assert smoothing_window(7) == 1 and smoothing_window(8) == 3 and smoothing_window(10_000) == 51


def test_a_single_row_is_a_marked_point_with_integer_step_ticks(tmp_path):
    run = write_metrics(tmp_path / "run", [{"step": 5, "loss": 0.7, "accuracy": 0.25}])
    size = (2 * PANEL_INCHES[0] * DPI, (PANEL_INCHES[1] + HEADING_INCHES) * DPI)
    assert_png(plot_run(run), size, colours=100, shades=2)  # two dots and their legends
    figure = stages_figure({"": {"loss": [(5, 0.7)]}})
    ax = figure.axes[0]
    (raw,) = lines_labelled(ax, "raw")
    assert raw.get_marker() == "o" and list(raw.get_ydata()) == [0.7]
    low, high = ax.get_xlim()
    assert low < 5 < high
    figure.canvas.draw()
    ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_non_finite_values_are_gaps_marked_on_the_axis_not_a_crash(tmp_path):
    points = [(s, 1.0 / s) for s in range(1, 41)]
    points[10], points[11], points[25] = (11, float("nan")), (12, None), (26, float("inf"))
    out = plot_curves({"loss": points, "lost": [(1, float("nan")), (2, None)]}, tmp_path / "c.png")
    assert out.is_file()

    figure = stages_figure({"": {"loss": points, "lost": [(1, float("nan")), (2, None)]}})
    ax = panel(figure, "loss")
    (raw,) = lines_labelled(ax, "raw")
    gaps = np.flatnonzero(np.isnan(np.asarray(raw.get_ydata(), dtype=float)))
    assert list(gaps) == [10, 11, 25]  # NaN in the line: matplotlib breaks it there
    (crosses,) = lines_labelled(ax, "not finite (3)")
    assert list(crosses.get_xdata()) == [11, 12, 26]
    assert ax.get_ylim()[1] < 2  # the inf did not stretch the axis
    lost = panel(figure, "lost")
    assert "no finite values" in [text.get_text() for text in lost.texts]


def test_a_metric_in_only_some_rows_is_drawn_at_the_steps_that_logged_it(tmp_path):
    rows = training_rows(range(1, 31), keys=("loss",))
    for row in rows[4::5]:
        row["eval_accuracy"] = row["step"] / 30
    run = write_metrics(tmp_path / "run", rows)
    out = plot_run(run, tmp_path / "some.png", ["loss", "eval_accuracy"])
    assert_png(out, (2 * PANEL_INCHES[0] * DPI, (PANEL_INCHES[1] + HEADING_INCHES) * DPI))
    series = metric_series(read_metrics(run), ["loss", "eval_accuracy", "absent"])
    assert list(series) == ["loss", "eval_accuracy"]
    ax = panel(stages_figure({"": series}), "eval_accuracy")
    (raw,) = lines_labelled(ax, "raw")
    assert list(raw.get_xdata()) == [5, 10, 15, 20, 25, 30]


def test_both_demo_stages_share_one_page_each_under_its_heading(tmp_path):
    cfg, demo = load_demo_config(
        None, ["loss.alpha=8", "loss.objective=poly_dpo", "demo.sft_steps=40", "train.max_steps=30"]
    )
    write_metrics(tmp_path / "sft", training_rows(range(1, 41), keys=("loss", "grad_norm")))
    write_metrics(
        tmp_path / "dpo", training_rows(range(1, 31), keys=("loss", "accuracy", "margin", "winner_change"))
    )
    out = plot_demo_curves(cfg, tmp_path, tmp_path / "report" / "curves.png", demo)
    # One page: the title, stage 1's heading over one row, stage 2's heading over two rows of two.
    colours = assert_png(out, (2 * PANEL_INCHES[0] * DPI, (3 * PANEL_INCHES[1] + 3 * HEADING_INCHES) * DPI))
    for tint in STAGE_TINTS[:2]:  # each stage's band is on the page
        assert tuple(int(tint[i : i + 2], 16) for i in (1, 3, 5)) in colours

    stages = {
        "Stage 1": metric_series(read_metrics(tmp_path / "sft"), ["loss"]),
        "Stage 2": metric_series(read_metrics(tmp_path / "dpo"), ["loss", "accuracy", "margin"]),
    }
    figure = stages_figure(stages)
    assert [band._suptitle.get_text() for band in figure.subfigs] == ["Stage 1", "Stage 2"]
    assert [len(band.axes) for band in figure.subfigs] == [1, 3]
    stage_colours = [band.axes[0].get_lines()[0].get_color() for band in figure.subfigs]
    assert stage_colours[0] != stage_colours[1]


def test_plot_run_names_a_missing_key_and_the_keys_that_exist(tmp_path):
    run = write_metrics(tmp_path / "run", training_rows(range(1, 4), keys=("loss", "grad_norm")))
    with pytest.raises(ValueError, match=r"has no metric 'accuracy'; it has: grad_norm, loss$"):
        plot_run(run, keys=["loss", "accuracy"])
    with pytest.raises(ValueError, match=r"has no metrics 'a', 'b'; it has: grad_norm, loss$"):
        plot_run(run, keys=["a", "b", "a"])
    # No keys asked for: those of the defaults the run logged (an SFT run has no accuracy).
    assert_png(
        plot_run(run), (2 * PANEL_INCHES[0] * DPI, (PANEL_INCHES[1] + HEADING_INCHES) * DPI), shades=10
    )
    empty = write_metrics(tmp_path / "empty", [{"step": 1, "pairs_per_s": 3.0}])
    with pytest.raises(
        ValueError, match=r"has none of loss, accuracy, margin, grad_norm; it has: pairs_per_s"
    ):
        plot_run(empty)


def test_read_metrics_leaves_out_a_torn_last_line_and_names_a_broken_one(tmp_path):
    run = write_metrics(tmp_path / "run", training_rows(range(1, 4)), tail='{"step": 4, "lo')
    assert [row["step"] for row in read_metrics(run)] == [1, 2, 3]
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        read_metrics(run)


def test_help_and_the_report_module_import_neither_matplotlib_nor_torch():
    probe = (
        "import sys\n"
        "import vipo.engine.eval.report\n"
        "from vipo.engine.cli import main\n"
        "for argv in (['--help'], ['plot', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"
