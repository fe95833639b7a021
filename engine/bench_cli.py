"""`vipo bench step`: the training-step benchmark of a source checkout's benchmarks/ folder.

The harness is a script beside the kernel benchmark (benchmarks/bench_step.py), not part of the
installed package: results are committed next to it. The command finds it from an editable
install (`pip install -e .`) and runs it in this process.
"""

import importlib
import sys
from pathlib import Path

from .errors import RunError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def add_step_arguments(parser) -> None:
    """The options of `vipo bench step`, shared with `python benchmarks/bench_step.py`."""
    parser.add_argument(
        "target", nargs="?",
        help="a step recipe (sd15-512, sdxl-1024, sd35m-1024, flux-1024, wan-720p; see --list), a model "
             "config of configs/models/ (sd15, flux1-dev, sd15-tiny, ...) or a train recipe (name or .yaml)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, help="pairs per step (default: the step recipe's, else 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; --smoke 2)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps first: compile, allocator, cuDNN (default 3; --smoke 1)"
    )
    parser.add_argument(
        "--split-steps", type=int, help="steps of the synchronised pass that splits a step into phases"
    )
    parser.add_argument("--resolution", help="512, 1024, WIDTHxHEIGHT or 720p (default: the model's)")
    parser.add_argument("--frames", type=int, help="video frames, 1 + 4k (Wan; default 81, tiny 5)")
    parser.add_argument(
        "--settings", nargs="+", default=[], metavar="KEY=VALUE", help="vipo step settings (see --list)"
    )
    parser.add_argument("--baseline-settings", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides of the official-style baseline's settings, e.g. gradient_checkpointing=true "
                             "where it does not fit otherwise")  # fmt: skip
    parser.add_argument("--baseline", action="store_true", default=True,
                        help="also run the official-style baseline and print vipo / baseline ratios (default)")  # fmt: skip
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="vipo's step only")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="cpu builds the family's tiny model (timings of no value, never committed)")  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on CPU, 2 steps: checks the harness, not speed"
    )
    parser.add_argument("--out", help="result file (GPU default: benchmarks/results/step-<device>-<date>.json; "
                                      "runs are appended)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the step recipes and settings, then exit")
    parser.add_argument("--render-readme", action="store_true",
                        help="rewrite the results table of benchmarks/README.md from benchmarks/results/step-*.json")  # fmt: skip


def load_harness():
    """benchmarks/bench_step.py of this checkout, imported as a module."""
    script = BENCHMARKS / "bench_step.py"
    if not script.is_file():
        raise RunError(
            f"vipo bench needs a source checkout: {script} not found (install vipo with `pip install -e .` "
            "from a clone of the repository)"
        )
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("bench_step")


def cmd_bench_step(args) -> int:
    return load_harness().run(args)


def add_commands(commands) -> None:
    bench = commands.group("bench", "throughput benchmarks (training step)")
    step = bench.add_parser(
        "step",
        help="pairs/s, MFU, phase split and peak memory of a training step, vipo vs the official-style baseline",
    )
    add_step_arguments(step)
    step.set_defaults(func=cmd_bench_step)
