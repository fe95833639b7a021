"""Throughput of one preference training step: the engine's own step against the official
Diffusion-DPO step.

    vipo bench step sd15-512                                  # on a GPU: a recipe of STEP_RECIPES
    vipo bench step sdxl-1024 train.compile=blocks model.gradient_checkpointing=true --batch 4
    vipo bench step vipo-sd15-poly                            # a train recipe's own settings
    python benchmarks/bench_step.py sd15-tiny --smoke --out /tmp/step.json   # CPU: checks the harness
    python benchmarks/bench_step.py --render-readme           # README table from results/step-*.json

Both steps run in one process on one device, on the same model (random weights of the real
architecture from configs/models/, the same seed), the same batch and shapes:

    vipo      the engine's Trainer built from the target's RunConfig (step_vipo.py): every setting
              is a recipe setting, given as overrides like `vipo train`'s; its forward_backward and
              update are timed through the trainer's phase marks, never a copy of them
    baseline  the official-style step (step_baseline.py): encoders every step, a separate reference
              copy, the eager loss lines, four .item() a step, GradScaler (fp16), torch AdamW

A step is one micro-batch and one optimizer update (step_timing.py says how it is timed). MFU:
see flops.py. Results: benchmarks/results/step-<device>-<date>.json (runs appended, step_report.py).
CPU runs build the family's tiny model; they check the harness, their timings mean nothing, and
they are never written into results/.
"""

import argparse
import dataclasses
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vipo.benchmarks import step_report
from vipo.benchmarks.flops import achieved, forward_flops_per_sample, peak_tflops
from vipo.benchmarks.step_baseline import BaselineSettings, BaselineStep, baseline_settings
from vipo.benchmarks.step_timing import measure
from vipo.benchmarks.step_vipo import SYNTHETIC_CACHE, VipoStep, bench_source
from vipo.benchmarks.step_workload import Workload
from vipo.configs import find_recipe
from vipo.engine.config import ConfigError, RunConfig, describe, load_config, to_dict
from vipo.engine.errors import RunError
from vipo.engine.families import FAMILIES, sized_architecture
from vipo.engine.models import load_architecture

FULL_CONFIGS = {name: family.full_config for name, family in FAMILIES.items()}
TINY_CONFIGS = {family: f"{family}-tiny" for family in FULL_CONFIGS}
DEFAULT_RESOLUTION = {"sd15": "512", "sdxl": "1024", "sd3": "1024", "flux": "1024", "wan": "720p"}
NAMED_RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
LEARNING_RATE = 1e-6  # any finite value that keeps random weights finite: the bench measures speed
# The recipe keys that change a step's speed or memory (`--list` prints them).
STEP_KEYS = (
    "model.lora_rank",
    "model.gradient_checkpointing",
    "model.attention",
    "model.param_dtype",
    "train.mixed_precision",
    "train.compile",
    "reference.mode",
    "reference.dtype",
    "reference.offload",
    "loss.beta",
    "loss.alpha",
)

# The recipes, with starting settings for one GPU (tune --batch and overrides on the GPU;
# the baseline keeps its official form except where it cannot fit without checkpointing).
STEP_RECIPES = {
    "sd15-512": {"config": "sd15", "resolution": "512", "batch": 8, "overrides": ["train.compile=blocks"]},
    "sdxl-1024": {"config": "sdxl", "resolution": "1024", "batch": 2, "overrides": ["train.compile=blocks"]},
    "sd35m-1024": {
        "config": "sd3.5-medium",
        "resolution": "1024",
        "batch": 2,
        "overrides": ["train.compile=blocks", "model.gradient_checkpointing=true"],
    },
    # 12B parameters: a full fine-tune needs ~190 GB with AdamW; one GPU trains a LoRA on a frozen bf16
    # base, the reference is that base with the adapters off (zero extra weights).
    "flux-1024": {
        "config": "flux1-dev",
        "resolution": "1024",
        "batch": 1,
        "overrides": [
            "model.param_dtype=bfloat16",
            "model.lora_rank=64",
            "reference.mode=adapter",
            "train.compile=blocks",
            "model.gradient_checkpointing=true",
        ],
        "baseline_settings": ["gradient_checkpointing=true"],
    },
    "wan-720p": {
        "config": "wan2.1-t2v-1.3b",
        "resolution": "720p",
        "frames": 81,
        "batch": 1,
        "overrides": ["train.compile=blocks", "model.gradient_checkpointing=true"],
        "baseline_settings": ["gradient_checkpointing=true"],
    },
}


@dataclass
class Target:
    name: str  # what was asked for
    family: str
    config: str  # the architecture config built
    resolution: str | None = None
    frames: int | None = None
    batch: int | None = None
    overrides: list[str] = field(default_factory=list)  # a step recipe's recipe overrides
    baseline_settings: list[str] = field(default_factory=list)
    step_recipe: bool = False
    recipe_file: str | None = None  # a train recipe: its settings are the run's


def resolve_target(name: str) -> Target:
    """A step recipe, a model config (name or .json path) or a train recipe (name or .yaml)."""
    if "=" in name and not name.endswith((".yaml", ".yml")):
        raise ConfigError(
            f"{name!r} is an override: name a target first (e.g. vipo bench step sd15-512 {name})"
        )
    if name in STEP_RECIPES:
        spec = STEP_RECIPES[name]
        family = load_architecture(spec["config"])["family"]
        return Target(
            name,
            family,
            spec["config"],
            spec["resolution"],
            spec.get("frames"),
            spec["batch"],
            list(spec["overrides"]),
            list(spec.get("baseline_settings", [])),
            step_recipe=True,
        )
    if not name.endswith((".yaml", ".yml")):
        try:
            arch = load_architecture(name)
        except ConfigError:
            if not find_recipe(name).is_file():
                raise ConfigError(
                    f"{name!r} is no step recipe ({', '.join(STEP_RECIPES)}), model config in configs/models/ "
                    "or train recipe"
                ) from None
        else:
            return Target(name, arch["family"], name)
    path = find_recipe(name)
    cfg = load_config(path)
    family, data = cfg.model.family, cfg.data
    if data.buckets:
        resolution = f"{data.buckets[0][0]}x{data.buckets[0][1]}"
    elif data.bucket_area:
        resolution = str(int(math.isqrt(data.bucket_area)))
    else:
        resolution = str(data.resolution)
    return Target(
        name,
        family,
        sized_architecture(cfg.model),
        resolution,
        data.num_frames if FAMILIES[family].video else None,
        recipe_file=str(path),
    )


def parse_resolution(text: str) -> tuple[int, int]:
    """(width, height) of `512`, `1280x720` or `720p`."""
    text = text.strip().lower()
    if text in NAMED_RESOLUTIONS:
        return NAMED_RESOLUTIONS[text]
    try:
        sides = [int(p) for p in text.split("x")]
    except ValueError:
        raise ConfigError(
            f"--resolution {text!r}: use 512, WIDTHxHEIGHT or one of {', '.join(NAMED_RESOLUTIONS)}"
        ) from None
    if len(sides) not in (1, 2) or min(sides) < 8 or any(s % 8 for s in sides):
        raise ConfigError(f"--resolution {text!r}: sides must be multiples of 8 (e.g. 512, 1280x720)")
    return (sides[0], sides[-1])


def vipo_config(
    target: Target,
    device: torch.device,
    inputs: str,
    batch: int,
    pixel_shape: tuple[int, ...],
    overrides: list[str],
) -> RunConfig:
    """The RunConfig of vipo's run: the train recipe (or the defaults and a step recipe's overrides),
    what one benchmark step on one device needs, then the command line's overrides."""
    cpu = device.type == "cpu"
    base, asked = [], {o.partition("=")[0].strip() for o in overrides}
    if target.recipe_file is None:  # defaults: bf16 on a GPU, and the data section says the shapes
        width, height = pixel_shape[-1], pixel_shape[-2]
        base = [
            f"model.family={target.family}",
            f"train.mixed_precision={'no' if cpu else 'bf16'}",
            f"optim.lr={LEARNING_RATE}",
            "optim.scale_lr=false",
            f"data.resolution={height}" if width == height else f"data.buckets=[[{width}, {height}]]",
        ]
        base += [f"data.num_frames={pixel_shape[1]}"] if len(pixel_shape) == 4 else []
    recipe = list(target.overrides)
    # One device, one micro-batch a step; a latent-cache run (counter-RNG noise) on synthetic latents.
    bench = [
        f"model.config={target.config}",
        "model.path=null",
        "model.init_from=null",
        "parallel.strategy=none",
        "train.grad_accum_steps=1",
        f"train.batch_pairs={batch}",
        f"train.device={device.type}",
        f"data.cache={SYNTHETIC_CACHE}",
    ]
    if cpu and "train.compile" not in asked:  # minutes of CPU inductor for timings of no value
        recipe = [o for o in recipe if not o.startswith("train.compile=")]
        bench.append("train.compile=off")
    path = Path(target.recipe_file) if target.recipe_file else None
    cfg = load_config(path, [*base, *recipe, *bench, *overrides])
    if cfg.train.grad_accum_steps != 1:
        raise ConfigError(
            f"train.grad_accum_steps={cfg.train.grad_accum_steps}: bench step times one micro-batch and one "
            "update; use --batch for more pairs a step"
        )
    if cfg.loss.objective == "sft":
        raise ConfigError("loss.objective=sft: bench step compares preference steps (dpo, poly_dpo)")
    if inputs == "pixels":
        if cfg.reference.mode == "precomputed":
            raise ConfigError(
                "reference.mode=precomputed reads e_ref by pair id and epoch of cached latents: "
                "use --inputs latents"
            )
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=None))  # encoders online
    return cfg


def _device(args) -> torch.device:
    if args.smoke or args.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if args.device == "cuda":
        raise RunError("--device cuda: no CUDA device here")
    return torch.device("cpu")


def _count(value: int | None, default: int, name: str, low: int = 1) -> int:
    if value is None:
        return default
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")
    return value


@dataclass
class Plan:
    """A request resolved: what to build, both steps' settings, and where results go."""

    target: Target
    work: Workload
    inputs: str
    vipo: RunConfig
    baseline: BaselineSettings | None
    baseline_why: str | None
    requested_config: str
    out: Path | None


def plan(args: argparse.Namespace) -> Plan:
    target = resolve_target(args.target)
    device = _device(args)
    requested_config = target.config
    cpu = device.type == "cpu"
    if cpu and target.config == FULL_CONFIGS[target.family]:
        target.config = TINY_CONFIGS[target.family]
        print(
            f"bench step: CPU builds {target.config} instead of {requested_config} (checks the harness, "
            "not speed)",
            file=sys.stderr,
        )
    tiny = Path(target.config).stem.endswith("-tiny")
    out = Path(args.out).resolve() if args.out else None
    if cpu and out is not None and out.parent == step_report.RESULTS.resolve():
        raise ConfigError(
            f"--out {args.out}: CPU timings are never committed; write them outside {step_report.RESULTS}"
        )

    resolution = args.resolution or ("16" if tiny else target.resolution or DEFAULT_RESOLUTION[target.family])
    width, height = parse_resolution(resolution)
    frames = None
    if FAMILIES[target.family].video:
        frames = _count(args.frames, 5 if tiny else target.frames or 81, "--frames")
        problem = FAMILIES[target.family].frame_problem(frames)
        if problem:
            raise ConfigError(f"--frames {frames}: {problem}")
    pixel_shape = (3, frames, height, width) if frames else (3, height, width)
    batch = _count(args.batch, target.batch or 1, "--batch")
    cfg = vipo_config(target, device, args.inputs, batch, pixel_shape, list(args.overrides))
    baseline, why = None, None
    if args.baseline:
        overrides = [*target.baseline_settings, *args.baseline_settings]
        baseline, why = baseline_settings(cfg.model.family, cfg.model.lora_rank, device, overrides)
    smoke = args.smoke or cpu
    steps = _count(args.steps, 2 if smoke else 10, "--steps")
    work = Workload(
        target.name,
        cfg.model.family,
        cfg.model.config,
        device,
        cfg.train.batch_pairs,
        pixel_shape,
        steps,
        _count(args.warmup, 1 if smoke else 3, "--warmup", low=0),
        _count(args.split_steps, min(steps, 1 if smoke else 3), "--split-steps"),
    )
    return Plan(target, work, args.inputs, cfg, baseline, why, requested_config, out)


def measure_vipo(request: Plan) -> dict:
    cfg = request.vipo
    result = {"step": "vipo", "inputs": request.inputs, "config": to_dict(cfg)}
    return measure(lambda: VipoStep(request.work, cfg, request.inputs), request.work, result)


def measure_baseline(request: Plan) -> dict:
    cfg, settings = request.vipo, request.baseline
    vocabulary = bench_source(cfg).vocabulary()  # the tokenizer of vipo's run: the same weights and prompts

    def build():
        return BaselineStep(
            request.work, cfg.model, settings, cfg.loss, seed=cfg.train.seed, vocabulary=vocabulary
        )

    return measure(build, request.work, {"step": "official", "settings": to_dict(settings)})


def _list() -> int:
    print("step recipes (vipo bench step NAME [KEY=VALUE ...]):")
    for name, spec in STEP_RECIPES.items():
        shape = spec["resolution"] + (f" x{spec['frames']}f" if spec.get("frames") else "")
        print(
            f"  {name:12s} {spec['config']:16s} {shape:12s} batch {spec['batch']}  {' '.join(spec['overrides'])}"
        )
    print("recipe keys that change a step (any key of `vipo config keys` is accepted):")
    for key, type_name, default, help_text in describe():
        if key in STEP_KEYS:
            print(f"  {key:30s} {type_name:44s} default {default!r}\n      {help_text}")
    print(
        "inputs (--inputs): latents (default; a latent-cache run, data.cache) or pixels (encoders every step)"
    )
    print("baseline settings (--baseline-settings KEY=VALUE):")
    for key, type_name, default, help_text in describe(BaselineSettings):
        print(f"  {key:30s} {type_name:44s} default {default!r}\n      {help_text}")
    return 0


def run(args: argparse.Namespace) -> int:
    """`vipo bench step`: measure both steps, print, write the result file."""
    if args.list:
        return _list()
    if args.render_readme:
        print(f"wrote {step_report.render_readme()}")
        return 0
    if not args.target:
        raise ConfigError(
            "vipo bench step: name a target (a step recipe, model config or train recipe; see --list)"
        )
    request = plan(args)
    work = request.work
    cuda = work.device.type == "cuda"
    device_name = torch.cuda.get_device_name(work.device) if cuda else platform.processor() or "cpu"
    peak = peak_tflops(device_name) if cuda else None
    print(
        f"bench step: {work.name} ({work.config}) on {device_name}, {work.batch_pairs} pairs, "
        f"pixels {work.pixel_shape}, inputs {request.inputs}",
        file=sys.stderr,
    )
    runs = {"vipo": measure_vipo(request)}
    if request.baseline is not None:
        runs["baseline"] = measure_baseline(request)
    if work.latent_shape is None:
        raise RunError(f"{work.name}: the model did not build ({runs['vipo'].get('error')})")
    forward = forward_flops_per_sample(request.vipo.model, work.latent_shape, work.cond_shapes)
    for result in runs.values():
        result["model_tflops_per_s"], result["mfu"] = achieved(result.get("pairs_per_s"), forward, peak)
    report = step_report.build_report(request, runs, forward, device_name, peak)
    for label, result in runs.items():
        step_report.print_run(label, result)
    step_report.print_ratios(report["ratios"])
    out = request.out
    if out is None and cuda:
        out = step_report.RESULTS / f"step-{device_name.replace(' ', '_')}-{report['date'][:10]}.json"
    if out is None:
        print("bench step: CPU run, nothing written (pass --out to keep its JSON)", file=sys.stderr)
        return 0
    step_report.write_report(out, report)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    from vipo.benchmarks.cli import add_step_arguments
    from vipo.engine.cli import run_command

    parser = argparse.ArgumentParser(prog="bench_step", description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow flags, as for `vipo bench step`
    return run_command(lambda: run(args), prog="bench_step")


if __name__ == "__main__":
    sys.exit(main())
