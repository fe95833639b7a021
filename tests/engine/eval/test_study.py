"""`vipo study alpha`: a tiny study writes its table, plot and JSON with one row per run and the
aggregates over seeds; stage 1 runs once per (regime, seed); a study started again skips what it
holds; bad grid flags are one-line usage errors naming the flag."""

import json
import math

import pytest
import torch
from PIL import Image

from vipo.engine.cli import main
from vipo.engine.config import load_demo_config
from vipo.engine.errors import RunError
from vipo.engine.eval import demo as demo_module
from vipo.engine.eval import study as study_module
from vipo.engine.eval.study import SharedReferenceErrors, aggregate, run_alpha_study, verdict
from vipo.engine.trainer import Trainer

TINY = [
    "demo.sft_steps=2",
    "train.max_steps=2",
    "data.resolution=8",
    "data.num_pairs=8",
    "train.batch_pairs=2",
    "demo.held_out_pairs=4",
    "train.log_every_steps=1",
]
REGIMES, ALPHAS = ("clean", "shuffled"), (0.0, 2.0)


class Counted:
    """Trainer subclasses for demo.py and study.py that count the runs they start by objective."""

    def __init__(self, monkeypatch):
        self.objectives: list[str] = []
        counts = self.objectives

        class CountingTrainer(Trainer):
            def __init__(self, cfg, **kwargs):
                counts.append(cfg.loss.objective)
                super().__init__(cfg, **kwargs)

        monkeypatch.setattr(demo_module, "Trainer", CountingTrainer)
        monkeypatch.setattr(study_module, "Trainer", CountingTrainer)


def tiny_study(out, overrides=(), **kwargs):
    cfg, demo = load_demo_config(None, [*TINY, *overrides])
    args = {"alphas": ALPHAS, "regimes": REGIMES, "seeds": [0], "draws": 1, "progress": False, **kwargs}
    return run_alpha_study(cfg, demo, out, **args)


@pytest.fixture(scope="module")
def first_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as monkeypatch:
        counted = Counted(monkeypatch)
        study = tiny_study(out)
    return out, study, counted.objectives


def test_a_tiny_study_writes_one_row_per_run_and_the_aggregates(first_study):
    out, study, _ = first_study
    saved = json.loads((out / "study.json").read_text())
    assert saved["runs"] == study["runs"]
    cells = {(r["regime"], r["alpha"], r["seed"]) for r in saved["runs"]}
    assert cells == {(regime, alpha, 0) for regime in REGIMES for alpha in ALPHAS}
    assert len(saved["runs"]) == 4
    for run in saved["runs"]:
        assert run["accuracy_before"] == 0.5  # stage 2 starts with policy == reference: all ties
        assert 0.0 <= run["accuracy_after"] <= 1.0 and run["held_out_pairs"] == 4
        assert run["steps"] == 2 and run["sft_steps"] == 2 and run["seconds"] > 0
        assert run["objective"] == ("dpo" if run["alpha"] == 0 else "poly_dpo")
    by_cell = {(r["regime"], r["alpha"]): r for r in saved["runs"]}
    assert [(a["regime"], a["alpha"]) for a in saved["aggregates"]] == [
        (regime, alpha) for regime in REGIMES for alpha in ALPHAS
    ]
    for row in saved["aggregates"]:
        value = by_cell[(row["regime"], row["alpha"])]["accuracy_after"]
        assert (row["n"], row["mean"], row["std"], row["min"], row["max"]) == (1, value, 0.0, value, value)
    assert set(saved["verdict"]) == set(REGIMES)
    assert saved["verdict"]["shuffled"]["expected"] == "alpha < 0"
    assert saved["grid"] == {"regimes": list(REGIMES), "alphas": list(ALPHAS), "seeds": [0]}
    provenance = saved["provenance"]
    assert provenance["cpu_count"] >= 1 and provenance["versions"]["torch"] and provenance["date"]
    assert saved["settings"]["demo"]["sft_steps"] == 2 and saved["settings"]["eval_draws"] == 1
    assert "regime" not in saved["settings"]["run"]["data"]  # a run's own coordinates are not settings

    table = (out / "study.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| regime |"))
    assert "| alpha 0 | alpha 2 |" in header
    for regime in REGIMES:
        row = next(line for line in table.splitlines() if line.startswith(f"| {regime} |"))
        mean = by_cell[(regime, 0.0)]["accuracy_after"]
        assert f"{mean:.3f} ± 0.000 (1)" in row
    with Image.open(out / "study.png") as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400
    for regime in REGIMES:  # stage 2 keeps its metrics but not its checkpoints
        run_dir = out / "runs" / f"{regime}-seed0" / "alpha2"
        assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "checkpoints").exists()


def test_stage_one_runs_once_per_regime_and_seed(first_study):
    _, _, objectives = first_study
    assert objectives.count("sft") == len(REGIMES)  # not once per alpha
    assert sorted(o for o in objectives if o != "sft") == ["dpo", "dpo", "poly_dpo", "poly_dpo"]


def test_a_study_started_again_skips_the_runs_it_holds(first_study, monkeypatch):
    out, study, _ = first_study
    counted = Counted(monkeypatch)
    again = tiny_study(out)
    assert counted.objectives == []  # nothing trained
    assert again["runs"] == study["runs"]

    saved = json.loads((out / "study.json").read_text())
    dropped = next(r for r in saved["runs"] if (r["regime"], r["alpha"]) == ("shuffled", 2.0))
    saved["runs"].remove(dropped)
    (out / "study.json").write_text(json.dumps(saved))
    resumed = tiny_study(out)
    assert counted.objectives == ["poly_dpo"]  # the missing run only, from the kept stage 1
    assert len(resumed["runs"]) == 4
    redone = next(r for r in resumed["runs"] if (r["regime"], r["alpha"]) == ("shuffled", 2.0))
    assert redone["accuracy_after"] == pytest.approx(dropped["accuracy_after"], abs=0.25)


def test_a_study_folder_of_other_settings_is_refused_naming_the_difference(first_study, monkeypatch):
    out, _, _ = first_study
    counted = Counted(monkeypatch)
    with pytest.raises(RunError, match=r"other settings \(demo\.sft_steps: it has 2, this run 3"):
        tiny_study(out, ["demo.sft_steps=3"])
    assert counted.objectives == []


def test_aggregates_and_verdict_over_seeds():
    accuracy = {  # (regime, alpha) -> accuracy per seed
        ("clean", -1.0): [0.60, 0.62],
        ("clean", 0.0): [0.70, 0.74],
        ("clean", 8.0): [0.64, 0.66],
        ("noisy", -1.0): [0.55, 0.57],
        ("noisy", 0.0): [0.60, 0.70],
        ("noisy", 8.0): [0.62, 0.70],
        ("shuffled", -1.0): [0.58, 0.60],
        ("shuffled", 0.0): [0.58, 0.62],
        ("shuffled", 8.0): [0.50, 0.52],
    }
    runs = [
        {"regime": regime, "alpha": alpha, "seed": seed, "accuracy_after": value}
        for (regime, alpha), values in accuracy.items()
        for seed, value in enumerate(values)
    ]
    rows = {(r["regime"], r["alpha"]): r for r in aggregate(runs)}
    noisy0 = rows[("noisy", 0.0)]
    assert noisy0["n"] == 2 and noisy0["mean"] == pytest.approx(0.65)
    assert noisy0["std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # sample std, n - 1
    assert (noisy0["min"], noisy0["max"]) == (0.60, 0.70)

    found = verdict(list(rows.values()))
    assert found["clean"]["best_alpha"] == 0.0 and found["clean"]["matches_paper"] is True
    assert found["clean"]["lead_beyond_spread"] is True  # 0.72 vs 0.65, spreads about 0.03
    assert found["noisy"]["best_alpha"] == 8.0 and found["noisy"]["matches_paper"] is True
    assert found["noisy"]["lead_beyond_spread"] is False  # 0.66 vs 0.65 with a spread of 0.07
    # Shuffled: alpha 0 leads alpha -1 (0.60 vs 0.59): not the paper's sign.
    assert found["shuffled"]["best_alpha"] == 0.0 and found["shuffled"]["matches_paper"] is False
    tie = verdict(aggregate([{**r, "accuracy_after": 0.5} for r in runs if r["regime"] == "noisy"]))
    assert tie["noisy"]["matches_paper"] is False and tie["noisy"]["tied_best"] == [-1.0, 0.0, 8.0]


class FakeReference:
    def __init__(self):
        self.calls = 0

    def errors(self, x_t, t, cond, target):
        self.calls += 1
        return x_t.mean(dim=(1, 2, 3))


def test_reference_errors_are_computed_once_and_replayed_only_for_the_same_inputs(seed):
    shared, reference = SharedReferenceErrors(), FakeReference()
    x_t, t, target = torch.randn(4, 3, 2, 2), torch.tensor([1, 2, 3, 4]), torch.randn(4, 3, 2, 2)
    cond = {"text": torch.randn(4, 5)}
    first = shared.over(reference).errors(x_t, t, cond, target)
    replayed = shared.over(reference).errors(x_t.clone(), t.clone(), dict(cond), target.clone())
    assert reference.calls == 1 and torch.equal(first, replayed)
    with pytest.raises(RuntimeError, match="other inputs"):
        shared.over(reference).errors(x_t + 1, t, cond, target)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--alphas", "1,x", "argument --alphas: not a comma-separated list of numbers: '1,x'"),
        ("--alphas", "-1,0,-1", "argument --alphas: an alpha is given twice"),
        ("--alphas", "nan", "argument --alphas: alphas must be finite"),
        ("--regimes", "clean,dirty", "argument --regimes: unknown regime 'dirty'"),
        ("--seeds", "0", "argument --seeds: a whole number >= 1"),
    ],
)
def test_a_bad_grid_flag_is_a_one_line_usage_error_naming_it(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as stop:
        main(["study", "alpha", flag, value, "--out", str(tmp_path / "study")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "study").exists()


def test_the_cli_runs_a_study_with_negative_alphas_after_the_overrides(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "alpha", "-q", *TINY, "demo.held_out_pairs=2", "--alphas", "-1", "--regimes", "noisy"]
    assert main([*args, "--seeds", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "study.json").read_text())
    assert [(r["regime"], r["alpha"]) for r in saved["runs"]] == [("noisy", -1.0)]
    assert saved["settings"]["demo"]["held_out_pairs"] == 2  # the command line wins over the schedule
    assert saved["settings"]["run"]["train"]["max_steps"] == 2
    assert "| noisy |" in capsys.readouterr().out
