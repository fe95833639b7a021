"""Model FLOPs of a preference step, the device's peak, and MFU.

MFU follows the issue's count (nanoGPT's way: model FLOPs, not what the hardware ran):

    model FLOPs per pair = 8 x F       F: one denoiser forward on one sample
                                       policy forward + backward (1 + 2) on winner and loser: 6 F
                                       reference forward on winner and loser:                 2 F
    MFU = pairs/s x 8 F / peak dense bf16 FLOP/s of the device

F is counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one forward of the
denoiser built on the meta device (shapes only, no memory, no compute), at the step's latent and
conditioning shapes. Recomputation under gradient checkpointing, the VAE and the text encoders
(pixel inputs), the loss and the optimizer are not model FLOPs and are not counted; a LoRA
policy is counted like a full one (its frozen base still runs 6 F per pair).
Counted at the issue's shapes: SD1.5 512px 0.80 TFLOP, SDXL 1024px 6.76, SD3.5-M 1024px 11.25,
FLUX.1-dev 1024px 74.4, Wan2.1-1.3B 81x720p 1250.
"""

from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

FORWARD_EQUIVALENTS_PER_PAIR = 8
FLOP_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode over one denoiser forward built on the meta device; "
    "model FLOPs per pair = 8 x forward per sample (policy fwd+bwd 6, reference fwd 2)"
)

# Dense bf16 tensor-core peak in TFLOP/s (datasheets, without sparsity), by a name fragment of
# torch.cuda.get_device_name; the first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name; None for a CPU or an unknown GPU (MFU is then null)."""
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peak
    return None


def forward_flops_per_sample(model_cfg, latent_shape, cond_shapes: dict[str, tuple[int, ...]]) -> int:
    """FLOPs of one denoiser forward on one sample, counted on a meta-device build.

    `latent_shape` is one sample's latent ([C, h, w] or [C, f, h, w]); `cond_shapes` the shapes of
    one prompt's conditioning tensors (leading dim 1). Two rows (a pair) go through the adapter's
    own `predict`, so packing, ids and added conditions are those of a real step.
    """
    from vipo.engine.models import build_model

    meta = torch.device("meta")
    with meta:
        adapter = build_model(
            SimpleNamespace(family=model_cfg.family, path=None, config=model_cfg.config), meta
        )
    x_t = torch.empty((2, *latent_shape), device=meta)
    cond = {key: torch.empty(shape, device=meta) for key, shape in cond_shapes.items()}
    t_dtype = torch.long if adapter.prediction_type == "epsilon" else torch.float32
    t = torch.zeros(2, device=meta, dtype=t_dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        adapter.predict(adapter.network, x_t, t, cond)
    return counter.get_total_flops() // 2


def model_flops_per_pair(forward_per_sample: int) -> int:
    return FORWARD_EQUIVALENTS_PER_PAIR * forward_per_sample


def achieved(
    pairs_per_s: float | None, forward_per_sample: int, peak: float | None
) -> tuple[float | None, float | None]:
    """(model TFLOP/s, MFU) of a run; MFU is None where the device has no known peak."""
    if pairs_per_s is None:
        return None, None
    tflops = pairs_per_s * model_flops_per_pair(forward_per_sample) / 1e12
    return tflops, (tflops / peak if peak else None)
