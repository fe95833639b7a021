"""The training-step benchmark runs end to end at tiny size on CPU: it checks the harness, its
result file and the README table, not speed (CPU timings are noise)."""

import copy
import importlib
import json
import math
import time

import pytest
import torch

from vipo.engine.bench_cli import BENCHMARKS, load_harness
from vipo.engine.cli import main

bench_step = load_harness()
flops = importlib.import_module("flops")  # benchmarks/flops.py, on sys.path through load_harness


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A UNet (sd15-tiny) and a flow-matching DiT (flux-tiny, LoRA with the adapter reference),
    each against its baseline, appended to one result file."""
    out = tmp_path_factory.mktemp("bench") / "step.json"
    runs = (["sd15-tiny"], ["flux-tiny", "--settings", "lora_rank=4", "reference=adapter"])
    for target in runs:
        code = main(["bench", "step", *target, "--smoke", "--steps", "2", "--warmup", "0", "--out", str(out)])
        assert code == 0
    return json.loads(out.read_text())["runs"]


def test_a_smoke_run_writes_every_figure_of_vipo_and_the_baseline(reports):
    assert [r["target"]["name"] for r in reports] == ["sd15-tiny", "flux-tiny"]
    for report in reports:
        assert report["kind"] == "step" and report["smoke"] is True and report["device_type"] == "cpu"
        assert report["date"] and report["device"] and "commit" in report
        assert report["versions"]["torch"] and report["versions"]["diffusers"]
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
            assert list(run["split_ms"]) == list(bench_step.PHASES)
            assert all(ms >= 0 for ms in run["split_ms"].values())
            assert run["split_total_ms"] == pytest.approx(sum(run["split_ms"].values()))
            for phase in ("reference", "policy_forward", "backward", "optimizer"):
                assert run["split_ms"][phase] > 0, phase
        vipo, base = report["runs"]["vipo"], report["runs"]["baseline"]
        assert report["ratios"]["pairs_per_s"] == pytest.approx(vipo["pairs_per_s"] / base["pairs_per_s"])
        assert report["ratios"]["peak_memory"] is None
        assert (vipo["settings"]["inputs"], vipo["settings"]["loss"]) == ("latents", "fused")
        assert base["settings"] | {"lora_rank": 0} == {
            "precision": "fp32", "reference": "copy", "lora_rank": 0, "inputs": "pixels", "compile": "off",
            "gradient_checkpointing": False, "loss": "official", "attention": "sdpa",
        }  # fmt: skip
    flux = reports[1]["runs"]
    assert (flux["vipo"]["settings"]["reference"], flux["vipo"]["settings"]["lora_rank"]) == ("adapter", 4)
    assert flux["baseline"]["settings"]["lora_rank"] == 4  # same trainable policy, separate reference copy


def test_the_phase_split_adds_up_to_the_step_time(reports):
    # The phases of the synchronised pass must cover its whole step, timed from outside: work left
    # between two marks, or counted twice, shows here. (Against the headline pass it is only
    # "about": on a shared 2-core machine single steps wander by seconds.)
    for report in reports:
        for run in report["runs"].values():
            assert run["split_total_ms"] == pytest.approx(run["split_step_ms"], rel=0.05, abs=5.0)
            assert run["split_vs_headline"] == pytest.approx(run["split_step_ms"] / run["step_ms"]["median"])


def test_cached_inputs_leave_no_encoder_in_memory_and_pixels_keep_them():
    work = bench_step.Workload(
        bench_step.resolve_target("flux-tiny"), torch.device("cpu"), 1, (3, 16, 16), 1, 0, 1
    )
    cached = bench_step.StepRun(work, bench_step.StepSettings(precision="fp32"), official=False)
    assert (
        cached.adapter.vae is None
        and cached.adapter.text_encoder is None
        and cached.adapter.text_encoder_2 is None
    )
    assert cached.host_latents.shape == (2, 16, 8, 8) and cached.host_latents.dtype == torch.float16
    assert work.latent_shape == (16, 8, 8) and set(work.cond_shapes) == {
        "encoder_hidden_states",
        "pooled_projections",
    }
    online = bench_step.StepRun(
        work, bench_step.StepSettings(precision="fp32", inputs="pixels"), official=True
    )
    assert online.adapter.vae is not None and online.adapter.text_encoder_2 is not None
    assert online.host_pixels.shape == (2, 3, 16, 16)


def test_an_attention_backend_choice_does_not_leak_into_the_next_run():
    # model.attention=sdpa_* switches PyTorch's SDPA backends process-wide; the baseline that runs
    # after vipo in the same process must get them back as they were.
    before = {
        name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in bench_step.SDPA_BACKENDS
    }
    work = bench_step.Workload(
        bench_step.resolve_target("sd15-tiny"), torch.device("cpu"), 1, (3, 16, 16), 1, 0, 1
    )
    result = bench_step.measure(
        work, bench_step.StepSettings(precision="fp32", attention="sdpa_flash"), official=False
    )
    assert "error" not in result and result["settings"]["attention"] == "sdpa_flash"
    assert {
        name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in bench_step.SDPA_BACKENDS
    } == before


def test_the_phase_clock_puts_each_phase_wall_time_where_it_happened():
    clock = bench_step.PhaseClock(torch.device("cpu"), enabled=True)
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
    quiet = bench_step.PhaseClock(torch.device("cpu"), enabled=False)
    quiet.start()
    quiet.mark("data")
    assert sum(quiet.totals.values()) == 0.0


def _as_gpu_report(report, pairs_per_s=(12.5, 4.0), memory=(20.0, 40.0)):
    gpu = copy.deepcopy(report)
    gpu.update(smoke=False, device_type="cuda", device="NVIDIA H100 80GB HBM3")
    for run, rate, gib in zip(gpu["runs"].values(), pairs_per_s, memory, strict=True):
        run.update(pairs_per_s=rate, peak_memory_gib=gib, mfu=0.5)
    gpu["ratios"] = {"pairs_per_s": pairs_per_s[0] / pairs_per_s[1], "peak_memory": memory[0] / memory[1]}
    return gpu


def test_the_readme_table_has_a_row_per_gpu_run_and_says_when_there_is_none(reports, tmp_path):
    assert "No GPU results" in bench_step.render_table([])
    assert "No GPU results" in bench_step.render_table(reports)  # CPU smoke runs never reach the table
    table = bench_step.render_table([_as_gpu_report(reports[0]), reports[1]]).splitlines()
    assert len(table) == 3  # header, rule, one row
    row = [cell.strip() for cell in table[2].strip("|").split("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    cells = dict(zip(header, row, strict=True))
    assert cells["target"] == "sd15-tiny" and cells["shape"] == "16px" and cells["pairs"] == "1"
    assert cells["device"] == "NVIDIA H100 80GB HBM3"
    assert (cells["vipo pairs/s"], cells["baseline pairs/s"], cells["pairs/s x"]) == ("12.50", "4.00", "3.12")
    assert (cells["peak GiB vipo / baseline"], cells["memory x"]) == ("20.0 / 40.0", "0.50")
    assert cells["vipo MFU"] == "50.0%" and cells["vipo settings"].startswith("fp32, ref=copy, latents")

    # A baseline that does not fit is a result too: the row says so and has no ratios.
    oom = _as_gpu_report(reports[1])
    oom["runs"]["baseline"] = {"step": "official", "settings": oom["runs"]["baseline"]["settings"],
                               "error": "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB"}  # fmt: skip
    oom["ratios"] = {"pairs_per_s": None, "peak_memory": None}
    row = bench_step.render_table([oom]).splitlines()[2]
    assert "| 12.50 | OOM | - |" in row and "| 20.0 / OOM | - |" in row

    results = tmp_path / "results"
    results.mkdir()
    (results / "step-NVIDIA_H100-2026-01-01.json").write_text(
        json.dumps({"kind": "step", "runs": [_as_gpu_report(reports[1])]})
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# Benchmarks\n\nintro\n{bench_step.TABLE_START}\nold table\n{bench_step.TABLE_END}\nafter\n"
    )
    bench_step.render_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith(f"{bench_step.TABLE_END}\nafter\n")
    assert "old table" not in text and "| flux-tiny | 16px | 1 |" in text


def test_the_committed_readme_table_matches_the_committed_results():
    text = (BENCHMARKS / "README.md").read_text()
    table = text.split(bench_step.TABLE_START)[1].split(bench_step.TABLE_END)[0].strip()
    assert table == bench_step.render_table(bench_step.collect_reports())


@pytest.mark.parametrize(
    "args, words",
    [
        (["sd15-tiny", "--settings", "compiel=blocks"], "unknown setting 'compiel'"),
        (["sd15-tiny", "--settings", "reference=adapter"], "needs a LoRA policy"),
        (["sd15-tiny", "--settings", "inputs=pixels", "reference=precomputed"], "inputs=latents"),
        (["sd15-tiny", "--baseline-settings", "reference=adapter"], "separate reference copy"),
        (["sd15-tiny", "--resolution", "500"], "multiples of 8"),
        (["wan-tiny", "--frames", "6"], "1 + 4k"),
        (["sd15-tiny", "--batch", "0"], "--batch must be >= 1"),
        (["no-such-model"], "no step recipe"),
        (["sd15-tiny", "--out", str(BENCHMARKS / "results" / "step-cpu.json")], "never committed"),
    ],
)
def test_a_bad_request_ends_in_one_clear_error(args, words, capsys):
    assert main(["bench", "step", *args, "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vipo: error:") and words in err and "Traceback" not in err


def test_device_peaks_are_looked_up_by_name():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("Some Future Accelerator") is None
    assert flops.achieved(3.0, 10**12, 989.0) == pytest.approx((24.0, 24.0 / 989.0))
    assert flops.achieved(None, 10**12, 989.0) == (None, None)


def test_the_counted_sd15_forward_matches_the_issue_figure_at_512px():
    # The issue counts ~0.8 TFLOP a sample for SD1.5 at 512px from the config; the meta-device count
    # must include attention, which FlopCounterMode cannot see in CPU SDPA kernels.
    model_cfg = bench_step.Workload(bench_step.resolve_target("sd15"), torch.device("cpu"), 1, (3, 512, 512),
                                    1, 0, 1).model_cfg  # fmt: skip
    forward = flops.forward_flops_per_sample(model_cfg, (4, 64, 64), {"encoder_hidden_states": (1, 77, 768)})
    assert forward == pytest.approx(0.80e12, rel=0.03)


def test_a_train_recipe_gives_its_model_shapes_and_settings():
    sd15 = bench_step.resolve_target("vipo-sd15-poly")
    assert (sd15.family, sd15.config, sd15.resolution, sd15.frames, sd15.beta) == (
        "sd15",
        "sd15",
        "512",
        None,
        500.0,
    )
    settings = bench_step.apply_settings(bench_step.StepSettings(), sd15.settings, "recipe")
    assert (
        settings.gradient_checkpointing
        and settings.precision == "bf16_autocast"
        and settings.reference == "copy"
    )
    wan = bench_step.resolve_target("vipo-wan-poly")
    assert (wan.config, wan.resolution, wan.frames) == ("wan2.1-t2v-1.3b", "1280x720", 81)
    assert bench_step.parse_resolution(wan.resolution) == bench_step.parse_resolution("720p") == (1280, 720)
    tiny = bench_step.resolve_target("tiny-sd15-poly")
    assert (tiny.config, tiny.resolution) == ("sd15-tiny", "16")
