"""The result file of `vipo bench step` and the README table made from it.

A result file is `{"kind": "step", "runs": [report, ...]}`, one per device and day (runs are
appended). A report holds the device, versions, date, commit, shapes, FLOP count and timing
method, and `runs`: "vipo" (the resolved RunConfig of the engine's run under "config", the
inputs) and "baseline" (its BaselineSettings under "settings"), each with its figures, and the
vipo / baseline ratios.
"""

import datetime
import json
from pathlib import Path

from vipo.benchmarks import provenance
from vipo.benchmarks.flops import FLOP_METHOD, model_flops_per_pair
from vipo.engine.errors import RunError

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
TABLE_START, TABLE_END = "<!-- step-results:start -->", "<!-- step-results:end -->"
VIPO_STEP = "vipo.engine.trainer.Trainer: strategy.zero_grad, forward_backward(batch), update(finite)"
PRECISION = {
    ("float32", "no"): "fp32",
    ("float32", "bf16"): "bf16_autocast",
    ("bfloat16", "no"): "bf16_params",
    ("bfloat16", "bf16"): "bf16_params+autocast",
}
BASELINE_DEFAULTS = {"compile": "off", "gradient_checkpointing": False, "attention": "sdpa", "lora_rank": 0}


def build_report(plan, runs: dict[str, dict], forward: int, device_name: str, peak: float | None) -> dict:
    work, target, cfg = plan.work, plan.target, plan.vipo
    ratios = None
    if "baseline" in runs:

        def ratio(key):
            a, b = runs["vipo"].get(key), runs["baseline"].get(key)
            return a / b if a is not None and b else None

        ratios = {"pairs_per_s": ratio("pairs_per_s"), "peak_memory": ratio("peak_memory_gib")}
    return {
        "kind": "step",
        "device": device_name,
        "device_type": work.device.type,
        "device_peak_bf16_tflops": peak,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "versions": provenance.versions("diffusers", "transformers", "peft"),
        "smoke": work.device.type == "cpu",
        "target": {
            "name": target.name,
            "recipe": target.recipe_file or (target.name if target.step_recipe else None),
            "family": work.family,
            "config": work.config,
            "requested_config": plan.requested_config,
        },
        "shapes": {
            "batch_pairs": work.batch_pairs,
            "resolution": list(work.pixel_shape[-1:-3:-1]),
            "frames": work.pixel_shape[1] if len(work.pixel_shape) == 4 else None,
            "pixels": [work.rows, *work.pixel_shape],
            "latents": [work.rows, *work.latent_shape],
            "cond": {key: list(shape) for key, shape in work.cond_shapes.items()},
        },
        "loss": {
            "objective": cfg.loss.objective,
            "beta": cfg.loss.beta,
            "beta_convention": cfg.loss.beta_convention,
            "alpha": cfg.loss.alpha,
        },
        "flops": {
            "method": FLOP_METHOD,
            "forward_per_sample": forward,
            "forward_equivalents_per_pair": model_flops_per_pair(1),
            "per_pair": model_flops_per_pair(forward),
        },
        "timing": {
            "method": "cuda events" if work.device.type == "cuda" else "time.perf_counter",
            "quantiles": "torch.quantile (linear)",
            "vipo_step": VIPO_STEP,
            "warmup_steps": work.warmup,
            "timed_steps": work.steps,
            "split_steps": work.split_steps,
            "split": "separate pass, device synchronised at each phase boundary",
        },
        "baseline_precision_reason": plan.baseline_why,
        "runs": runs,
        "ratios": ratios,
    }


def write_report(out: Path, report: dict) -> None:
    """Append `report` to the result file (one file per device and day holds every run of it)."""
    existing = []
    if out.is_file():
        try:
            existing = json.loads(out.read_text(encoding="utf-8"))["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunError(
                f"--out {out}: exists and is not a step result file ({err}); choose another path"
            ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"kind": "step", "runs": [*existing, report]}, indent=2) + "\n", encoding="utf-8"
    )


# -- labels and the README table ----------------------------------------------------------------


def shape_label(report: dict) -> str:
    width, height = report["shapes"]["resolution"]
    frames = report["shapes"].get("frames")
    size = f"{width}px" if width == height else f"{width}x{height}"
    return f"{size} x{frames}f" if frames else size


def run_label(run: dict) -> str:
    """What a run was, compactly: precision, reference, inputs, then what differs from the defaults.
    vipo's run from its RunConfig, the baseline's from its settings."""
    if "config" in run:
        model, train = run["config"]["model"], run["config"]["train"]
        parts = [
            PRECISION[model["param_dtype"], train["mixed_precision"]],
            f"ref={run['config']['reference']['mode']}",
            run["inputs"],
        ]
        extra = {
            "lora_rank": model["lora_rank"],
            "compile": train["compile"],
            "gradient_checkpointing": model["gradient_checkpointing"],
            "attention": model["attention"],
            "parallel": run["config"]["parallel"]["strategy"],
        }
        defaults = {**BASELINE_DEFAULTS, "parallel": "none"}
    else:
        settings = run["settings"]
        parts = [settings["precision"], f"ref={settings['reference']}", settings["inputs"]]
        extra, defaults = {key: settings[key] for key in BASELINE_DEFAULTS}, BASELINE_DEFAULTS
    parts += [
        key if value is True else f"{key}={value}" for key, value in extra.items() if value != defaults[key]
    ]
    return ", ".join(parts)


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else format(value, pattern)


def _cell(run: dict, key: str, pattern: str) -> str:
    """A run's figure for the table; a run that ran out of memory says so."""
    if run.get("error"):
        return "OOM" if run["error"].startswith("out of memory") else "error"
    return _fmt(run.get(key), pattern)


def render_table(reports: list[dict]) -> str:
    """The README's markdown table: one row per GPU run (smoke and CPU runs are left out)."""
    rows = [
        r
        for r in reports
        if r.get("kind") == "step" and not r.get("smoke") and r.get("device_type") == "cuda"
    ]
    if not rows:
        return "No GPU results committed yet: no GPU run of `vipo bench step` has happened for this version."
    lines = [
        "| date | device | target | shape | pairs | vipo settings | vipo pairs/s | baseline pairs/s | pairs/s x "
        "| vipo MFU | baseline MFU | peak GiB vipo / baseline | memory x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["target"]["name"], r["date"])):
        vipo, base = r["runs"]["vipo"], r["runs"].get("baseline") or {}
        ratios = r.get("ratios") or {}
        cells = [
            r["date"][:10],
            r["device"],
            r["target"]["name"],
            shape_label(r),
            str(r["shapes"]["batch_pairs"]),
            run_label(vipo),
            _cell(vipo, "pairs_per_s", ".2f"),
            _cell(base, "pairs_per_s", ".2f"),
            _fmt(ratios.get("pairs_per_s"), ".2f"),
            _cell(vipo, "mfu", ".1%"),
            _cell(base, "mfu", ".1%"),
            f"{_cell(vipo, 'peak_memory_gib', '.1f')} / {_cell(base, 'peak_memory_gib', '.1f')}",
            _fmt(ratios.get("peak_memory"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect_reports(folder: Path = RESULTS) -> list[dict]:
    reports = []
    for path in sorted(folder.glob("step-*.json")):
        try:
            reports += json.loads(path.read_text(encoding="utf-8"))["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunError(f"{path}: not a step result file ({err})") from None
    return reports


def render_readme(readme: Path = README, folder: Path = RESULTS) -> Path:
    text = readme.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise RunError(f"{readme}: no {TABLE_START} ... {TABLE_END} markers to put the table between")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(
        f"{head}{TABLE_START}\n{render_table(collect_reports(folder))}\n{TABLE_END}{tail}", encoding="utf-8"
    )
    return readme


def print_run(label: str, run: dict) -> None:
    if "error" in run:
        print(f"{label:9s} {run['error']}")
        return
    split = " | ".join(f"{phase} {ms:.1f}" for phase, ms in run["split_ms"].items() if ms >= 0.05)
    gib = run["peak_memory_gib"]
    memory = "n/a (not tracked on CPU)" if gib is None else f"{gib:.2f} GiB"
    print(
        f"{label:9s} {run['pairs_per_s']:.3f} pairs/s ({run['samples_per_s']:.3f} samples/s), step {run['step_ms']['mean']:.1f} ms "
        f"(median {run['step_ms']['median']:.1f}); split ms [{split}]; {_fmt(run['model_tflops_per_s'], '.1f')} TFLOP/s, "
        f"MFU {_fmt(run['mfu'], '.1%', 'n/a')}; peak memory {memory}; {run_label(run)}"
    )


def print_ratios(ratios: dict | None) -> None:
    if ratios:
        print(
            f"vipo / baseline: pairs/s x{_fmt(ratios['pairs_per_s'], '.2f')}, "
            f"peak memory x{_fmt(ratios['peak_memory'], '.2f', 'n/a')}"
        )
