"""The training-step benchmark runs end to end at tiny size on CPU: it checks the harness, that
vipo's run is the engine's own Trainer step, the result file and the README table, not speed (CPU
timings are noise)."""

import ast
import copy
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vipo.benchmarks import bench_step, step_report, step_timing
from vipo.benchmarks.step_vipo import SYNTHETIC_CACHE
from vipo.benchmarks.step_workload import HostBatch, Workload
from vipo.engine import objectives
from vipo.engine.cli import main
from vipo.engine.config import load_config
from vipo.engine.models import build_adapter
from vipo.engine.reference.precomputed import PrecomputedReference
from vipo.engine.trainer import Trainer

BENCHMARKS = Path(bench_step.__file__).resolve().parent
SMOKE = ["--smoke", "--steps", "2", "--warmup", "0"]  # + the split pass: 1 step
STEPS_PER_RUN = 3


def spy_on_the_engine(monkeypatch) -> dict:
    """Spies on the engine's step: Trainer.forward_backward (the batch kind), Trainer.update (the
    finite flag), the fused loss objectives.forward_loss calls, and precomputed reference lookups."""
    calls = {"forward_backward": [], "update": [], "poly_dpo_loss": 0, "precomputed_errors": 0}
    forward_backward, update, loss = Trainer.forward_backward, Trainer.update, objectives.poly_dpo_loss
    errors = PrecomputedReference.errors

    def spy_forward_backward(self, batch, **kw):
        calls["forward_backward"].append(type(batch).__name__)
        return forward_backward(self, batch, **kw)

    def spy_update(self, finite):
        calls["update"].append(finite)
        return update(self, finite)

    def spy_loss(*args, **kw):
        calls["poly_dpo_loss"] += 1
        return loss(*args, **kw)

    def spy_errors(self, *args, **kw):
        calls["precomputed_errors"] += 1
        return errors(self, *args, **kw)

    monkeypatch.setattr(Trainer, "forward_backward", spy_forward_backward)
    monkeypatch.setattr(Trainer, "update", spy_update)
    monkeypatch.setattr(objectives, "poly_dpo_loss", spy_loss)
    monkeypatch.setattr(PrecomputedReference, "errors", spy_errors)
    return calls


@pytest.fixture
def engine_calls(monkeypatch):
    return spy_on_the_engine(monkeypatch)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A UNet (sd15-tiny) and a flow-matching DiT (flux-tiny, LoRA with the adapter reference),
    each against its baseline, appended to one result file; with what the engine was asked to do."""
    out = tmp_path_factory.mktemp("bench") / "step.json"
    runs = (["sd15-tiny"], ["flux-tiny", "model.lora_rank=4", "reference.mode=adapter"])
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        calls = spy_on_the_engine(patch)
        for target in runs:
            before = {key: copy.copy(value) for key, value in calls.items()}
            assert main(["bench", "step", *target, *SMOKE, "--out", str(out)]) == 0
            seen.append(
                {
                    key: value[len(before[key]) :] if isinstance(value, list) else value - before[key]
                    for key, value in calls.items()
                }
            )
    return json.loads(out.read_text())["runs"], seen


def test_a_smoke_run_writes_every_figure_of_vipo_and_the_baseline(reports):
    reports, _ = reports
    assert [r["target"]["name"] for r in reports] == ["sd15-tiny", "flux-tiny"]
    for report in reports:
        assert report["kind"] == "step" and report["smoke"] is True and report["device_type"] == "cpu"
        assert report["date"] and report["device"] and "commit" in report
        assert report["versions"]["torch"] and report["versions"]["diffusers"]
        assert "forward_backward" in report["timing"]["vipo_step"]
        shapes = report["shapes"]
        assert shapes["batch_pairs"] == 1 and shapes["pixels"][0] == shapes["latents"][0] == 2
        assert report["flops"]["forward_per_sample"] > 0
        assert report["flops"]["per_pair"] == 8 * report["flops"]["forward_per_sample"]
        assert set(report["runs"]) == {"vipo", "baseline"}
        for run in report["runs"].values():
            assert "error" not in run, run.get("error")
            step = run["step_ms"]
            assert 0 < step["min"] <= step["q20"] <= step["median"] <= step["q80"] <= step["max"]
            assert run["pairs_per_s"] == pytest.approx(1e3 / step["mean"])
            assert run["samples_per_s"] == pytest.approx(2 * run["pairs_per_s"])
            assert run["model_tflops_per_s"] == pytest.approx(
                run["pairs_per_s"] * report["flops"]["per_pair"] / 1e12
            )
            assert run["mfu"] is None and run["peak_memory_gib"] is None  # no peak and no allocator on CPU
            assert math.isfinite(run["loss"]) and run["loss_is_finite"]
            assert list(run["split_ms"]) == list(step_timing.PHASES)
            assert all(ms >= 0 for ms in run["split_ms"].values())
            assert run["split_total_ms"] == pytest.approx(sum(run["split_ms"].values()))
            for phase in ("reference", "policy_forward", "backward", "optimizer"):
                assert run["split_ms"][phase] > 0, phase
        vipo, base = report["runs"]["vipo"], report["runs"]["baseline"]
        assert report["ratios"]["pairs_per_s"] == pytest.approx(vipo["pairs_per_s"] / base["pairs_per_s"])
        assert report["ratios"]["peak_memory"] is None
        # vipo's run is recorded as the resolved RunConfig: a latent-cache run on one CPU, fp32, no compile.
        config = vipo["config"]
        assert vipo["inputs"] == "latents" and config["data"]["cache"] == SYNTHETIC_CACHE
        assert (
            config["train"]["device"],
            config["train"]["mixed_precision"],
            config["train"]["compile"],
        ) == (
            "cpu",
            "no",
            "off",
        )
        assert (config["parallel"]["strategy"], config["train"]["grad_accum_steps"]) == ("none", 1)
        assert config["model"]["config"] == report["target"]["config"] and vipo["skipped_updates"] == 0
        assert base["settings"] | {"lora_rank": 0} == {
            "precision": "fp32",
            "reference": "copy",
            "lora_rank": 0,
            "inputs": "pixels",
            "compile": "off",
            "gradient_checkpointing": False,
            "attention": "sdpa",
        }
    flux = reports[1]["runs"]
    assert (
        flux["vipo"]["config"]["reference"]["mode"] == "adapter"
        and flux["vipo"]["config"]["model"]["lora_rank"] == 4
    )
    assert flux["baseline"]["settings"]["lora_rank"] == 4  # same trainable policy, separate reference copy


def test_the_vipo_run_is_the_engines_trainer_step(reports):
    # Every step of vipo's run (timed and split passes) is one Trainer.forward_backward on a cached
    # batch and one Trainer.update, and its loss is the engine's fused loss; the baseline, which ran
    # in between, never goes through the trainer.
    _, seen = reports
    for calls in seen:
        assert calls["forward_backward"] == ["LatentPairBatch"] * STEPS_PER_RUN
        assert calls["update"] == [True] * STEPS_PER_RUN
        assert calls["poly_dpo_loss"] == STEPS_PER_RUN


def code_of(path: Path) -> str:
    """A module's code without its docstrings and comments (which may name what the code may not do)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def test_the_vipo_step_modules_hold_no_loss_formula_optimizer_or_backward():
    # What is timed for vipo is the engine's code: outside the labelled baseline (and the kernel
    # benchmark, which times the loss kernel itself) no benchmark file computes a loss or steps.
    forbidden = (
        "logsigmoid",
        "sigmoid",
        "softplus",
        "poly_dpo_loss",
        "sample_errors",
        "mse_loss",
        "pow(2)",
        "clip_grad_norm_",
        "optimizer.step",
        ".backward(",
        "GradScaler",
    )
    for name in (
        "bench_step.py",
        "step_vipo.py",
        "step_timing.py",
        "step_workload.py",
        "step_report.py",
        "cli.py",
    ):
        found = [word for word in forbidden if word in code_of(BENCHMARKS / name)]
        assert not found, f"{name} computes {found}"
    assert "logsigmoid" in code_of(
        BENCHMARKS / "step_baseline.py"
    )  # the labelled baseline: the check sees code


def test_the_phase_split_adds_up_to_the_step_time(reports):
    # The phases of the synchronised pass must cover its whole step, timed from outside: work left
    # between two marks, or counted twice, shows here. (Against the headline pass it is only
    # "about": on a shared 2-core machine single steps wander by seconds.)
    for report in reports[0]:
        for run in report["runs"].values():
            assert run["split_total_ms"] == pytest.approx(run["split_step_ms"], rel=0.05, abs=5.0)
            assert run["split_vs_headline"] == pytest.approx(run["split_step_ms"] / run["step_ms"]["median"])


def test_a_precomputed_reference_reads_its_errors_on_cached_latents(engine_calls, tmp_path):
    out = tmp_path / "step.json"
    args = [
        "sd15-tiny",
        "reference.mode=precomputed",
        "--smoke",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--no-baseline",
    ]
    assert main(["bench", "step", *args, "--out", str(out)]) == 0
    (report,) = json.loads(out.read_text())["runs"]
    vipo = report["runs"]["vipo"]
    assert set(report["runs"]) == {"vipo"} and report["ratios"] is None
    assert (
        vipo["config"]["reference"]["mode"] == "precomputed"
        and vipo["config"]["data"]["cache"] == SYNTHETIC_CACHE
    )
    assert vipo["loss_is_finite"] and "error" not in vipo
    # no reference model: e_ref looked up by pair id and epoch, once a step (timed + split)
    assert (
        engine_calls["forward_backward"] == ["LatentPairBatch"] * 2
        and engine_calls["precomputed_errors"] == 2
    )


def test_cached_inputs_are_float16_latents_and_embeddings_and_pixels_stay_pixels():
    work = Workload("flux-tiny", "flux", "flux-tiny", torch.device("cpu"), 1, (3, 16, 16), 1, 0, 1)
    cfg = load_config(None, ["model.family=flux", "model.config=flux-tiny"])
    adapter = build_adapter(cfg.model, work.device, seed=0, trainable=False)
    cached = HostBatch(work, adapter, "latents", torch.autocast("cpu", enabled=False))
    assert (
        cached.pixels is None
        and cached.latents.shape == (2, 16, 8, 8)
        and cached.latents.dtype == torch.float16
    )
    assert work.latent_shape == (16, 8, 8) and set(work.cond_shapes) == set(cached.cond)
    assert set(cached.cond) == {"encoder_hidden_states", "pooled_projections"}
    assert {value.dtype for value in cached.cond.values()} == {torch.float16}
    latents, cond = cached.latents_on_device(torch.bfloat16)  # in the dtype the denoiser is fed
    assert latents.dtype == torch.bfloat16 and {v.dtype for v in cond.values()} == {torch.bfloat16}
    online = HostBatch(work, adapter, "pixels", torch.autocast("cpu", enabled=False))
    assert online.latents is None and online.pixels.shape == (2, 3, 16, 16)
    assert online.pixels.min() >= -1 and online.pixels.max() <= 1


def test_an_attention_backend_choice_does_not_leak_into_the_next_run():
    # model.attention=sdpa_* switches PyTorch's SDPA backends process-wide; the baseline that runs
    # after vipo in the same process must get them back as they were.
    names = step_timing.SDPA_BACKENDS
    before = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in names}

    class FlipsBackends:
        device = torch.device("cpu")

        def __init__(self):
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_math_sdp(False)
            self.closed = False

        def step(self, clock):
            clock.start()
            clock.mark("policy_forward")
            return torch.tensor(0.5)

        def close(self):
            self.closed = True

    built = []
    work = SimpleNamespace(device=torch.device("cpu"), warmup=1, steps=2, split_steps=1, batch_pairs=1)
    result = step_timing.measure(lambda: built.append(FlipsBackends()) or built[-1], work, {"step": "x"})
    assert "error" not in result and result["loss"] == 0.5 and built[0].closed
    assert {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in names} == before


def test_the_phase_clock_puts_each_phase_wall_time_where_it_happened():
    clock = step_timing.PhaseClock(torch.device("cpu"), enabled=True)
    started = time.perf_counter()
    clock.start()
    time.sleep(0.03)
    clock.mark("data")
    time.sleep(0.06)
    clock.mark("backward")
    total = time.perf_counter() - started
    assert clock.totals["data"] >= 0.03 and clock.totals["backward"] >= 0.06
    assert sum(clock.totals.values()) == pytest.approx(total, rel=0.05)
    assert clock.totals["reference"] == 0.0
    quiet = step_timing.PhaseClock(torch.device("cpu"), enabled=False)
    quiet.start()
    quiet.mark("data")
    assert sum(quiet.totals.values()) == 0.0


def test_step_quantiles_are_torch_quantiles():
    got = step_timing.quantiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert got == pytest.approx({"min": 1.0, "q20": 1.8, "median": 3.0, "q80": 4.2, "max": 5.0})


def _as_gpu_report(report, pairs_per_s=(12.5, 4.0), memory=(20.0, 40.0)):
    gpu = copy.deepcopy(report)
    gpu.update(smoke=False, device_type="cuda", device="NVIDIA H100 80GB HBM3")
    for run, rate, gib in zip(gpu["runs"].values(), pairs_per_s, memory, strict=True):
        run.update(pairs_per_s=rate, peak_memory_gib=gib, mfu=0.5)
    gpu["ratios"] = {"pairs_per_s": pairs_per_s[0] / pairs_per_s[1], "peak_memory": memory[0] / memory[1]}
    return gpu


def test_the_readme_table_has_a_row_per_gpu_run_and_says_when_there_is_none(reports, tmp_path):
    reports, _ = reports
    assert "No GPU results" in step_report.render_table([])
    assert "No GPU results" in step_report.render_table(reports)  # CPU smoke runs never reach the table
    table = step_report.render_table([_as_gpu_report(reports[0]), reports[1]]).splitlines()
    assert len(table) == 3  # header, rule, one row
    row = [cell.strip() for cell in table[2].strip("|").split("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    cells = dict(zip(header, row, strict=True))
    assert cells["target"] == "sd15-tiny" and cells["shape"] == "16px" and cells["pairs"] == "1"
    assert cells["device"] == "NVIDIA H100 80GB HBM3"
    assert (cells["vipo pairs/s"], cells["baseline pairs/s"], cells["pairs/s x"]) == ("12.50", "4.00", "3.12")
    assert (cells["peak GiB vipo / baseline"], cells["memory x"]) == ("20.0 / 40.0", "0.50")
    assert cells["vipo MFU"] == "50.0%" and cells["vipo settings"] == "fp32, ref=copy, latents"
    flux = step_report.run_label(reports[1]["runs"]["vipo"])
    assert flux == "fp32, ref=adapter, latents, lora_rank=4"

    # A baseline that does not fit is a result too: the row says so and has no ratios.
    oom = _as_gpu_report(reports[1])
    oom["runs"]["baseline"] = {
        "step": "official",
        "settings": oom["runs"]["baseline"]["settings"],
        "error": "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB",
    }
    oom["ratios"] = {"pairs_per_s": None, "peak_memory": None}
    row = step_report.render_table([oom]).splitlines()[2]
    assert "| 12.50 | OOM | - |" in row and "| 20.0 / OOM | - |" in row

    results = tmp_path / "results"
    results.mkdir()
    (results / "step-NVIDIA_H100-2026-01-01.json").write_text(
        json.dumps({"kind": "step", "runs": [_as_gpu_report(reports[1])]})
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Benchmarks\n\nintro\n{step_report.TABLE_START}\nold table\n{step_report.TABLE_END}\nafter\n"
    )
    step_report.render_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith(f"{step_report.TABLE_END}\nafter\n")
    assert "old table" not in text and "| flux-tiny | 16px | 1 |" in text


def test_the_committed_readme_table_matches_the_committed_results():
    text = (BENCHMARKS / "README.md").read_text()
    table = text.split(step_report.TABLE_START)[1].split(step_report.TABLE_END)[0].strip()
    assert table == step_report.render_table(step_report.collect_reports())


def test_the_printed_line_gives_memory_with_its_unit_or_says_why_there_is_none(reports, capsys):
    run = reports[0][0]["runs"]["vipo"]  # the sd15-tiny smoke run, as written
    step_report.print_run("vipo", {**run, "peak_memory_gib": None})
    step_report.print_run("vipo", {**run, "peak_memory_gib": 12.345})
    first, second = capsys.readouterr().out.splitlines()
    assert "peak memory n/a (not tracked on CPU);" in first and "GiB" not in first
    assert "peak memory 12.35 GiB;" in second
