"""THE BASELINE, not vipo: a preference step written like the DPO branch of the official
Diffusion-DPO `train.py` (SalesforceAIResearch/DiffusionDPO), family-generic through vipo's
adapters, so that `vipo bench step` can say how much faster and leaner the engine's step is.

    encoders every step on pixels (VAE posterior sample, text encoders)
    the policy forward first, then a separate reference copy under no_grad, same x_t
    the official loss lines (eager), four .item() logs a step
    fp16 autocast with a GradScaler for SD1.5 / SDXL (the official launchers: accelerate
    --mixed_precision fp16); bf16 autocast for the DiTs, which have no official script and
    overflow in fp16; frozen parts (encoders, a LoRA base, the reference) in that dtype
    torch's default AdamW, no compile, no checkpointing (BaselineSettings can turn them on where
    a step cannot fit otherwise; the result file records it)

The model is built with the engine's `models.build_adapter` (the same seed, so the same weights
as vipo's run); nothing else of the engine's step is used.
"""

import copy
import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from vipo.benchmarks.step_workload import HostBatch, Workload
from vipo.engine.models import build_adapter, compile_network
from vipo.engine.objectives import resolve_beta
from vipo.engine.schema import ConfigError, load, option

LOW_DTYPES = {"bf16_autocast": torch.bfloat16, "fp16_autocast": torch.float16}
ENCODER_PREFIXES = ("text_encoder", "vae")
LEARNING_RATE = 1e-6  # any finite value: the bench measures speed, not training


@dataclass
class BaselineSettings:
    """The official-style step's settings (`--baseline-settings KEY=VALUE`)."""

    precision: Literal["fp32", "bf16_autocast", "fp16_autocast"] = option(
        "fp32",
        "fp32; bf16_autocast; fp16_autocast (with a GradScaler); frozen parts in the autocast dtype "
        "(default: fp16_autocast for sd15/sdxl, bf16_autocast otherwise, fp32 on CPU)",
    )
    reference: Literal["copy"] = option(
        "copy", "always copy: the official step keeps a separate reference model"
    )
    lora_rank: int = option(
        0, "LoRA rank of the policy (default: vipo's model.lora_rank, the same trainable policy)"
    )
    inputs: Literal["pixels", "latents"] = option(
        "pixels", "pixels: encoders every step (official); latents: cached"
    )
    compile: Literal["off", "blocks", "full"] = option(
        "off", "torch.compile of policy and reference (official: off)"
    )
    gradient_checkpointing: bool = option(False, "recompute block activations in backward (official: off)")
    attention: Literal["sdpa", "sdpa_flash", "sdpa_cudnn", "flash_attn"] = option(
        "sdpa", "as model.attention"
    )


def baseline_settings(
    family: str, lora_rank: int, device: torch.device, overrides: list[str]
) -> tuple[BaselineSettings, str]:
    """The baseline's settings and why its precision is what it is."""
    if device.type == "cpu":
        precision, why = "fp32", "CPU: fp32 everywhere"
    elif family in ("sd15", "sdxl"):
        precision, why = "fp16_autocast", "the official launchers: accelerate --mixed_precision fp16"
    else:
        precision, why = (
            "bf16_autocast",
            "no official script for this family; its diffusers trainers use bf16 (fp16 overflows)",
        )
    tree = {"precision": precision, "lora_rank": lora_rank}
    settings = load(BaselineSettings, tree, overrides, where="baseline defaults", prefix="baseline.")
    if settings.lora_rank < 0:
        raise ConfigError(f"--baseline-settings: lora_rank must be >= 0, got {settings.lora_rank}")
    return settings, why


class BaselineStep:
    """The official-style step for one settings: a policy, its separate reference copy, AdamW and
    a host batch; `step(clock)` runs one micro-batch and one optimizer update."""

    def __init__(
        self,
        work: Workload,
        model_cfg,
        settings: BaselineSettings,
        loss_cfg,
        *,
        seed: int,
        vocabulary: list[str] | None,
    ):
        self.settings, self.device = settings, work.device
        self.low = LOW_DTYPES.get(settings.precision)
        model_cfg = dataclasses.replace(
            model_cfg,
            lora_rank=settings.lora_rank,
            gradient_checkpointing=settings.gradient_checkpointing,
            attention=settings.attention,
            param_dtype="float32",
            init_from=None,
        )
        self.adapter = adapter = build_adapter(
            model_cfg, work.device, seed=seed, trainable=True, vocabulary=vocabulary
        )
        network = adapter.network
        if self.low is not None:
            for param in network.parameters():  # a LoRA's frozen base in weight_dtype; trainable weights fp32
                if not param.requires_grad:
                    param.data = param.data.to(self.low)
            for name, module in vars(adapter).items():
                if name.startswith(ENCODER_PREFIXES) and isinstance(module, torch.nn.Module):
                    module.to(self.low)
        # The official ref_unet: a second, frozen model in weight_dtype.
        self.reference = copy.deepcopy(network).requires_grad_(False).eval()
        if self.low is not None:
            self.reference.to(self.low)
        for module in (network, self.reference):
            compile_network(module, settings.compile, work.device)
        self.generator = torch.Generator(work.device).manual_seed(0)
        self.host = HostBatch(work, adapter, settings.inputs, self.autocast())
        self.beta = resolve_beta(loss_cfg, math.prod(work.latent_shape))
        self.alpha = loss_cfg.alpha
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE)  # torch's default (for-each) AdamW
        self.scaler = (
            torch.amp.GradScaler(work.device.type) if settings.precision == "fp16_autocast" else None
        )

    def autocast(self):
        if self.low is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.low)

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

    def step(self, clock) -> torch.Tensor:
        """The DPO branch of the official train.py's loop."""
        adapter, beta, alpha = self.adapter, self.beta, self.alpha
        clock.start()
        if self.settings.inputs == "pixels":
            pixels, cond = self.host.pixels_on_device(), None
        else:
            latents, cond = self.host.latents_on_device(adapter.dtype)
        clock.mark("data")
        with self.autocast():
            with torch.no_grad():
                if self.settings.inputs == "pixels":
                    latents = adapter.encode_pixels(pixels, self.generator)  # latent_dist.sample()
                    cond = adapter.encode_prompts(self.host.prompts)
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
                ref_pred = adapter.predict(self.reference, x_t, t, cond).detach()
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
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        clock.mark("backward")
        self._update()
        clock.mark("optimizer")
        return loss.detach()
