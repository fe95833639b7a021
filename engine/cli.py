"""The `vipo` command. Argument parsing only: each subcommand calls one function."""

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

import yaml

from vipo.configs import builtin_recipes, find_recipe

from .config import ConfigError, describe, load_config, to_dict
from .errors import RunError

log = logging.getLogger("vipo")

OVERRIDES_HELP = "dotted overrides, e.g. loss.alpha=8 optim.lr=1e-8"

# Subcommands that live next to the code they run: each module defines add_commands(subparsers)
# and imports its heavy dependencies only inside the command functions.
COMMAND_MODULES: tuple[str, ...] = (
    "vipo.engine.export",
    "vipo.engine.precompute",
    "vipo.engine.eval_cli",
    "vipo.engine.bench_cli",
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage mistakes end in one line, like every other vipo error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _load(recipe: str | None, overrides: list[str]):
    path = find_recipe(recipe or "demo")
    if recipe and not path.exists() and Path(recipe).suffix not in (".yaml", ".yml"):
        raise ConfigError(
            f"recipe {recipe!r} not found: no such file, and no built-in recipe of that name "
            f"(built-in: {', '.join(builtin_recipes())})"
        )
    return load_config(path, overrides)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    cfg = _load(args.recipe, args.overrides)
    print(
        "vipo demo: a tiny SD-style model on procedural shape pairs, CPU. Stage 1 SFT on winners, "
        f"stage 2 {cfg.loss.objective} (alpha {cfg.loss.alpha:g}, beta {cfg.loss.beta:g}).",
        file=sys.stderr,
    )
    result = run_demo(cfg, progress=not args.quiet)
    print(
        f"held-out preference accuracy {result['held_out_accuracy_before']:.3f} -> "
        f"{result['held_out_accuracy_after']:.3f} on {result['held_out_pairs']} clean pairs "
        f"(0.5 = chance; the policy starts as the reference)"
    )
    print(f"report: {result['report']}/ (curves.png, samples.png, summary.json)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    cfg = _load(args.recipe, args.overrides)
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


def cmd_plot(args: argparse.Namespace) -> int:
    from .report import plot_run

    try:
        out = plot_run(Path(args.run), Path(args.out) if args.out else None, tuple(args.keys))
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err)) from None
    print(f"wrote {out}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load(args.recipe, args.overrides)
    if args.json:
        print(json.dumps(to_dict(cfg), indent=2))
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
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

    demo = sub.add_parser(
        "demo", help="SFT then Poly-DPO of a tiny SD-style model on procedural pairs (CPU, minutes)"
    )
    demo.add_argument("recipe", nargs="?", help="recipe file or built-in name (default: demo)")
    demo.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train with a recipe (SFT, Diffusion-DPO or Poly-DPO)")
    train.add_argument("recipe", help="recipe file or built-in name (see `vipo config keys`)")
    train.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    train.add_argument(
        "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    plot = sub.add_parser("plot", help="draw a run's metric curves to a PNG")
    plot.add_argument("run", help="run folder (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG path (default: RUN/curves.png)")
    plot.add_argument(
        "--keys", nargs="+", default=["loss", "accuracy", "margin", "grad_norm"], help="metrics to draw"
    )
    plot.set_defaults(func=cmd_plot)

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
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
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
