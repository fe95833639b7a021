"""The `vipo` command. Argument parsing only: each subcommand calls one function."""

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import yaml

from vipo.configs import builtin_recipes, find_recipe

from .config import ConfigError, describe, load_config, load_demo_config, read_recipe, to_dict
from .errors import RunError

log = logging.getLogger("vipo")

OVERRIDES_HELP = "dotted overrides, e.g. loss.alpha=8 optim.lr=1e-8"

# Modules that add subcommands of their own, loaded by name (the engine imports nothing of the
# evaluation part): each defines add_commands(commands) and imports nothing heavy at module level.
# Installed packages add theirs through the `vipo.commands` entry-point group (benchmarks/ does).
COMMAND_MODULES: tuple[str, ...] = ("vipo.engine.eval.cli",)
ENTRY_POINT_GROUP = "vipo.commands"


class Commands:
    """What a command module adds to: top-level subcommands, and groups (`vipo data ...`) that
    several modules add actions to."""

    def __init__(self, sub):
        self.sub = sub
        self.groups: dict[str, argparse._SubParsersAction] = {}

    def add(self, name: str, help: str) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, help=help)

    def group(self, name: str, help: str):
        """The ACTION subparsers of `vipo NAME`, made on first use."""
        if name not in self.groups:
            actions = self.add(name, help).add_subparsers(dest=f"{name}_command", metavar="ACTION")
            actions.required = True
            self.groups[name] = actions
        return self.groups[name]


def lazy(module: str, function: str):
    """A command function imported only when its command runs (keeps `vipo --help` fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    run.__qualname__ = f"{module}.{function}"
    return run


def _plugins() -> list:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


class _Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes end in one line, like every other vipo error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def recipe_path(recipe: str | None) -> Path:
    """A recipe file, or a built-in recipe by name (`demo` when None)."""
    path = find_recipe(recipe or "demo")
    if recipe and not path.exists() and Path(recipe).suffix not in (".yaml", ".yml"):
        raise ConfigError(
            f"recipe {recipe!r} not found: no such file, and no built-in recipe of that name "
            f"(built-in: {', '.join(builtin_recipes())})"
        )
    return path


def load_recipe(recipe: str | None, overrides: list[str]):
    """The RunConfig of a recipe (file or built-in name; `demo` when None) and overrides."""
    return load_config(recipe_path(recipe), overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    cfg = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from .plan.dry_run import dry_run, render

        print(render(cfg, dry_run(cfg)))
        return 0
    with Trainer(cfg, progress=not args.quiet) as trainer:  # tears down a process group it started
        summary = trainer.train(resume=args.resume)
    if not summary["is_main"]:  # one summary per run, from rank 0
        return 0
    last = summary["last"]
    shown = ", ".join(
        f"{k} {last[k]:.4g}" for k in ("loss", "accuracy", "margin", "pairs_per_s") if k in last
    )
    ran = summary.get("steps_this_run", summary["steps"])
    resumed = f" (resumed at step {summary['steps'] - ran})" if ran != summary["steps"] else ""
    print(f"trained {ran} steps to step {summary['steps']}{resumed} in {summary['seconds']:.1f} s; {shown}")
    print(f"run folder: {summary['out_dir']} (metrics.jsonl, checkpoints/)")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    path = recipe_path(args.recipe)
    has_demo = "demo" in read_recipe(path) or any(o.strip().startswith("demo.") for o in args.overrides)
    if has_demo:  # the demo recipe: its run, and the demo section `vipo demo` reads
        cfg, demo = load_demo_config(path, args.overrides)
        shown = {**to_dict(cfg), "demo": to_dict(demo)}
    else:
        shown = to_dict(load_config(path, args.overrides))
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print(yaml.safe_dump(shown, sort_keys=False), end="")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    for key, type_name, default, help_text in describe():
        print(f"{key:28s} {type_name:36s} default {default!r}\n    {help_text}")
    print(f"built-in recipes: {', '.join(builtin_recipes())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vipo",
        description="Preference optimization (Diffusion-DPO, Poly-DPO) for image and video generators.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N first; the rank is read from LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="train with a recipe (SFT, Diffusion-DPO or Poly-DPO)")
    train.add_argument("recipe", help="recipe file or built-in name (see `vipo config keys`)")
    train.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    train.add_argument(
        "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, data (a decoded sample) and model (on the meta device) and print the memory "
        "before activations; train nothing",
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="inspect recipes and config keys")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True
    show = config_sub.add_parser("show", help="print a recipe with defaults and overrides resolved")
    show.add_argument("recipe", help="recipe file or built-in name")
    show.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(func=cmd_config_show)
    keys = config_sub.add_parser("keys", help="list every config key with its type, default and meaning")
    keys.set_defaults(func=cmd_config_keys)

    export = sub.add_parser("export", help="write a trained run as a diffusers folder (LoRA merged)")
    export.add_argument("run", help="run folder (its latest good checkpoint) or a checkpoint folder")
    export.add_argument("--out", required=True, help="new folder to write")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest good one)")
    export.add_argument("--lora-only", action="store_true", help="save only the LoRA weights")
    export.add_argument(
        "--ema", action="store_true", help="the EMA of the weights (a run with train.ema_decay) instead"
    )
    export.set_defaults(func=lazy("vipo.engine.export", "cmd_export"))

    precompute = "dotted overrides, e.g. data.cache=/data/cache train.seed=1"
    cache = sub.add_parser(
        "cache", help="encode a recipe's pairs once into data.cache (VAE posteriors, text embeddings)"
    )
    cache.add_argument("recipe", help="recipe file or built-in name; data.cache names the folder")
    cache.add_argument("overrides", nargs="*", default=[], help=precompute)
    cache.add_argument(
        "--pairs-per-shard", type=int, default=256, help="pairs per safetensors shard (default 256)"
    )
    cache.add_argument("--batch-pairs", type=int, help="pairs per encoder batch (default: train.batch_pairs)")
    cache.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="storage dtype of latents and embeddings (default float16)",
    )
    cache.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cache.set_defaults(func=lazy("vipo.engine.data.cache", "cmd_cache"))
    score = sub.add_parser(
        "score-reference", help="e_ref of every cached pair per epoch, for reference.mode=precomputed"
    )
    score.add_argument("recipe", help="recipe file or built-in name (with data.cache set)")
    score.add_argument("overrides", nargs="*", default=[], help=precompute)
    score.add_argument(
        "--epochs", type=int, help="epochs to score (default: what the recipe needs on 1 process)"
    )
    score.add_argument(
        "--batch-pairs", type=int, help="pairs per reference batch (default: train.batch_pairs)"
    )
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=lazy("vipo.engine.reference.precomputed", "cmd_score_reference"))

    plan = sub.add_parser(
        "plan",
        help="peak GPU memory and FLOPs of one training step, traced on the CPU (nothing allocated); "
        "exit 1 when it does not fit",
    )
    plan.add_argument("recipe", help="recipe file or built-in name")
    plan.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    plan.add_argument("--gpus", type=int, default=1, help="GPUs sharing train.batch_pairs (default 1)")
    plan.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (default 80GiB)")
    plan.add_argument(
        "--batch-search",
        action="store_true",
        help="also the most pairs per GPU that fit, with and without checkpointing",
    )
    plan.add_argument("--json", action="store_true", help="JSON instead of text")
    plan.set_defaults(func=lazy("vipo.engine.plan", "cmd_plan"))

    commands = Commands(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(commands)
    for plugin in _plugins():
        plugin.load()(commands)
    return parser


def _split_recipe(args: argparse.Namespace) -> None:
    """`vipo demo loss.alpha=8` has no recipe: a first positional with '=' is an override."""
    recipe = getattr(args, "recipe", None)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        args.overrides = [recipe, *args.overrides]
        args.recipe = None


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that overrides may also follow a flag (`vipo train demo -q loss.alpha=8`):
    argparse ends a positional list at the first flag and would call the rest unrecognized."""
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and not any(a.startswith("-") for a in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    _split_recipe(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_command(lambda: args.func(args))


def run_command(command, prog: str = "vipo") -> int:
    """`command()`'s exit status, with vipo's errors as one line on stderr: 2 for a usage or
    config error, 1 for a run error, 128 + the signal for a run stopped by one after its
    checkpoint (SIGTERM 143, SIGINT 130), 130 for an interrupt; no traceback for any of them."""
    try:
        return command()
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        code = getattr(err, "exit_code", 1)
        if not getattr(err, "quiet", False):
            print(f"{prog}: {'error: ' if code == 1 else ''}{err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
