"""`vipo study alpha`: the paper's data regimes against a grid of Poly-DPO alphas, on CPU.

For each seed and regime (clean; noisy = conflicting pairs, labels flipped; shuffled = over-simple
losers drawn for another prompt) stage 1 of the demo (SFT on winners) runs once, then stage 2
runs from its checkpoint once per alpha (alpha 0 as Diffusion-DPO). Each stage-2 run is scored
by the demo's held-out preference accuracy on clean pairs, before (0.5: the policy is the
reference) and after. The paper's claim to test: alpha > 0 is best on noisy pairs, alpha < 0 on
shuffled ones, alpha ~ 0 on clean ones.

The study folder holds study.json (every run, the aggregates over seeds, the verdict per regime,
provenance), study.md (a regime x alpha table) and study.png (accuracy against alpha). study.json
is rewritten after every run: a study started again in the same folder skips the runs it holds.
"""

import dataclasses
import datetime
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vipo.loaders.atomic import describe_differences, digest_of, plain_json, read_json, write_json_atomic
from vipo.loaders.procedural import REGIMES

from ..config import DemoConfig, RunConfig, to_dict
from ..errors import RunError
from ..provenance import commit
from ..trainer import Trainer
from .demo import held_out_pairs, stage_two_config, train_stage_one
from .evaluate import held_out_accuracy

log = logging.getLogger(__name__)

# The sign of the best alpha the paper reports per regime (its Section 5.2).
PAPER_SIGN = {"clean": 0, "noisy": 1, "shuffled": -1}
EXPECTED = {0: "alpha ~ 0", 1: "alpha > 0", -1: "alpha < 0"}
DEFAULT_ALPHAS = (-1.0, 0.0, 2.0, 8.0)
DEFAULT_SEEDS = 3
# The built-in demo recipe cut so that 3 regimes x 4 alphas x 3 seeds fit in 20 minutes on two
# CPU cores (9 SFT runs, 36 preference runs); a recipe file is taken as written.
STUDY_OVERRIDES = ("demo.sft_steps=150", "train.max_steps=40", "demo.held_out_pairs=128")
# --quick: a smoke run of the whole pipeline (a minute or two), not a result.
QUICK_OVERRIDES = ("demo.sft_steps=20", "train.max_steps=5", "demo.held_out_pairs=32")
EVAL_DRAWS = 2  # (noise, t) draws per held-out pair, the same for every model compared
VARYING = (
    ("data", "regime"),
    ("loss", "alpha"),
    ("loss", "objective"),
    ("train", "seed"),
    ("train", "output_dir"),
)


def parse_alphas(text: str) -> tuple[float, ...]:
    """'-1,0,2,8' -> (-1.0, 0.0, 2.0, 8.0): finite, distinct, at least one."""
    try:
        alphas = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"not a comma-separated list of numbers: {text!r}") from None
    if not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be finite, got {text!r}")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"an alpha is given twice in {text!r}")
    return alphas


def parse_regimes(text: str) -> tuple[str, ...]:
    """'clean,noisy' -> ('clean', 'noisy'): known, distinct, at least one."""
    regimes = tuple(part.strip() for part in text.split(","))
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise ValueError(f"unknown regime {unknown[0]!r} in {text!r}; known: {', '.join(REGIMES)}")
    if len(set(regimes)) != len(regimes):
        raise ValueError(f"a regime is given twice in {text!r}")
    return regimes


def study_settings(cfg: RunConfig, demo: DemoConfig, draws: int) -> dict:
    """Everything a run's result depends on besides its (regime, alpha, seed)."""
    tree = plain_json(to_dict(cfg))
    for section, key in VARYING:
        tree[section].pop(key, None)
    return {"run": tree, "demo": plain_json(to_dict(demo)), "eval_draws": draws}


def _label(alpha: float) -> str:
    return f"alpha{alpha:g}"


def _variant(cfg: RunConfig, *, regime: str, seed: int) -> RunConfig:
    replace = dataclasses.replace
    return replace(cfg, data=replace(cfg.data, regime=regime), train=replace(cfg.train, seed=seed))


def _with_alpha(stage2: RunConfig, alpha: float, out: Path) -> RunConfig:
    replace = dataclasses.replace
    objective = "dpo" if alpha == 0 else "poly_dpo"  # alpha 0 is Diffusion-DPO itself
    return replace(
        stage2,
        loss=replace(stage2.loss, alpha=alpha, objective=objective),
        train=replace(stage2.train, output_dir=str(out)),
    ).validate()


class SharedReferenceErrors:
    """e_ref of the held-out draws of one SFT checkpoint, computed once: every alpha's reference
    is that checkpoint and held_out_accuracy draws the same (noise, t) each time, so each later
    evaluation replays them (after checking that it asks for the same inputs)."""

    def __init__(self):
        self.saved: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []

    def over(self, reference) -> "_Replay":
        return _Replay(self, reference)


class _Replay:
    def __init__(self, shared: SharedReferenceErrors, reference):
        self.shared, self.reference, self.calls = shared, reference, 0

    def errors(self, x_t, t, cond, target, **kwargs):
        inputs = (x_t, t, target, *(cond[key] for key in sorted(cond)))
        index, self.calls = self.calls, self.calls + 1
        if index == len(self.shared.saved):
            self.shared.saved.append(
                (tuple(x.clone() for x in inputs), self.reference.errors(x_t, t, cond, target))
            )
        saved, errors = self.shared.saved[index]
        if len(saved) != len(inputs) or not all(
            torch.equal(a, b) for a, b in zip(saved, inputs, strict=True)
        ):
            raise RuntimeError("held-out evaluation drew other inputs than the saved reference errors")
        return errors


def provenance() -> dict:
    found = {}
    for name in ("vipo", "torch", "diffusers", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "python": platform.python_version(),
        "versions": found,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def aggregate(runs: Sequence[dict]) -> list[dict]:
    """Per (regime, alpha): n, mean, std (sample std over seeds; 0 for one seed), min, max."""
    groups: dict[tuple[str, float], list[float]] = {}
    for run in runs:
        groups.setdefault((run["regime"], run["alpha"]), []).append(run["accuracy_after"])
    rows = []
    for (regime, alpha), values in sorted(groups.items(), key=lambda kv: (_regime_order(kv[0][0]), kv[0][1])):
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        rows.append(
            {
                "regime": regime,
                "alpha": alpha,
                "n": n,
                "mean": mean,
                "std": std,
                "min": min(values),
                "max": max(values),
            }
        )
    return rows


def _regime_order(regime: str) -> int:
    return REGIMES.index(regime) if regime in REGIMES else len(REGIMES)


def verdict(aggregates: Sequence[dict]) -> dict:
    """Per regime: the alpha of the best mean accuracy, whether its sign is the paper's, and
    whether its lead over the runner-up exceeds the spread over seeds of either."""
    out = {}
    for regime in dict.fromkeys(row["regime"] for row in aggregates):
        rows = sorted((r for r in aggregates if r["regime"] == regime), key=lambda r: -r["mean"])
        best, second = rows[0], rows[1] if len(rows) > 1 else None
        sign = PAPER_SIGN.get(regime)
        alphas = [r["alpha"] for r in rows]
        if sign == 0:  # "alpha ~ 0": the grid's alpha nearest 0
            matches = abs(best["alpha"]) == min(abs(a) for a in alphas)
        elif sign is not None:
            matches = best["alpha"] * sign > 0
        else:
            matches = None
        gap = best["mean"] - second["mean"] if second else None
        if gap == 0:
            matches = False  # a tie names no best alpha
        out[regime] = {
            "best_alpha": best["alpha"],
            "tied_best": sorted(r["alpha"] for r in rows if r["mean"] == best["mean"]),
            "best_mean": best["mean"],
            "expected": EXPECTED.get(sign),
            "matches_paper": matches,
            "runner_up_alpha": second["alpha"] if second else None,
            "lead": gap,
            "lead_beyond_spread": gap > max(best["std"], second["std"]) if second else None,
            "means": {f"{r['alpha']:g}": r["mean"] for r in sorted(rows, key=lambda r: r["alpha"])},
        }
    return out


def _summary(verdicts: dict) -> dict:
    matched = [v["matches_paper"] for v in verdicts.values()]
    return {
        "ordering_appears": bool(matched) and all(matched),
        "ordering_appears_beyond_spread": bool(matched)
        and all(v["matches_paper"] and v["lead_beyond_spread"] for v in verdicts.values()),
        "regimes_matching": [r for r, v in verdicts.items() if v["matches_paper"]],
    }


def markdown(study: dict) -> str:
    aggregates, verdicts = study["aggregates"], study["verdict"]
    alphas = sorted({row["alpha"] for row in aggregates})
    cells = {(row["regime"], row["alpha"]): row for row in aggregates}
    settings = study["settings"]
    run, demo = settings["run"], settings["demo"]
    lines = [
        "# vipo study alpha: held-out preference accuracy by data regime and alpha",
        "",
        f"Held-out accuracy on {demo['held_out_pairs']} clean pairs ({settings['eval_draws']} noise draws "
        "each) after stage 2; mean ± sample std over seeds (n seeds in brackets); 0.5 = chance, where "
        "every run starts. The best alpha of each regime in bold.",
        f"Stage 1: SFT on winners, {demo['sft_steps']} steps; stage 2: {run['train']['max_steps']} steps, "
        f"beta {run['loss']['beta']:g}, lr {run['optim']['lr']:g} per pair, {run['train']['batch_pairs']} "
        f"pairs a step, {run['data']['resolution']} px; noisy flips {run['data']['flip_prob']:g} of the labels.",
        "",
        "| regime | " + " | ".join(f"alpha {a:g}" for a in alphas) + " | best | paper | matches |",
        "|---" * (len(alphas) + 4) + "|",
    ]
    for regime, v in verdicts.items():
        row = []
        for alpha in alphas:
            cell = cells.get((regime, alpha))
            text = f"{cell['mean']:.3f} ± {cell['std']:.3f} ({cell['n']})" if cell else "–"
            best = cell and alpha == v["best_alpha"] and len(v["tied_best"]) == 1
            row.append(f"**{text}**" if best else text)
        tied = v["tied_best"]
        best_text = f"{v['best_alpha']:g}" if len(tied) == 1 else "tie: " + ", ".join(f"{a:g}" for a in tied)
        matches = {True: "yes", False: "no", None: "–"}[v["matches_paper"]]
        if v["matches_paper"] and not v["lead_beyond_spread"]:
            matches += " (within spread)"
        lines.append(
            f"| {regime} | " + " | ".join(row) + f" | {best_text} | {v['expected'] or '–'} | {matches} |"
        )
    summary = study["summary"]
    appears = "yes" if summary["ordering_appears"] else "no"
    if summary["ordering_appears"] and not summary["ordering_appears_beyond_spread"]:
        appears += ", but not beyond the spread over seeds"
    lines += ["", f"The paper's ordering appears: {appears}.", ""]
    return "\n".join(lines)


def plot(study: dict, png: Path) -> Path:
    """Accuracy against alpha, one line per regime, error bars the std over seeds, each seed a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .report import DPI, STAGE_COLOURS

    aggregates = study["aggregates"]
    alphas = sorted({row["alpha"] for row in aggregates})
    position = {alpha: i for i, alpha in enumerate(alphas)}  # evenly spaced, labelled by value
    figure = Figure(figsize=(6.4, 4.2), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    regimes = list(dict.fromkeys(row["regime"] for row in aggregates))
    for number, regime in enumerate(regimes):
        colour = STAGE_COLOURS[number % len(STAGE_COLOURS)]
        rows = [row for row in aggregates if row["regime"] == regime]
        offset = (number - (len(regimes) - 1) / 2) * 0.06
        xs = [position[row["alpha"]] + offset for row in rows]
        ax.errorbar(
            xs,
            [r["mean"] for r in rows],
            yerr=[r["std"] for r in rows],
            color=colour,
            marker="o",
            capsize=4,
            label=f"{regime} (paper: {EXPECTED.get(PAPER_SIGN.get(regime), '?')})",
        )
        runs = [run for run in study["runs"] if run["regime"] == regime and run["alpha"] in position]
        ax.scatter(
            [position[run["alpha"]] + offset for run in runs],
            [run["accuracy_after"] for run in runs],
            color=colour,
            alpha=0.35,
            s=14,
        )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (0.5)")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("Poly-DPO alpha (0 = Diffusion-DPO)")
    ax.set_ylabel("held-out preference accuracy (clean pairs)")
    seeds = max((row["n"] for row in aggregates), default=0)
    ax.set_title(f"vipo study alpha: mean ± std over {seeds} seed{'s' * (seeds != 1)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=DPI, format="png")
    return png


def _load(path: Path, settings: dict, digest: str) -> list[dict]:
    """The finished runs of an earlier study in this folder; an error if it used other settings."""
    earlier = read_json(path)
    if earlier is None:
        return []
    if earlier.get("settings_digest") != digest:
        flat_found = _flatten(earlier.get("settings", {}))
        differences = describe_differences(flat_found, _flatten(settings), holder="it")
        raise RunError(
            f"{path} holds a study with other settings ({differences or 'unreadable settings'}): "
            "choose another --out, or delete it to start over"
        )
    return list(earlier.get("runs", []))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _write(out: Path, study: dict, runs: list[dict], started: float) -> dict:
    study["runs"] = sorted(runs, key=lambda r: (r["seed"], _regime_order(r["regime"]), r["alpha"]))
    study["aggregates"] = aggregate(runs)
    study["verdict"] = verdict(study["aggregates"]) if runs else {}
    study["summary"] = _summary(study["verdict"])
    study["wall_seconds_this_invocation"] = time.perf_counter() - started
    write_json_atomic(out / "study.json", study)
    return study


def run_alpha_study(
    cfg: RunConfig,
    demo: DemoConfig,
    out: Path,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    regimes: Sequence[str] = REGIMES,
    seeds: Sequence[int] | None = None,
    draws: int = EVAL_DRAWS,
    progress: bool = True,
) -> dict:
    """The study in `out` (study.json, study.md, study.png, runs/); seeds default to
    train.seed + 0, 1, 2. Runs already in out/study.json with these settings are skipped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds if seeds is not None else range(cfg.train.seed, cfg.train.seed + DEFAULT_SEEDS))
    settings = study_settings(cfg, demo, draws)
    digest = digest_of(settings)
    runs = _load(out / "study.json", settings, digest)
    done = {(r["regime"], r["alpha"], r["seed"]) for r in runs}
    study = {
        "study": "alpha",
        "question": "is alpha > 0 best on noisy pairs, alpha < 0 on shuffled ones, alpha ~ 0 on clean ones?",
        "provenance": provenance(),
        "settings": settings,
        "settings_digest": digest,
        "grid": {"regimes": list(regimes), "alphas": list(alphas), "seeds": seeds},
    }
    started = time.perf_counter()
    total = len(regimes) * len(alphas) * len(seeds)
    todo = total - sum((r, a, s) in done for r in regimes for a in alphas for s in seeds)
    log.info("study: %d runs (%d already in %s/study.json), %d to go", total, total - todo, out, todo)
    count = 0
    for seed in seeds:  # each seed covers the whole grid before the next: a stopped study is still a grid
        for regime in regimes:
            pending = [a for a in alphas if (regime, a, seed) not in done]
            if not pending:
                continue
            group = out / "runs" / f"{regime}-seed{seed}"
            variant = _variant(cfg, regime=regime, seed=seed)
            sft = _stage_one(variant, demo, group, digest, progress)
            held_out = held_out_pairs(variant, demo)
            shared = SharedReferenceErrors()
            before = None  # the same for every alpha: each starts as stage 1's checkpoint
            for alpha in pending:
                count += 1
                log.info("study run %d/%d: %s, seed %d, alpha %g", count, todo, regime, seed, alpha)
                run = _stage_two(variant, demo, group, alpha, held_out, shared, draws, before, progress)
                before = run["accuracy_before"]
                run.update(
                    regime=regime, alpha=alpha, seed=seed, settings_digest=digest, sft_seconds=sft["seconds"]
                )
                run["sft_steps"] = sft["steps"]
                runs.append(run)
                elapsed = time.perf_counter() - started
                log.info(
                    "study run %d/%d: %s, seed %d, alpha %g: held-out accuracy %.3f -> %.3f (%.0f s; %.0f s so far, "
                    "about %.0f s to go)",
                    count,
                    todo,
                    regime,
                    seed,
                    alpha,
                    run["accuracy_before"],
                    run["accuracy_after"],
                    run["seconds"],
                    elapsed,
                    elapsed / count * (todo - count),
                )
                _write(out, study, runs, started)
    study = _write(out, study, runs, started)
    (out / "study.md").write_text(markdown(study), encoding="utf-8")
    plot(study, out / "study.png")
    return study


def _stage_one(cfg: RunConfig, demo: DemoConfig, group: Path, digest: str, progress: bool) -> dict:
    """Stage 1 of a (regime, seed), trained once: a finished one of these settings is reused."""
    marker = group / "sft-done.json"
    finished = read_json(marker) if marker.is_file() else None
    if finished and finished.get("settings_digest") == digest and (group / "sft" / "checkpoints").is_dir():
        log.info("stage 1 of %s: reusing %s", group.name, group / "sft")
        return finished
    shutil.rmtree(group / "sft", ignore_errors=True)  # an unfinished or foreign stage 1 starts over
    marker.unlink(missing_ok=True)
    group.mkdir(parents=True, exist_ok=True)
    summary = train_stage_one(cfg, demo, group, progress=progress)
    finished = {"settings_digest": digest, "steps": summary["steps"], "seconds": summary["seconds"]}
    write_json_atomic(marker, finished)
    return finished


def _stage_two(cfg, demo, group, alpha, held_out, shared, draws, before, progress) -> dict:
    """One alpha from the group's stage 1: held-out accuracy before (measured once per stage 1:
    `before` None) and after; its checkpoints are not kept."""
    run_dir = group / _label(alpha)
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted earlier attempt left
    run_cfg = _with_alpha(stage_two_config(cfg, demo, group), alpha, run_dir)
    started = time.perf_counter()
    with Trainer(run_cfg, progress=progress) as trainer:
        if before is None:
            reference = shared.over(trainer.reference)
            before = held_out_accuracy(trainer.adapter, reference, held_out, draws=draws)["accuracy"]
        summary = trainer.train()
        after = held_out_accuracy(trainer.adapter, shared.over(trainer.reference), held_out, draws=draws)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # metrics.jsonl and config.json stay
    return {
        "objective": run_cfg.loss.objective,
        "accuracy_before": before,
        "accuracy_after": after["accuracy"],
        "winner_change": after["winner_change"],
        "loser_change": after["loser_change"],
        "held_out_pairs": after["pairs"],
        "steps": summary["steps"],
        "train_seconds": summary["seconds"],
        "seconds": time.perf_counter() - started,
        "last": {k: summary["last"][k] for k in ("loss", "accuracy", "margin") if k in summary["last"]},
    }
