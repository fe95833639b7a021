"""`vipo bench ...`: the benchmark commands, added to `vipo` through the `vipo.commands` entry point
(setup.py). Argument parsing only, and nothing heavy at import: `vipo --help` loads this module,
and the harness (bench_step.py, torch and the engine) only when a benchmark runs.

    vipo bench step sdxl-1024 train.compile=blocks model.gradient_checkpointing=true --batch 4
"""

STEP_TARGET_HELP = (
    "a step recipe (sd15-512, sdxl-1024, sd35m-1024, flux-1024, wan-720p; see --list), a model config of "
    "configs/models/ (sd15, flux1-dev, sd15-tiny, ...) or a train recipe (name or .yaml)"
)


def add_step_arguments(parser) -> None:
    """The options of `vipo bench step`, shared with `python benchmarks/bench_step.py`."""
    parser.add_argument("target", nargs="?", help=STEP_TARGET_HELP)
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides of vipo's step, as for `vipo train` (e.g. train.compile=blocks "
        "model.gradient_checkpointing=true model.lora_rank=64 reference.mode=adapter; see --list)",
    )
    parser.add_argument("--batch", type=int, help="pairs per step (default: the step recipe's, else 1)")
    parser.add_argument(
        "--inputs",
        choices=["latents", "pixels"],
        default="latents",
        help="latents: a latent-cache run (latents and text embeddings, float16 on the host, no "
        "encoder in the step); pixels: VAE and text encoders every step (default latents)",
    )
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
        "--baseline-settings",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="settings of the official-style baseline, e.g. gradient_checkpointing=true where it "
        "does not fit otherwise (see --list)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        default=True,
        help="also run the official-style baseline and print vipo / baseline ratios (default)",
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="vipo's step only")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="cpu builds the family's tiny model (timings of no value, never committed)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on CPU, 2 steps: checks the harness, not speed"
    )
    parser.add_argument(
        "--out",
        help="result file (GPU default: benchmarks/results/step-<device>-<date>.json; runs are appended)",
    )
    parser.add_argument("--list", action="store_true", help="list the step recipes and settings, then exit")
    parser.add_argument(
        "--render-readme",
        action="store_true",
        help="rewrite the results table of benchmarks/README.md from benchmarks/results/step-*.json",
    )


def cmd_bench_step(args) -> int:
    from vipo.benchmarks import bench_step

    return bench_step.run(args)


def add_commands(commands) -> None:
    bench = commands.group("bench", "throughput benchmarks (training step)")
    step = bench.add_parser(
        "step",
        help="pairs/s, MFU, phase split and peak memory of the engine's training step vs the official-style baseline",
    )
    add_step_arguments(step)
    step.set_defaults(func=cmd_bench_step)
