"""README's "Which strategy for which model" table, from `vipo plan` traces of every recipe.

    python benchmarks/strategy_table.py --trace    # trace every recipe under each strategy and the baseline
    python benchmarks/strategy_table.py            # write README's table from the results JSON
    python benchmarks/strategy_table.py --check    # exit 1 where README and the JSON disagree

Each recipe of RECIPES is planned as `vipo plan RECIPE parallel.strategy=S --gpus 8` for S in ddp,
fsdp, zero2 and zero3 (engine/plan: one step of the engine's code on fake tensors at the recipe's real size and
micro-batch), with a GPU memory of 80 GiB. A strategy the plan refuses (context parallelism under
ddp) is recorded with its one-line reason. The traces land in RESULTS with their provenance;
`--trace` resumes: a (recipe, strategy) already there is not traced again (`--fresh` retraces all).
The table is rendered between README's STRATEGY_MARKERS; tests/benchmarks/test_strategy_table.py
fails when README differs from the JSON, or when a fresh plan of the tiny recipe differs from its row.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from vipo.benchmarks import provenance

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results" / "strategy-table-cpu-trace.json"
STRATEGY_MARKERS = ("<!-- strategy-table:start -->", "<!-- strategy-table:end -->")
GPUS = 8
GPU_MEMORY = 80 * 2**30
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
CELLS = (*STRATEGIES, "baseline")  # baseline: the official-style DPO step (benchmarks/plan_baseline.py)
# The recipes as shipped (configs/train/), the tiny one first: its row is the one a test re-plans.
RECIPES = (
    "tiny-sd15-poly",
    "vipo-sd15-poly",
    "vipo-sd15-sft",
    "vipo-sdxl-poly",
    "vipo-sdxl-sft",
    "vipo-sd35m-poly",
    "vipo-sd35m-sft",
    "vipo-flux-poly",
    "vipo-flux-sft",
    "vipo-wan-poly",
    "vipo-wan14b-poly",
    "vipo-wan14b-lora-poly",
)


def _as(recipe: str, strategy: str):
    """The recipe under `strategy`; hybrid sharding (parallel.shard_size, fsdp's alone) off otherwise."""
    from vipo.engine.cli import load_recipe

    overrides = [f"parallel.strategy={strategy}"] + (["parallel.shard_size=0"] if strategy != "fsdp" else [])
    return load_recipe(recipe, overrides)


def plan_entry(recipe: str, strategy: str) -> dict:
    """One cell's numbers: `vipo plan RECIPE parallel.strategy=STRATEGY --gpus GPUS`, or why the plan refused."""
    from vipo.engine import plan

    try:
        cfg = _as(recipe, strategy)  # a recipe may not take the strategy at all (context parallelism)
        result = plan.make_plan(cfg, GPUS, GPU_MEMORY)
    except (plan.RunError, plan.ConfigError) as err:
        return {"refused": str(err)}
    keep = ("pairs_per_gpu", "peak_bytes_per_gpu", "peak_phase", "fits", "split_bytes", "flops_per_pair")
    return {
        **{key: result[key] for key in keep},
        "model": result["model"],
        "reference_mode": result["reference_mode"],
        "latent_cache": result["latent_cache"],
        "trace_seconds": result["trace_seconds"],
        # GPUs that share each pair (Ulysses x ring): pairs_per_gpu is then per group of them
        "context_ranks": cfg.parallel.context_parallel.size,
    }


def baseline_entry(recipe: str) -> dict:
    """The official-style baseline step of the recipe's model, pairs per GPU and resolution, as one
    ddp replica (benchmarks/plan_baseline.py), traced the same way; or why it was not."""
    from vipo.benchmarks.plan_baseline import trace_baseline
    from vipo.engine import plan

    cfg = _as(recipe, "ddp")
    if cfg.loss.objective == "sft":
        return {"refused": "the baseline is a DPO step: no baseline for an sft recipe"}
    try:
        result = trace_baseline(cfg, GPUS)
    except (plan.RunError, plan.ConfigError) as err:
        return {"refused": str(err)}
    keep = ("peak_bytes_per_gpu", "peak_phase", "split_bytes", "flops_per_pair", "trace_seconds")
    return {key: result[key] for key in keep} | {"fits": result["peak_bytes_per_gpu"] <= GPU_MEMORY}


def recipe_strategy(recipe: str) -> str:
    from vipo.engine.cli import load_recipe

    return load_recipe(recipe, []).parallel.strategy


def trace_all(recipes=RECIPES, results: Path = RESULTS, fresh: bool = False) -> dict:
    """Trace every (recipe, strategy) not yet in `results` (all of them when `fresh`); the file is
    rewritten after each trace, so an interrupted run keeps what it traced. Each cell records the
    commit it was traced at."""
    data = json.loads(results.read_text()) if results.exists() and not fresh else {"rows": {}}
    data.update(
        kind="strategy-table",
        what="traced on fake tensors on a CPU (vipo plan), not measured on a GPU",
        command=f"python benchmarks/strategy_table.py --trace (vipo plan RECIPE parallel.strategy=S --gpus {GPUS})",
        date=datetime.date.today().isoformat(),
        machine=f"{os.cpu_count()} CPU cores, no GPU",
        versions=provenance.versions("diffusers", "transformers"),
        gpus=GPUS,
        gpu_memory_bytes=GPU_MEMORY,
        # --recipes retraces some rows: the table keeps every row already traced, in RECIPES' order
        recipes=[r for r in RECIPES if r in recipes or r in data["rows"]]
        + [r for r in recipes if r not in RECIPES],
    )
    commit = (provenance.commit() or "unknown")[:7]
    for recipe in recipes:
        row = data["rows"].setdefault(recipe, {"recipe_strategy": recipe_strategy(recipe)})
        for cell in CELLS:
            if cell in row:
                continue
            started = time.perf_counter()
            entry = baseline_entry(recipe) if cell == "baseline" else plan_entry(recipe, cell)
            row[cell] = {**entry, "commit": commit}
            print(f"{recipe} {cell}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            results.write_text(json.dumps(data, indent=2) + "\n")
    results.write_text(json.dumps(data, indent=2) + "\n")
    return data


# ---------------------------------------------------------------------------------------------
# Rendering

FAMILY_NAMES = {
    "sd15": "SD1.5",
    "sdxl": "SDXL",
    "sd3": "SD3.5 Medium",
    "flux": "FLUX.1-dev",
    "wan": "Wan2.1",
}


def _size(value: int) -> str:
    """GiB with one decimal; MiB below 1 GiB (the tiny recipe)."""
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _step(entry: dict) -> str:
    model = entry["model"]
    pixels = model["pixels"]
    frames = f" x {pixels[1]} frames" if len(pixels) == 4 else ""
    parts = [
        f"{FAMILY_NAMES.get(model['family'], model['family'])} ({model['config']})",
        f"{pixels[-1]}x{pixels[-2]}{frames}",
        f"{entry['pairs_per_gpu']} pair{'s' if entry['pairs_per_gpu'] != 1 else ''}/"
        + (f"{context} GPUs (context parallel)" if (context := entry.get("context_ranks", 1)) > 1 else "GPU"),
        f"LoRA {model['lora_rank']}" if model["lora_rank"] else "full",
        f"{entry['reference_mode']} reference" if entry["reference_mode"] else "no reference",
    ]
    if model["gradient_checkpointing"]:
        parts.append("checkpointing")
    return ", ".join(parts)


NOT_YET = (
    "not traced yet: `python benchmarks/strategy_table.py --trace` traces the cells missing from the JSON"
)


def _cell(entry: dict | None, notes: dict[str, int]) -> str:
    if entry is None:
        return f"- [^{notes.setdefault(NOT_YET, len(notes) + 1)}]"
    if "refused" in entry:
        return f"not traced [^{notes.setdefault(entry['refused'], len(notes) + 1)}]"
    verdict = "fits" if entry["fits"] else "**does not fit**"
    return f"{_size(entry['peak_bytes_per_gpu'])} ({entry['peak_phase']}), {verdict}"


def _ratios(row: dict) -> str:
    """vipo's ddp step over the baseline's: the same replica, pairs and resolution."""
    vipo, baseline = row["ddp"], row["baseline"]
    if "refused" in vipo or "refused" in baseline:
        return "-"
    memory = vipo["peak_bytes_per_gpu"] / baseline["peak_bytes_per_gpu"]
    return f"{memory:.2f}, {vipo['flops_per_pair'] / baseline['flops_per_pair']:.2f}"


def render_row(recipe: str, row: dict, notes: dict[str, int]) -> str:
    """One recipe's row; `notes` numbers the reasons of cells not traced (footnotes, filled in here)."""
    traced = [row[s] for s in (row["recipe_strategy"], *STRATEGIES) if s in row and "refused" not in row[s]]
    cells = [f"`{recipe}`", _step(traced[0]) if traced else "-", *(_cell(row.get(c), notes) for c in CELLS)]
    return "| " + " | ".join([*cells, _ratios(row), row["recipe_strategy"]]) + " |"


def _commits(data: dict) -> str:
    found = {row[c].get("commit") for row in data["rows"].values() for c in CELLS if c in row}
    return ", ".join(sorted(found - {None})) or "unknown"


def render_table(data: dict) -> str:
    gib = data["gpu_memory_bytes"] / 2**30
    lines = [
        f"Peak memory per GPU of one training step on **{data['gpus']} GPUs**, against **{gib:.0f} GiB**, "
        f"with the phase where it peaks: **traced, not measured on a GPU** (`vipo plan` on fake tensors, "
        f"{data['machine']}, torch {data['versions']['torch']}, commit {_commits(data)}; "
        "`benchmarks/results/strategy-table-cpu-trace.json`, written by `python benchmarks/strategy_table.py`). "
        "Each recipe at its own resolution, frames and micro-batch; weights, gradients, AdamW state, "
        "the reference, the encoders on the GPU, activations and temporaries are all in; the CUDA "
        "context and allocator fragmentation are not (leave a few GiB). *baseline*: the DPO step of the "
        "official Diffusion-DPO train.py as `vipo bench step` runs it (policy then a 16-bit reference "
        "copy, no checkpointing), same model, pairs per GPU and resolution, one ddp replica, traced "
        "the same way (`benchmarks/plan_baseline.py`); the ratios are vipo's ddp step over it.",
        "",
        "| recipe | step per GPU | ddp | fsdp | zero2 | zero3 | baseline (ddp) | vipo ddp / baseline: memory, "
        "FLOPs a pair | recipe's strategy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes: dict[str, int] = {}
    lines += [render_row(recipe, data["rows"][recipe], notes) for recipe in data["recipes"]]
    if notes:
        lines.append("")
        lines += [f"[^{number}]: {reason}" for reason, number in notes.items()]
    return "\n".join(lines)


def readme_table(text: str) -> str:
    start, end = STRATEGY_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def write_readme(data: dict, readme: Path = README) -> bool:
    """Put the rendered table between the markers; True when README changed."""
    text = readme.read_text()
    readme_table(text)  # the markers are there
    start, end = STRATEGY_MARKERS
    head, rest = text.split(start, 1)
    new = f"{head}{start}\n{render_table(data)}\n{end}{rest.split(end, 1)[1]}"
    if new == text:
        return False
    readme.write_text(new)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trace", action="store_true", help="trace the recipes missing from the results JSON"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if README's table differs from the JSON")
    parser.add_argument("--fresh", action="store_true", help="with --trace: retrace every cell")
    parser.add_argument(
        "--recipes", nargs="*", default=list(RECIPES), help="with --trace: these recipes only"
    )
    args = parser.parse_args(argv)
    if args.trace:
        trace_all(tuple(args.recipes), fresh=args.fresh)
    data = json.loads(RESULTS.read_text())
    if args.check:
        same = readme_table(README.read_text()) == render_table(data)
        print(
            "README's strategy table matches the results JSON" if same else "README's strategy table is stale"
        )
        return 0 if same else 1
    print("README.md updated" if write_readme(data) else "README.md already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
