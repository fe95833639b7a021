"""What `vipo bench step` is asked to run, resolved without running it: targets (step recipes,
model configs, train recipes) into the RunConfig of vipo's run and the baseline's settings, the
FLOP count, and the one clear error of each bad request."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vipo.benchmarks import bench_step, flops
from vipo.benchmarks.step_baseline import baseline_settings
from vipo.engine.cli import main

BENCHMARKS = Path(bench_step.__file__).resolve().parent


@pytest.mark.parametrize(
    "args, words",
    [
        (["sd15-tiny", "train.compiel=blocks"], "unknown key 'train.compiel'"),
        (["sd15-tiny", "reference.mode=adapter"], "needs a LoRA policy"),
        (["sd15-tiny", "--inputs", "pixels", "reference.mode=precomputed"], "use --inputs latents"),
        (["sd15-tiny", "train.grad_accum_steps=4"], "one micro-batch and one update"),
        (["tiny-sd15-poly", "loss.objective=sft"], "compares preference steps"),
        (
            ["sd15-tiny", "--baseline-settings", "reference=adapter"],
            "baseline.reference must be one of 'copy'",
        ),
        (["sd15-tiny", "--baseline-settings", "loss=eager"], "unknown key 'baseline.loss'"),
        (["sd15-tiny", "--resolution", "500"], "multiples of 8"),
        (["wan-tiny", "--frames", "6"], "1 + 4k"),
        (["sd15-tiny", "--batch", "0"], "--batch must be >= 1"),
        (["no-such-model"], "no step recipe"),
        (["train.compile=blocks"], "name a target first"),
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
    model_cfg = SimpleNamespace(family="sd15", config="sd15")
    forward = flops.forward_flops_per_sample(model_cfg, (4, 64, 64), {"encoder_hidden_states": (1, 77, 768)})
    assert forward == pytest.approx(0.80e12, rel=0.03)


def _config(name, device="cpu", overrides=(), inputs="latents"):
    target = bench_step.resolve_target(name)
    width, height = bench_step.parse_resolution(target.resolution or "16")
    shape = (3, target.frames, height, width) if target.frames else (3, height, width)
    return target, bench_step.vipo_config(
        target, torch.device(device), inputs, target.batch or 1, shape, list(overrides)
    )


def test_a_train_recipe_gives_its_model_shapes_and_settings():
    sd15, cfg = _config("vipo-sd15-poly")
    assert (sd15.family, sd15.config, sd15.resolution, sd15.frames) == ("sd15", "sd15", "512", None)
    # the recipe's own settings; what one benchmark step on one device needs on top
    assert cfg.model.gradient_checkpointing and cfg.train.mixed_precision == "bf16"
    assert (cfg.reference.mode, cfg.loss.beta, cfg.optim.lr) == ("copy", 500.0, 1e-9)
    assert (cfg.model.path, cfg.model.init_from, cfg.model.config) == (None, None, "sd15")
    assert (cfg.parallel.strategy, cfg.train.grad_accum_steps, cfg.train.batch_pairs) == ("none", 1, 1)
    wan = bench_step.resolve_target("vipo-wan-poly")
    assert (wan.config, wan.resolution, wan.frames) == ("wan2.1-t2v-1.3b", "1280x720", 81)
    assert bench_step.parse_resolution(wan.resolution) == bench_step.parse_resolution("720p") == (1280, 720)
    tiny = bench_step.resolve_target("tiny-sd15-poly")
    assert (tiny.config, tiny.resolution) == ("sd15-tiny", "16")


def test_step_recipe_settings_are_recipe_overrides_and_cpu_drops_compile_unless_asked():
    _, flux = _config("flux-1024", device="cuda")
    assert (flux.model.param_dtype, flux.model.lora_rank, flux.reference.mode) == ("bfloat16", 64, "adapter")
    assert flux.train.compile == "blocks" and flux.model.gradient_checkpointing
    assert flux.train.mixed_precision == "bf16" and flux.train.device == "cuda"
    assert flux.data.resolution == 1024 and flux.model.config == "flux1-dev"
    _, wan = _config("wan-720p", device="cuda")
    assert (wan.data.buckets, wan.data.num_frames) == ([(1280, 720)], 81)
    _, sd15 = _config("sd15-512")
    assert sd15.train.compile == "off" and sd15.train.mixed_precision == "no"
    _, asked = _config("sd15-512", overrides=["train.compile=blocks"])
    assert asked.train.compile == "blocks"
    _, pixels = _config("sd15-512", inputs="pixels")
    assert pixels.data.cache is None  # encoders online, generator noise


def test_the_baseline_settings_go_through_the_schema_loader():
    settings, why = baseline_settings("sdxl", 8, torch.device("cuda"), ["gradient_checkpointing=true"])
    assert (settings.precision, settings.lora_rank, settings.gradient_checkpointing) == (
        "fp16_autocast",
        8,
        True,
    )
    assert "fp16" in why
    settings, _ = baseline_settings("flux", 0, torch.device("cuda"), [])
    assert settings.precision == "bf16_autocast" and settings.reference == "copy"
