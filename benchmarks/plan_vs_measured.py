"""`vipo plan` against a GPU: the traced peak of each step benchmarks/bench_step.py measured, beside
its `torch.cuda.max_memory_allocated`.

    python benchmarks/plan_vs_measured.py STEP_JSON [--out FILE]

STEP_JSON is a step result file (`bench_step.py --out`, step.json of benchmarks/gpu_check.sh). For
each vipo run in it the RunConfig it recorded is rebuilt, with the CPU as its device, and traced as
`vipo plan` traces it on one GPU (engine/plan: fake tensors, MemTracker); the plan's peak, the
measured one and plan / measured are written (target: within 10%). It runs on a CPU after the GPU
run: it costs no device time. A run measured on a CPU (no allocator statistics) is listed as not
measured. The plan traces the eager step: a run with train.compile on is marked, since Inductor's
fused kernels keep fewer temporaries than eager ops.
"""

import argparse
import json
import sys
from pathlib import Path

from vipo.benchmarks import provenance
from vipo.engine import plan
from vipo.engine.config import load_tree

GIB = 2**30
TARGET = 0.10  # issue 15: the plan within 10% of max_memory_allocated


def planned_config(run: dict):
    """The RunConfig a vipo run recorded, on the CPU: what `vipo plan` traces for it."""
    return load_tree(run["config"], ["train.device=cpu"], where="the step result's vipo config")


def compare(report: dict) -> dict | None:
    """One step report's vipo run: plan and measurement, or None where it has no vipo run."""
    run = report.get("runs", {}).get("vipo")
    if run is None:
        return None
    cfg = planned_config(run)
    trace = plan.trace_rank(cfg, 1)
    row = {
        "target": report.get("target", {}).get("name"),
        "device": report.get("device"),
        "commit_measured": report.get("commit"),
        "shapes": report.get("shapes"),
        "inputs": run.get("inputs"),
        "compile": cfg.train.compile,
        "planned_peak_gib": trace.peak_bytes / GIB,
        "planned_phase": trace.peak_phase,
        "planned_split_gib": {key: value / GIB for key, value in trace.split.items()},
        "trace_seconds": round(trace.seconds, 1),
        "measured_peak_gib": run.get("peak_memory_gib"),
    }
    if row["measured_peak_gib"] is None:
        row["verdict"] = "not measured (a CPU run has no allocator statistics)"
        return row
    ratio = row["planned_peak_gib"] / row["measured_peak_gib"]
    row["plan_over_measured"] = ratio
    row["within_target"] = abs(ratio - 1) <= TARGET
    row["verdict"] = f"plan / measured {ratio:.3f}" + (
        " (compiled run: the plan traces eager ops)" if cfg.train.compile != "off" else ""
    )
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step_json", type=Path, help="a step result file (bench_step.py --out)")
    parser.add_argument("--out", type=Path, help="write the comparison here (JSON)")
    args = parser.parse_args(argv)
    try:
        reports = json.loads(args.step_json.read_text(encoding="utf-8"))["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        print(f"plan_vs_measured: {args.step_json}: not a step result file ({err})", file=sys.stderr)
        return 1
    rows = [row for row in map(compare, reports) if row is not None]
    for row in rows:
        measured = row["measured_peak_gib"]
        print(
            f"{row['target']}: plan {row['planned_peak_gib']:.2f} GiB ({row['planned_phase']}), "
            + (f"measured {measured:.2f} GiB, {row['verdict']}" if measured is not None else row["verdict"])
        )
    if args.out:
        result = {
            "kind": "plan-vs-measured",
            "what": "vipo plan (traced on a CPU) against torch.cuda.max_memory_allocated of bench_step",
            "command": f"python benchmarks/plan_vs_measured.py {args.step_json}",
            "commit": provenance.commit(),
            "versions": provenance.versions("diffusers", "transformers"),
            "target": f"within {TARGET:.0%}",
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
