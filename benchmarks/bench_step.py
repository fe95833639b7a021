"""Throughput of one preference training step: vipo against the official Diffusion-DPO step.

    vipo bench step sd15-512                                  # on a GPU: a recipe of STEP_RECIPES
    vipo bench step sdxl --batch 4 --settings compile=blocks gradient_checkpointing=true
    python benchmarks/bench_step.py sd15-tiny --smoke --out /tmp/step.json   # CPU: checks the harness
    python benchmarks/bench_step.py --render-readme           # README table from results/step-*.json

Both steps run in one process on one device, on the same model (random weights of the real
architecture from configs/models/), the same batch and shapes:

    vipo      the engine's pieces (adapter, reference strategy, fused Poly-DPO loss): shared x_t, the
              reference reduced to 2B errors before the policy forward, latents and text embeddings
              from the cache (or encoders online), bf16, optional compile and checkpointing, fused AdamW
    baseline  as the official train.py: encoders (VAE posterior sample, text encoders) run every step
              on pixels, policy forward first, a separate reference copy in the same dtype (fp16 for
              SD1.5/SDXL as the official launchers; bf16 for the DiTs, which overflow in fp16), the
              eager loss lines, four .item() logs a step, GradScaler (fp16), torch AdamW, no compile

A step is one micro-batch and one optimizer update. The headline pass is not synchronised between
phases (CUDA events around each step; the mean is the first start to the last end over the steps);
a separate, synchronised pass splits the step into phases. MFU: see flops.py. Peak memory: the
allocator's peak over the timed pass, weights and optimizer state included (CUDA only).

Results: benchmarks/results/step-<device>-<date>.json (runs appended), with device, versions, date,
commit, shapes and every setting. CPU runs build the family's tiny model; they check the harness,
their timings mean nothing, and they are never written into results/.
"""

import argparse
import dataclasses
import datetime
import gc
import json
import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import provenance  # noqa: I001  (benchmarks/ is the script's folder)
import torch
import torch.nn.functional as F
from flops import FLOP_METHOD, achieved, forward_flops_per_sample, model_flops_per_pair, peak_tflops  # noqa: I001

from vipo.configs import find_recipe
from vipo.engine.config import ConfigError, load_config, parse_overrides
from vipo.engine.errors import RunError
from vipo.engine.models import add_lora, build_model, load_architecture
from vipo.engine.reference import build_reference
from vipo.kernels import beta_from, poly_dpo_loss
from vipo.kernels import reference as eager_kernels

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
TABLE_START, TABLE_END = "<!-- step-results:start -->", "<!-- step-results:end -->"

FULL_CONFIGS = {
    "sd15": "sd15",
    "sdxl": "sdxl",
    "sd3": "sd3.5-medium",
    "flux": "flux1-dev",
    "wan": "wan2.1-t2v-1.3b",
}
TINY_CONFIGS = {family: f"{family}-tiny" for family in FULL_CONFIGS}
DEFAULT_RESOLUTION = {"sd15": "512", "sdxl": "1024", "sd3": "1024", "flux": "1024", "wan": "720p"}
NAMED_RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
PHASES = ("data", "encode", "reference", "policy_forward", "loss", "backward", "optimizer")
PROMPT = "a photo of a red cube on a wooden table next to a small green plant, soft light"
LEARNING_RATE = 1e-6  # any finite value: the bench measures speed, not training


# -- settings -----------------------------------------------------------------------------------


def _f(default, help_text: str, choices: tuple = ()):
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class StepSettings:
    precision: str = _f("bf16_autocast", "weights and compute: fp32; bf16_autocast (fp32 weights, bf16 "
                        "compute, as train.mixed_precision=bf16); bf16_params (bf16 weights); fp16_autocast "
                        "(with a GradScaler)", ("fp32", "bf16_autocast", "bf16_params", "fp16_autocast"))  # fmt: skip
    reference: str = _f("copy", "copy: frozen copy in the compute dtype; adapter: the LoRA policy with adapters off; "
                        "precomputed: e_ref read with the batch (needs inputs=latents)", ("copy", "adapter", "precomputed"))  # fmt: skip
    lora_rank: int = _f(0, "LoRA rank on the attention projections; 0 = full fine-tune")
    inputs: str = _f("latents", "latents: latents and text embeddings from the cache, no encoder in the step; "
                     "pixels: VAE and text encoders every step", ("latents", "pixels"))  # fmt: skip
    compile: str = _f("off", "torch.compile of the denoiser (and a copy reference): blocks (each repeated "
                      "block), full (the whole network), off", ("off", "blocks", "full"))  # fmt: skip
    gradient_checkpointing: bool = _f(False, "recompute block activations in backward")
    loss: str = _f("fused", "fused: vipo.kernels; eager: the readable PyTorch formula (the baseline always "
                   "runs the official lines)", ("fused", "eager"))  # fmt: skip
    attention: str = _f("sdpa", "model.attention", ("sdpa", "sdpa_flash", "sdpa_cudnn", "flash_attn"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def apply_settings(settings: StepSettings, overrides: list[str], where: str) -> StepSettings:
    """`settings` with KEY=VALUE overrides, each checked against the field's type and choices."""
    fields = {f.name: f for f in dataclasses.fields(StepSettings)}
    changes = {}
    for key, value in parse_overrides(overrides, run_config=False):
        if key not in fields:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(fields)})")
        choices = fields[key].metadata["choices"]
        default = fields[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: {key} must be an integer >= 0, got {value!r}")
        elif str(value) not in choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
        changes[key] = str(value) if choices else value
    return dataclasses.replace(settings, **changes)


def check_settings(settings: StepSettings, where: str) -> None:
    if settings.reference == "adapter" and settings.lora_rank < 1:
        raise ConfigError(f"{where}: reference=adapter needs a LoRA policy: set lora_rank (e.g. 64)")
    if settings.reference == "precomputed" and settings.inputs != "latents":
        raise ConfigError(
            f"{where}: reference=precomputed reads e_ref with cached latents: set inputs=latents"
        )


def baseline_settings(family: str, vipo: StepSettings, device: torch.device) -> tuple[StepSettings, str]:
    """The official-style step's settings and why its precision is what it is."""
    if device.type == "cpu":
        precision, why = "fp32", "CPU: fp32 everywhere"
    elif family in ("sd15", "sdxl"):
        precision, why = "fp16_autocast", "the official launchers: accelerate --mixed_precision fp16"
    else:
        precision, why = (
            "bf16_autocast",
            "no official script for this family; its diffusers trainers use bf16 (fp16 overflows)",
        )
    settings = StepSettings(precision=precision, reference="copy", lora_rank=vipo.lora_rank, inputs="pixels",
                            compile="off", gradient_checkpointing=False, loss="eager", attention="sdpa")  # fmt: skip
    return settings, why


# -- what is benchmarked ------------------------------------------------------------------------

# The issue's recipes, with starting settings for one GPU (tune --batch and --settings on the GPU;
# the baseline keeps its official form except where it cannot fit without checkpointing).
STEP_RECIPES = {
    "sd15-512": {"config": "sd15", "resolution": "512", "batch": 8, "settings": ["compile=blocks"]},
    "sdxl-1024": {"config": "sdxl", "resolution": "1024", "batch": 2, "settings": ["compile=blocks"]},
    "sd35m-1024": {"config": "sd3.5-medium", "resolution": "1024", "batch": 2,
                   "settings": ["compile=blocks", "gradient_checkpointing=true"]},
    # 12B parameters: a full fine-tune needs ~190 GB with AdamW; one GPU trains a LoRA on a frozen bf16
    # base, the reference is that base with the adapters off (zero extra weights).
    "flux-1024": {"config": "flux1-dev", "resolution": "1024", "batch": 1,
                  "settings": ["precision=bf16_params", "lora_rank=64", "reference=adapter", "compile=blocks",
                               "gradient_checkpointing=true"],
                  "baseline_settings": ["gradient_checkpointing=true"]},
    "wan-720p": {"config": "wan2.1-t2v-1.3b", "resolution": "720p", "frames": 81, "batch": 1,
                 "settings": ["compile=blocks", "gradient_checkpointing=true"],
                 "baseline_settings": ["gradient_checkpointing=true"]},
}  # fmt: skip


@dataclass
class Target:
    name: str  # what was asked for
    family: str
    config: str  # the architecture config built
    resolution: str | None = None
    frames: int | None = None
    batch: int | None = None
    settings: list[str] = field(default_factory=list)
    baseline_settings: list[str] = field(default_factory=list)
    beta: float = 5000.0
    alpha: float = 0.0
    beta_convention: str = "official"
    recipe: str | None = None


def resolve_target(name: str) -> Target:
    """A step recipe, a model config (name or .json path) or a train recipe (name or .yaml)."""
    if name in STEP_RECIPES:
        spec = STEP_RECIPES[name]
        family = load_architecture(spec["config"])["family"]
        return Target(name, family, spec["config"], spec["resolution"], spec.get("frames"), spec["batch"],
                      list(spec["settings"]), list(spec.get("baseline_settings", [])), recipe=name)  # fmt: skip
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
    cfg = load_config(find_recipe(name))
    family = cfg.model.family
    settings = [f"lora_rank={cfg.model.lora_rank}", f"gradient_checkpointing={cfg.model.gradient_checkpointing}",
                f"attention={cfg.model.attention}", f"reference={cfg.reference.mode}",
                f"precision={'bf16_autocast' if cfg.train.mixed_precision == 'bf16' else 'fp32'}"]  # fmt: skip
    if cfg.reference.mode == "precomputed":
        settings.append("inputs=latents")
    data = cfg.data
    if data.buckets:
        resolution = f"{data.buckets[0][0]}x{data.buckets[0][1]}"
    elif data.bucket_area:
        resolution = str(int(math.isqrt(data.bucket_area)))
    else:
        resolution = str(data.resolution)
    return Target(name, family, FULL_CONFIGS[family] if cfg.model.path else cfg.model.config, resolution,
                  data.num_frames if family == "wan" else None, None, settings, [], cfg.loss.beta, cfg.loss.alpha,
                  cfg.loss.beta_convention, recipe=str(find_recipe(name)))  # fmt: skip


def parse_resolution(text: str) -> tuple[int, int]:
    """(width, height) of `512`, `1280x720` or `720p`."""
    text = text.strip().lower()
    if text in NAMED_RESOLUTIONS:
        return NAMED_RESOLUTIONS[text]
    parts = text.split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(
            f"--resolution {text!r}: use 512, WIDTHxHEIGHT or one of {', '.join(NAMED_RESOLUTIONS)}"
        ) from None
    if len(sides) not in (1, 2) or min(sides) < 8 or any(s % 8 for s in sides):
        raise ConfigError(f"--resolution {text!r}: sides must be multiples of 8 (e.g. 512, 1280x720)")
    return (sides[0], sides[-1])


@dataclass
class Workload:
    """What both steps see: the model, device, batch, one sample's pixel shape and the step counts;
    the latent and conditioning shapes come from the first build's probe encode."""

    target: Target
    device: torch.device
    batch_pairs: int
    pixel_shape: tuple[int, ...]  # [3, H, W] or [3, F, H, W]
    steps: int
    warmup: int
    split_steps: int
    latent_shape: tuple[int, ...] | None = None  # filled by the first build
    cond_shapes: dict[str, tuple[int, ...]] | None = None

    @property
    def model_cfg(self):
        return SimpleNamespace(
            family=self.target.family, path=None, config=self.target.config, attention="sdpa"
        )


# -- one step, two ways -------------------------------------------------------------------------

LOW_DTYPES = {"bf16_autocast": torch.bfloat16, "bf16_params": torch.bfloat16, "fp16_autocast": torch.float16}
ENCODER_PREFIXES = ("text_encoder", "vae")
SDPA_BACKENDS = ("flash", "mem_efficient", "math", "cudnn")


class PhaseClock:
    """Phase boundaries inside a step. Disabled (the headline pass): free. Enabled (the split pass):
    the device is synchronised at each boundary and the wall time since the last one is added."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.enabled:
            self.sync()
            self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.enabled:
            self.sync()
            now = time.perf_counter()
            self.totals[phase] += now - self.last
            self.last = now


class StepRun:
    """A built model, reference, optimizer and host batch for one settings; `step(clock)` runs one
    micro-batch and one optimizer update."""

    def __init__(self, work: Workload, settings: StepSettings, official: bool):
        self.work, self.settings, self.official = work, settings, official
        self.device = device = work.device
        self.low = LOW_DTYPES.get(settings.precision)
        torch.manual_seed(0)
        model_cfg = work.model_cfg
        model_cfg.attention = settings.attention
        with torch.device(device):  # random init on the device itself: seconds instead of minutes for 12B
            self.adapter = adapter = build_model(model_cfg, device)
        network = adapter.network
        if settings.lora_rank:
            if self.low is not None:
                network.to(self.low)  # the frozen base in the compute dtype; the adapters train
            add_lora(network, settings.lora_rank)
            if settings.precision != "bf16_params":
                for param in network.parameters():
                    if param.requires_grad:
                        param.data = param.data.float()
        elif settings.precision == "bf16_params":
            network.to(torch.bfloat16)
        if settings.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        network.train()
        adapter.dtype = torch.bfloat16 if settings.precision == "bf16_params" else torch.float32
        for name in self._encoder_names():
            if self.low is not None:
                getattr(adapter, name).to(self.low)
        self.generator = torch.Generator(device).manual_seed(0)
        self._make_batch()
        self.reference = None
        if settings.reference == "precomputed":
            self.host_ref_err = self._host(torch.rand(2 * work.batch_pairs) * 0.1)
        else:
            self.reference = build_reference(settings.reference, adapter)
            if settings.reference == "copy" and self.low is not None:
                self.reference.network.to(self.low)  # the official ref_unet in weight_dtype; vipo's bf16 copy
        self._compile()
        elements = math.prod(work.latent_shape)
        self.beta = beta_from(work.target.beta_convention, work.target.beta, elements_per_sample=elements)
        self.params = [p for p in network.parameters() if p.requires_grad]
        fused = device.type == "cuda" and not official  # the official script: torch's default AdamW
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE, fused=fused or None)
        self.scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16_autocast" else None

    def _encoder_names(self) -> list[str]:
        return [name for name, value in vars(self.adapter).items()
                if name.startswith(ENCODER_PREFIXES) and isinstance(value, torch.nn.Module)]  # fmt: skip

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch as the loader hands it over: in (pinned) host memory."""
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def autocast(self):
        if not self.settings.precision.endswith("_autocast"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=LOW_DTYPES[self.settings.precision])

    def _make_batch(self) -> None:
        """Host pixels and prompts; for cached inputs, latents and text embeddings as a latent cache
        stores them (float16) and no encoder at all in memory."""
        work, adapter = self.work, self.adapter
        rows = 2 * work.batch_pairs
        self.prompts = [f"{PROMPT} {i}" for i in range(work.batch_pairs)]
        pixel_rows = rows if self.settings.inputs == "pixels" else 1  # a 720p clip pair is 1.8 GB of pixels
        pixels = (
            torch.rand((pixel_rows, *work.pixel_shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
        )
        with torch.no_grad(), self.autocast():  # one probe encode: the shapes of latents and conditioning
            cond = adapter.encode_prompts(self.prompts)
            probe = adapter.encode_pixels(pixels[:1].to(self.device))
        if work.latent_shape is None:
            work.latent_shape = tuple(probe.shape[1:])
            work.cond_shapes = {key: (1, *value.shape[1:]) for key, value in cond.items()}
        if self.settings.inputs == "pixels":
            self.host_pixels = self._host(pixels)
            return
        latents = torch.randn((rows, *work.latent_shape), generator=torch.Generator().manual_seed(1))
        self.host_latents = self._host(latents.half())
        self.host_cond = {
            key: self._host(value.detach().to("cpu", torch.float16)) for key, value in cond.items()
        }
        for name in self._encoder_names():
            setattr(self.adapter, name, None)
        del cond, probe
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _compile(self) -> None:
        mode = self.settings.compile
        if mode == "off":
            return
        networks = [self.adapter.network]
        if self.settings.reference == "copy":
            networks.append(self.reference.network)
        for network in networks:
            if mode == "full":
                network.compile()
            elif getattr(network, "_repeated_blocks", None):
                network.compile_repeated_blocks()
            else:  # SD3 declares its blocks for sharding only
                blocks = set(network._no_split_modules)
                for module in network.modules():
                    if type(module).__name__ in blocks:
                        module.compile()

    # -- the two steps --

    def _fetch(self):
        to = {"device": self.device, "non_blocking": True}
        if self.settings.inputs == "pixels":
            return self.host_pixels.to(**to), None
        dtype = self.adapter.dtype
        cond = {key: value.to(**to).to(dtype) for key, value in self.host_cond.items()}
        return self.host_latents.to(**to).to(dtype), cond

    def _backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _update(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, clock: PhaseClock) -> torch.Tensor:
        return self.official_step(clock) if self.official else self.vipo_step(clock)

    def vipo_step(self, clock: PhaseClock) -> torch.Tensor:
        """objectives.preference_loss with phase marks, then the trainer's update."""
        adapter, settings = self.adapter, self.settings
        clock.start()
        data, cond = self._fetch()
        ref_err = self.host_ref_err.to(self.device, non_blocking=True) if self.reference is None else None
        clock.mark("data")
        with self.autocast():
            if settings.inputs == "pixels":
                cond = adapter.encode_prompts(self.prompts)
                latents = adapter.encode_pixels(data)
            else:
                latents = data
            x_t, t, target = adapter.noisy_inputs(latents, self.generator, paired=True)
            clock.mark("encode")
            if self.reference is not None:
                ref_err = self.reference.errors(x_t, t, cond, target)  # the reference output is freed here
            clock.mark("reference")
            pred = adapter.predict(adapter.network, x_t, t, cond)
            clock.mark("policy_forward")
            loss_fn = poly_dpo_loss if settings.loss == "fused" else eager_kernels.poly_dpo_loss
            out = loss_fn(pred, target, ref_err=ref_err, beta=self.beta, alpha=self.work.target.alpha)
            clock.mark("loss")
        self._backward(out.loss)
        clock.mark("backward")
        if bool(torch.isfinite(out.loss)):  # the trainer's one host sync a step: skip non-finite updates
            self._update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        return out.loss.detach()

    def official_step(self, clock: PhaseClock) -> torch.Tensor:
        """The DPO branch of the official train.py's loop, family-generic through the adapter."""
        adapter, beta, alpha = self.adapter, self.beta, self.work.target.alpha
        clock.start()
        data, cond = self._fetch()
        clock.mark("data")
        with self.autocast():
            with torch.no_grad():
                if self.settings.inputs == "pixels":
                    latents = adapter.encode_pixels(data, self.generator)  # latent_dist.sample()
                    cond = adapter.encode_prompts(self.prompts)
                else:
                    latents = data
            x_t, t, target = adapter.noisy_inputs(latents, self.generator, paired=True)
            clock.mark("encode")
            model_pred = adapter.predict(adapter.network, x_t, t, cond)
            clock.mark("policy_forward")
            dims = list(range(1, model_pred.dim()))
            model_losses = (model_pred - target).pow(2).mean(dim=dims)
            model_losses_w, model_losses_l = model_losses.chunk(2)
            raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
            model_diff = model_losses_w - model_losses_l
            with torch.no_grad():
                ref_pred = adapter.predict(self.reference.network, x_t, t, cond).detach()
                ref_losses = (ref_pred - target).pow(2).mean(dim=dims)
                ref_losses_w, ref_losses_l = ref_losses.chunk(2)
                ref_diff = ref_losses_w - ref_losses_l
                raw_ref_loss = ref_losses.mean()
            clock.mark("reference")
            inside_term = -0.5 * beta * (model_diff - ref_diff)
            implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
            loss = -1 * F.logsigmoid(inside_term).mean()
            if alpha:  # Poly-DPO's term (Eq. 9), written the same way
                loss = loss + alpha * (1 - torch.sigmoid(inside_term)).mean()
        # The official loop logs these every micro-step (gathered, then .item()).
        for value in (loss, raw_model_loss, raw_ref_loss, implicit_acc):
            value.detach().item()
        clock.mark("loss")
        self._backward(loss)
        clock.mark("backward")
        self._update()
        clock.mark("optimizer")
        return loss.detach()


# -- timing ------------------------------------------------------------------------------------


def _quantiles(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def q(p):
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {"median": q(0.5), "q20": q(0.2), "q80": q(0.8), "min": ordered[0], "max": ordered[-1]}


def timed_pass(run: StepRun, steps: int) -> tuple[dict, torch.Tensor]:
    """Un-synchronised steps: CUDA events around each (perf_counter on CPU). `mean` is the first
    start to the last end over the steps, gaps between steps included: the throughput."""
    clock = PhaseClock(run.device, enabled=False)
    per_step, loss = [], None
    if run.device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
        ]
        for start, end in events:
            start.record()
            loss = run.step(clock)
            end.record()
        torch.cuda.synchronize(run.device)
        per_step = [start.elapsed_time(end) for start, end in events]
        total = events[0][0].elapsed_time(events[-1][1])
    else:
        began = time.perf_counter()
        for _ in range(steps):
            started = time.perf_counter()
            loss = run.step(clock)
            per_step.append((time.perf_counter() - started) * 1e3)
        total = (time.perf_counter() - began) * 1e3
    return {"mean": total / steps, **_quantiles(per_step)}, loss


def split_pass(run: StepRun, steps: int) -> tuple[dict, float]:
    """Mean ms of each phase, and the mean wall time of these synchronised steps measured from
    outside: the phases must add up to it (no work left between the marks)."""
    clock = PhaseClock(run.device, enabled=True)
    clock.sync()
    started = time.perf_counter()
    for _ in range(steps):
        run.step(clock)
    clock.sync()
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    return {phase: seconds * 1e3 / steps for phase, seconds in clock.totals.items()}, wall_ms


def measure(work: Workload, settings: StepSettings, official: bool) -> dict:
    """Build, warm up, time, split; every figure of one run. A CUDA out-of-memory is a result too."""
    device, cuda = work.device, work.device.type == "cuda"
    result = {"step": "official" if official else "vipo", "settings": settings.to_dict()}
    if official:
        result["settings"]["loss"] = "official"
    run = None
    sdpa_backends = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in SDPA_BACKENDS}
    try:
        started = time.perf_counter()
        run = StepRun(work, settings, official)
        result["setup_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(work.warmup):
            run.step(PhaseClock(device, enabled=False))
        if cuda:
            torch.cuda.synchronize(device)
        result["warmup_s"] = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step_ms, loss = timed_pass(run, work.steps)
        if cuda:
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            result["peak_memory_gib"] = result["peak_reserved_gib"] = None  # no allocator statistics on CPU
        result["step_ms"] = step_ms
        result["pairs_per_s"] = work.batch_pairs / (step_ms["mean"] / 1e3)
        result["samples_per_s"] = 2 * result["pairs_per_s"]
        result["loss"] = float(loss)
        result["loss_is_finite"] = math.isfinite(result["loss"])
        split, split_wall = split_pass(run, work.split_steps)
        result["split_ms"] = split
        result["split_total_ms"] = sum(split.values())
        result["split_step_ms"] = split_wall
        # What the boundary syncs cost against the headline step (near 1 when the GPU is the bottleneck).
        result["split_vs_headline"] = split_wall / step_ms["median"]
    except torch.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        del run
        gc.collect()
        for name, enabled in sdpa_backends.items():  # model.attention=sdpa_* switches them process-wide
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(enabled)
        if settings.compile != "off":
            torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    return result


# -- report ------------------------------------------------------------------------------------


def shape_label(report: dict) -> str:
    width, height = report["shapes"]["resolution"]
    frames = report["shapes"].get("frames")
    size = f"{width}px" if width == height else f"{width}x{height}"
    return f"{size} x{frames}f" if frames else size


def settings_label(settings: dict) -> str:
    """The settings that differ from StepSettings' defaults, compactly."""
    defaults = StepSettings().to_dict()
    parts = [settings["precision"], f"ref={settings['reference']}", settings["inputs"]]
    for key, value in settings.items():
        if key in ("precision", "reference", "inputs") or value == defaults.get(key):
            continue
        parts.append(key if value is True else f"{key}={value}")
    return ", ".join(parts)


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else format(value, pattern)


def _cell(run: dict, key: str, pattern: str) -> str:
    """A run's figure for the table; a run that ran out of memory says so."""
    if run.get("error"):
        return "OOM" if run["error"].startswith("out of memory") else "error"
    return _fmt(run.get(key), pattern)


def render_table(reports: list[dict]) -> str:
    """The README's markdown table: one row per GPU run (smoke and CPU runs are left out)."""
    rows = [
        r
        for r in reports
        if r.get("kind") == "step" and not r.get("smoke") and r.get("device_type") == "cuda"
    ]
    if not rows:
        return "No GPU results committed yet: no GPU run of `vipo bench step` has happened for this version."
    lines = [
        "| date | device | target | shape | pairs | vipo settings | vipo pairs/s | baseline pairs/s | pairs/s x "
        "| vipo MFU | baseline MFU | peak GiB vipo / baseline | memory x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["target"]["name"], r["date"])):
        vipo, base = r["runs"]["vipo"], r["runs"].get("baseline") or {}
        ratios = r.get("ratios") or {}
        cells = [
            r["date"][:10], r["device"], r["target"]["name"], shape_label(r), str(r["shapes"]["batch_pairs"]),
            settings_label(vipo["settings"]), _cell(vipo, "pairs_per_s", ".2f"), _cell(base, "pairs_per_s", ".2f"),
            _fmt(ratios.get("pairs_per_s"), ".2f"), _cell(vipo, "mfu", ".1%"), _cell(base, "mfu", ".1%"),
            f"{_cell(vipo, 'peak_memory_gib', '.1f')} / {_cell(base, 'peak_memory_gib', '.1f')}",
            _fmt(ratios.get("peak_memory"), ".2f"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect_reports(folder: Path = RESULTS) -> list[dict]:
    reports = []
    for path in sorted(folder.glob("step-*.json")):
        try:
            reports += json.loads(path.read_text(encoding="utf-8"))["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunError(f"{path}: not a step result file ({err})") from None
    return reports


def render_readme(readme: Path = README, folder: Path = RESULTS) -> Path:
    text = readme.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise RunError(f"{readme}: no {TABLE_START} ... {TABLE_END} markers to put the table between")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(
        f"{head}{TABLE_START}\n{render_table(collect_reports(folder))}\n{TABLE_END}{tail}", encoding="utf-8"
    )
    return readme


def _print_run(label: str, run: dict) -> None:
    if "error" in run:
        print(f"{label:9s} {run['error']}")
        return
    split = " | ".join(f"{phase} {ms:.1f}" for phase, ms in run["split_ms"].items() if ms >= 0.05)
    memory = _fmt(run["peak_memory_gib"], ".2f", "n/a (CPU)")
    print(
        f"{label:9s} {run['pairs_per_s']:.3f} pairs/s ({run['samples_per_s']:.3f} samples/s), step {run['step_ms']['mean']:.1f} ms "
        f"(median {run['step_ms']['median']:.1f}); split ms [{split}]; {_fmt(run['model_tflops_per_s'], '.1f')} TFLOP/s, "
        f"MFU {_fmt(run['mfu'], '.1%', 'n/a')}; peak memory {memory} GiB; {settings_label(run['settings'])}"
    )  # fmt: skip


def _list() -> int:
    print("step recipes (vipo bench step NAME):")
    for name, spec in STEP_RECIPES.items():
        shape = spec["resolution"] + (f" x{spec['frames']}f" if spec.get("frames") else "")
        print(
            f"  {name:12s} {spec['config']:16s} {shape:12s} batch {spec['batch']}  {' '.join(spec['settings'])}"
        )
    print("settings (--settings KEY=VALUE; the baseline's with --baseline-settings):")
    for f in dataclasses.fields(StepSettings):
        choices = "|".join(f.metadata["choices"]) or type(f.default).__name__
        print(f"  {f.name:24s} {choices:48s} default {f.default!r}\n      {f.metadata['help']}")
    return 0


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

    work: Workload
    vipo: StepSettings
    baseline: StepSettings | None
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
        print(f"bench step: CPU builds {target.config} instead of {requested_config} (checks the harness, "
              "not speed)", file=sys.stderr)  # fmt: skip
    tiny = Path(target.config).stem.endswith("-tiny")
    out = Path(args.out).resolve() if args.out else None
    if cpu and out is not None and out.parent == RESULTS.resolve():
        raise ConfigError(f"--out {args.out}: CPU timings are never committed; write them outside {RESULTS}")

    recipe_settings = target.settings
    if cpu and not any(s.startswith("compile=") for s in args.settings):  # minutes of CPU inductor
        recipe_settings = [s for s in recipe_settings if not s.startswith("compile=")]
    vipo = StepSettings(precision="fp32" if cpu else "bf16_autocast")
    vipo = apply_settings(apply_settings(vipo, recipe_settings, target.name), args.settings, "--settings")
    check_settings(vipo, "--settings")
    baseline, why = None, None
    if args.baseline:
        baseline, why = baseline_settings(target.family, vipo, device)
        baseline = apply_settings(baseline, target.baseline_settings, f"{target.name} baseline")
        baseline = apply_settings(baseline, args.baseline_settings, "--baseline-settings")
        if baseline.reference != "copy":
            raise ConfigError(
                "--baseline-settings: the official step keeps a separate reference copy (reference=copy)"
            )

    resolution = args.resolution or ("16" if tiny else target.resolution or DEFAULT_RESOLUTION[target.family])
    width, height = parse_resolution(resolution)
    frames = None
    if target.family == "wan":
        frames = _count(args.frames, 5 if tiny else target.frames or 81, "--frames")
        if (frames - 1) % 4:
            raise ConfigError(f"--frames {frames}: Wan's VAE encodes 1 + 4k frames (e.g. 5, 17, 81)")
    pixel_shape = (3, frames, height, width) if frames else (3, height, width)
    smoke = args.smoke or cpu
    steps = _count(args.steps, 2 if smoke else 10, "--steps")
    work = Workload(
        target, device, _count(args.batch, target.batch or 1, "--batch"), pixel_shape, steps,
        _count(args.warmup, 1 if smoke else 3, "--warmup", low=0),
        _count(args.split_steps, min(steps, 1 if smoke else 3), "--split-steps"),
    )  # fmt: skip
    return Plan(work, vipo, baseline, why, requested_config, out)


def build_report(
    plan: Plan, runs: dict[str, dict], forward: int, device_name: str, peak: float | None
) -> dict:
    work, target = plan.work, plan.work.target
    ratios = None
    if "baseline" in runs:

        def ratio(key):
            a, b = runs["vipo"].get(key), runs["baseline"].get(key)
            return a / b if a is not None and b else None

        ratios = {"pairs_per_s": ratio("pairs_per_s"), "peak_memory": ratio("peak_memory_gib")}
    rows = 2 * work.batch_pairs
    return {
        "kind": "step",
        "device": device_name,
        "device_type": work.device.type,
        "device_peak_bf16_tflops": peak,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "versions": provenance.versions("diffusers", "transformers", "peft"),
        "smoke": work.device.type == "cpu",
        "target": {"name": target.name, "recipe": target.recipe, "family": target.family, "config": target.config,
                   "requested_config": plan.requested_config},
        "shapes": {"batch_pairs": work.batch_pairs, "resolution": list(work.pixel_shape[-1:-3:-1]),
                   "frames": work.pixel_shape[1] if len(work.pixel_shape) == 4 else None,
                   "pixels": [rows, *work.pixel_shape], "latents": [rows, *work.latent_shape],
                   "cond": {key: list(shape) for key, shape in work.cond_shapes.items()}},
        "loss": {"beta": target.beta, "beta_convention": target.beta_convention, "alpha": target.alpha},
        "flops": {"method": FLOP_METHOD, "forward_per_sample": forward,
                  "forward_equivalents_per_pair": model_flops_per_pair(1), "per_pair": model_flops_per_pair(forward)},
        "timing": {"method": "cuda events" if work.device.type == "cuda" else "time.perf_counter",
                   "warmup_steps": work.warmup, "timed_steps": work.steps, "split_steps": work.split_steps,
                   "split": "separate pass, device synchronised at each phase boundary"},
        "baseline_precision_reason": plan.baseline_why,
        "runs": runs,
        "ratios": ratios,
    }  # fmt: skip


def write_report(out: Path, report: dict) -> None:
    """Append `report` to the result file (one file per device and day holds every run of it)."""
    existing = []
    if out.is_file():
        try:
            existing = json.loads(out.read_text(encoding="utf-8"))["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunError(
                f"--out {out}: exists and is not a step result file ({err}); choose another path"
            ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"kind": "step", "runs": [*existing, report]}, indent=2) + "\n", encoding="utf-8"
    )


def run(args: argparse.Namespace) -> int:
    """`vipo bench step`: measure both steps, print, write the result file."""
    if args.list:
        return _list()
    if args.render_readme:
        print(f"wrote {render_readme()}")
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
    print(f"bench step: {work.target.name} ({work.target.config}) on {device_name}, {work.batch_pairs} pairs, "
          f"pixels {work.pixel_shape}", file=sys.stderr)  # fmt: skip
    runs = {"vipo": measure(work, request.vipo, official=False)}
    if request.baseline is not None:
        runs["baseline"] = measure(work, request.baseline, official=True)
    if work.latent_shape is None:
        raise RunError(f"{work.target.name}: the model did not build ({runs['vipo'].get('error')})")
    forward = forward_flops_per_sample(work.model_cfg, work.latent_shape, work.cond_shapes)
    for result in runs.values():
        result["model_tflops_per_s"], result["mfu"] = achieved(result.get("pairs_per_s"), forward, peak)
    report = build_report(request, runs, forward, device_name, peak)
    for label, result in runs.items():
        _print_run(label, result)
    if report["ratios"]:
        ratios = report["ratios"]
        print(f"vipo / baseline: pairs/s x{_fmt(ratios['pairs_per_s'], '.2f')}, "
              f"peak memory x{_fmt(ratios['peak_memory'], '.2f', 'n/a')}")  # fmt: skip
    out = request.out
    if out is None and cuda:
        out = RESULTS / f"step-{device_name.replace(' ', '_')}-{report['date'][:10]}.json"
    if out is None:
        print("bench step: CPU run, nothing written (pass --out to keep its JSON)", file=sys.stderr)
        return 0
    write_report(out, report)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    from vipo.engine.bench_cli import add_step_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    from vipo.engine.cli import run_command

    args = parser.parse_args(argv)
    return run_command(lambda: run(args), prog="bench_step")


if __name__ == "__main__":
    sys.exit(main())
