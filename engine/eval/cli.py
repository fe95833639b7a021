"""Subcommands for the demo, plots, sampling, evaluation and data diagnostics (loaded by name
through cli.COMMAND_MODULES; nothing heavy is imported until a command runs):

    vipo demo [RECIPE] [overrides]
    vipo study alpha [RECIPE] [overrides] --alphas -1,0,2,8 --seeds 3 --regimes clean,noisy,shuffled --out DIR
    vipo plot RUN
    vipo sample SOURCE --prompts FILE --n 4 --out DIR
    vipo eval DIR [DIR ...] --scorers pickscore,hpsv2,imagereward,aesthetic,clip --base DIR0 --scorers-config F
    vipo data agreement SOURCE|PATH --scorers ... --scorers-config F [--suggest-alpha] [--source S]
    vipo data stats PATH [--source S] [--json]    (or: RECIPE [overrides], --source S --path X)
    vipo scorers convert {hpsv2,imagereward} CHECKPOINT --tokenizer DIR --out DIR
"""

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import RunError

SCORERS_HELP = "comma-separated: pickscore, hpsv2, imagereward, aesthetic, clip"
CONFIG_HELP = "YAML file with each scorer's local weights (see vipo/engine/scoring/config.py)"


def cmd_demo(args: argparse.Namespace) -> int:
    from ..cli import recipe_path
    from ..config import load_demo_config
    from .demo import run_demo

    cfg, demo = load_demo_config(recipe_path(args.recipe), args.overrides)
    print(
        "vipo demo: a tiny SD-style model on procedural shape pairs, CPU. Stage 1 SFT on winners, "
        f"stage 2 {cfg.loss.objective} (alpha {cfg.loss.alpha:g}, beta {cfg.loss.beta:g}).",
        file=sys.stderr,
    )
    result = run_demo(cfg, demo, progress=not args.quiet)
    print(
        f"held-out preference accuracy {result['held_out_accuracy_before']:.3f} -> "
        f"{result['held_out_accuracy_after']:.3f} on {result['held_out_pairs']} clean pairs "
        f"(0.5 = chance; the policy starts as the reference)"
    )
    print(f"report: {result['report']}/ (curves.png, samples.png, summary.json)")
    return 0


def _study_list(parser: str):
    """An argparse type from a parser of .study (imported when a value is parsed): its ValueError
    becomes a usage error naming the flag."""

    def convert(text: str):
        from . import study

        try:
            return getattr(study, parser)(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return value


def cmd_study_alpha(args: argparse.Namespace) -> int:
    from vipo.configs import find_recipe

    from ..cli import recipe_path
    from ..config import load_demo_config
    from .study import QUICK_OVERRIDES, STUDY_OVERRIDES, run_alpha_study

    path = recipe_path(args.recipe)
    schedule = list(STUDY_OVERRIDES) if path == find_recipe("demo") else []  # a recipe file as written
    schedule += list(QUICK_OVERRIDES) if args.quick else []
    cfg, demo = load_demo_config(path, [*schedule, *args.overrides])
    seeds = list(range(cfg.train.seed, cfg.train.seed + args.seeds))
    runs = len(args.regimes) * len(args.alphas) * len(seeds)
    print(
        f"vipo study alpha: {len(args.regimes)} regimes x {len(args.alphas)} alphas x {len(seeds)} seeds = "
        f"{runs} preference runs from {len(args.regimes) * len(seeds)} SFT runs "
        f"({demo.sft_steps} + {cfg.train.max_steps} steps each), CPU.",
        file=sys.stderr,
    )
    run_alpha_study(
        cfg,
        demo,
        Path(args.out),
        alphas=args.alphas,
        regimes=args.regimes,
        seeds=seeds,
        progress=not args.quiet,
    )
    print((Path(args.out) / "study.md").read_text(encoding="utf-8"), end="")
    print(f"wrote {args.out}/study.json, study.md, study.png")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .report import plot_run

    try:
        out = plot_run(Path(args.run), Path(args.out) if args.out else None, args.keys)
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err)) from None
    print(f"wrote {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import sample

    summary = sample(
        args.source,
        args.prompts,
        args.out,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        frames=args.frames,
        fps=args.fps,
        progress=not args.quiet,
    )
    print(
        f"wrote {summary['files']} samples ({summary['prompts']} prompts x {summary['n']}, "
        f"{summary['family']}, {summary['steps']} steps) to {summary['out_dir']}/ (index.jsonl)"
    )
    return 0


def _scorers(args):
    from .scoring import build_scorers, load_scorers_config

    return build_scorers(args.scorers, load_scorers_config(args.scorers_config))


def cmd_eval(args: argparse.Namespace) -> int:
    from .scoring.evaluation import evaluate_folders, read_index

    for folder in [*args.dirs, *([args.base] if args.base else [])]:
        read_index(Path(folder))  # a wrong folder fails before the scorers load
    scorers = _scorers(args)
    table = evaluate_folders(
        [Path(d) for d in args.dirs],
        scorers,
        Path(args.out),
        Path(args.base) if args.base else None,
        progress=not args.quiet,
    )
    from .scoring.table import to_markdown

    print(to_markdown(table), end="")
    print(f"wrote {args.out}/table.md, table.json, scores.jsonl (per prompt), images.jsonl (per image)")
    return 0


def cmd_agreement(args: argparse.Namespace) -> int:
    from .scoring.agreement import format_report
    from .scoring.evaluation import open_pairs, pair_agreement

    source = open_pairs(
        args.source,
        source=args.data_source,
        pairs=args.pairs,
        resolution=args.resolution,
        flip_prob=args.flip_prob,
        seed=args.seed,
        allow_outside_root=args.allow_outside_root,
    )
    result = pair_agreement(source, _scorers(args), easy_margin=args.easy_margin, progress=not args.quiet)
    suggestion = result["suggestion"] if args.suggest_alpha else None
    print(format_report(result["stats"], suggestion))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"source": args.source, **result["stats"].to_dict(), "suggestion": result["suggestion"]}
        (out / "agreement.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        with open(out / "pair_scores.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in result["rows"])
        print(f"wrote {out}/agreement.json and pair_scores.jsonl", file=sys.stderr)
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from vipo.configs import find_recipe

    from ..config import load_config
    from ..data.infer import infer_source
    from .data_stats import collect, format_report

    recipe, path = args.recipe, args.path
    if recipe and not path and _is_data_path(recipe):  # `vipo data stats pairs.parquet`
        recipe, path = None, recipe
    overrides = list(args.overrides)
    source = args.source or (infer_source(path) if path and not recipe else None)
    overrides += [f"data.source={source}"] if source else []
    overrides += [f"data.path={path}"] if path else []
    if not recipe and not any(o.startswith("data.source=") for o in overrides):
        raise RunError("vipo data stats needs a data path, a recipe, or --source (e.g. --source procedural)")
    cfg = load_config(find_recipe(recipe) if recipe else None, overrides)
    report = collect(cfg.data, cfg.model, progress=not args.quiet, decode=args.decode)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _is_data_path(arg: str) -> bool:
    """A data file or folder (or a tar brace pattern), not a recipe file or a built-in name."""
    from ..schema import DATA_SUFFIXES

    path = Path(arg)
    if ("{" in arg and ".tar" in arg) or path.suffix.lower() in DATA_SUFFIXES:
        return True
    return path.exists() and path.suffix.lower() not in (".yaml", ".yml")


def cmd_convert(args: argparse.Namespace) -> int:
    from .scoring import convert

    if not Path(args.checkpoint).is_file():
        raise RunError(f"checkpoint not found: {args.checkpoint}")
    if not Path(args.tokenizer).is_dir():
        raise RunError(f"tokenizer folder not found: {args.tokenizer}")
    if args.model == "hpsv2":
        out = convert.convert_hpsv2(
            Path(args.checkpoint),
            Path(args.tokenizer),
            Path(args.out),
            vision_head_width=args.vision_head_width,
            text_head_width=args.text_head_width,
        )
    else:
        out = convert.convert_imagereward(Path(args.checkpoint), Path(args.tokenizer), Path(args.out))
    print(f"wrote {out}/ : set {args.model}.path to it in the scorers config")
    return 0


def add_commands(commands) -> None:
    overrides_help = "dotted overrides, e.g. loss.alpha=8 optim.lr=1e-8"
    demo = commands.add(
        "demo", "SFT then Poly-DPO of a tiny SD-style model on procedural pairs (CPU, minutes)"
    )
    demo.add_argument("recipe", nargs="?", help="recipe file or built-in name (default: demo)")
    demo.add_argument("overrides", nargs="*", default=[], help=overrides_help)
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    study = commands.group("study", "studies over many runs of the demo model (CPU)")
    alpha = study.add_parser(
        "alpha",
        help="the paper's data regimes (clean, noisy, shuffled) against a grid of Poly-DPO alphas: "
        "held-out accuracy per regime and alpha over seeds",
    )
    alpha.add_argument(
        "recipe",
        nargs="?",
        help="recipe file or built-in name (default: demo, on the study's shorter schedule "
        "demo.sft_steps=150 train.max_steps=40)",
    )
    # `--alphas -1,0,2,8`: a word starting "-<digit>" is a value, not a flag (argparse's rule from
    # Python 3.14; 3.11's takes only a single number); no flag of this parser looks like one.
    alpha._negative_number_matcher = re.compile(r"-\.?\d")
    alpha.add_argument("overrides", nargs="*", default=[], help=overrides_help)
    alpha.add_argument(
        "--alphas",
        type=_study_list("parse_alphas"),
        default="-1,0,2,8",
        help="comma-separated alphas (default -1,0,2,8; 0 runs as Diffusion-DPO)",
    )
    alpha.add_argument(
        "--regimes",
        type=_study_list("parse_regimes"),
        default="clean,noisy,shuffled",
        help="comma-separated: clean, noisy, shuffled (default: all three)",
    )
    alpha.add_argument(
        "--seeds", type=_positive_int, default=3, help="seeds per cell: train.seed + 0, 1, ... (default 3)"
    )
    alpha.add_argument(
        "--out", default="runs/study-alpha", help="study folder; a study there with the same settings resumes"
    )
    alpha.add_argument("--quick", action="store_true", help="a smoke run of a few steps (not a result)")
    alpha.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    alpha.set_defaults(func=cmd_study_alpha)

    plot = commands.add("plot", "draw a run's metric curves to a PNG")
    plot.add_argument("run", help="run folder (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG path (default: RUN/curves.png)")
    plot.add_argument(
        "--keys",
        nargs="+",
        metavar="KEY",
        help="metrics to draw, a subplot each (default: those of loss, accuracy, margin, grad_norm "
        "the run logged)",
    )
    plot.set_defaults(func=cmd_plot)

    sample = commands.add("sample", "images/videos for a prompt file from a run or a diffusers folder")
    sample.add_argument("source", help="run folder, checkpoint folder, or diffusers model folder")
    sample.add_argument("--prompts", required=True, help="prompt file: .txt (one a line), .jsonl or .json")
    sample.add_argument("--out", required=True, help="output folder (images/, videos/, index.jsonl)")
    sample.add_argument("--n", type=int, default=4, help="samples per prompt (the paper: 4)")
    sample.add_argument("--seed", type=int, default=0, help="image i of prompt p uses seed + p * n + i")
    sample.add_argument("--steps", type=int, help="denoising steps (default 50; 25 for tiny builds)")
    sample.add_argument("--batch", type=int, default=4, help="images per forward")
    sample.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)"
    )
    sample.add_argument("--height", type=int, help="pixels (default: the pipeline's)")
    sample.add_argument("--width", type=int, help="pixels (default: the pipeline's)")
    sample.add_argument("--frames", type=int, help="video frames for Wan (default: the pipeline's)")
    sample.add_argument("--fps", type=int, default=16, help="frame rate of written videos")
    sample.add_argument("--device", default="auto", help="cuda, cpu or auto")
    sample.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="pipeline dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    sample.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(func=cmd_sample)

    evaluate = commands.add("eval", "score sample folders with reward models: the paper's Table 2")
    evaluate.add_argument("dirs", nargs="+", help="folders written by `vipo sample`")
    evaluate.add_argument("--scorers", required=True, help=SCORERS_HELP)
    evaluate.add_argument("--scorers-config", help=CONFIG_HELP)
    evaluate.add_argument("--base", help="the base model's sample folder: gains are relative to it")
    evaluate.add_argument("--out", default="eval", help="output folder (default: ./eval)")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    data = commands.group("data", "inspect preference data")
    agree = data.add_parser("agreement", help="do reward models agree with the labels, and with each other?")
    agree.add_argument(
        "source", help="procedural:clean|noisy|shuffled, or a data path: a JSONL manifest or parquet pairs"
    )
    agree.add_argument(
        "--source",
        dest="data_source",
        choices=["manifest", "pickapic"],
        help="what the data path is (default: told from the path)",
    )
    agree.add_argument("--scorers", required=True, help=SCORERS_HELP)
    agree.add_argument("--scorers-config", help=CONFIG_HELP)
    agree.add_argument("--suggest-alpha", action="store_true", help="recommend the Poly-DPO alpha regime")
    agree.add_argument(
        "--easy-margin",
        type=float,
        default=1.0,
        help="a pair is easy when every scorer prefers the winner by more than this many sd",
    )
    agree.add_argument("--pairs", type=int, default=256, help="procedural: number of pairs")
    agree.add_argument("--resolution", type=int, default=64, help="procedural: image side in pixels")
    agree.add_argument(
        "--flip-prob", type=float, default=0.3, help="procedural noisy: share of flipped labels"
    )
    agree.add_argument("--seed", type=int, default=0, help="procedural: seed")
    agree.add_argument("--out", help="folder for agreement.json and pair_scores.jsonl")
    agree.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="let manifest paths point outside the manifest's folder (absolute, '..', symlinks)",
    )
    agree.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    agree.set_defaults(func=cmd_agreement)

    stats = data.add_parser(
        "stats", help="pairs, skips by reason, sizes, frames and categories of a data source"
    )
    stats.add_argument(
        "recipe",
        nargs="?",
        metavar="SOURCE",
        help="a data path (parquet, .jsonl, tar shards, a folder: the source told from it), or a recipe "
        "file or built-in name (its data.* keys)",
    )
    stats.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=pairs.jsonl")
    stats.add_argument(
        "--source",
        choices=["manifest", "pickapic", "shards", "video", "procedural"],
        help="data.source, without a recipe (default for a data path: told from the path)",
    )
    stats.add_argument("--path", help="data.path: manifest, parquet file/folder, tar shards")
    stats.add_argument(
        "--decode", action="store_true", help="decode every image (finds truncated files; slower)"
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    stats.set_defaults(func=cmd_data_stats)

    scorers = commands.group("scorers", "prepare reward-model weights for `vipo eval`")
    convert = scorers.add_parser("convert", help="released HPSv2 / ImageReward checkpoint -> scorer folder")
    convert.add_argument("model", choices=["hpsv2", "imagereward"])
    convert.add_argument("checkpoint", help="HPS_v2.1_compressed.pt or ImageReward.pt")
    convert.add_argument(
        "--tokenizer",
        required=True,
        help="hpsv2: a CLIP tokenizer folder (vocab.json, merges.txt); imagereward: bert-base-uncased",
    )
    convert.add_argument("--out", required=True, help="output folder")
    convert.add_argument(
        "--vision-head-width", type=int, default=80, help="hpsv2: ViT-H-14 heads are 80 wide"
    )
    convert.add_argument("--text-head-width", type=int, default=64, help="hpsv2: text heads width")
    convert.set_defaults(func=cmd_convert)
