"""The adapter protocol every model family implements, and what they share.

An adapter owns the frozen parts of a family (text encoders, VAE, noise schedule) and the
trainable denoiser (`network`). The trainer only ever calls:

    cond            = adapter.encode_prompts(prompts)          # B prompts
    latents         = adapter.encode_pixels(pixels)            # [2B, 3, H, W] in [-1, 1]
    x_t, t, target  = adapter.noisy_inputs(latents, generator) # eps and t shared by each pair
    pred            = adapter.predict(network, x_t, t, cond)   # cond of B, repeated for 2B

so the same step serves every family, policy and reference alike.
"""

import contextvars
import json
import logging
import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vipo.configs import ROOT as CONFIGS_ROOT

from ..errors import ConfigError, RunError
from .tokenizer import WordTokenizer


def from_folder(cls, root, subfolder: str, **kwargs):
    """`cls.from_pretrained(root, subfolder=...)`, with a part that will not load (a corrupt JSON,
    a missing or truncated file) as one line naming its folder instead of a library traceback."""
    try:
        return cls.from_pretrained(root, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise RunError(
            f"{Path(root) / subfolder}: {cls.__name__} could not load it ({type(err).__name__}: {reason}); "
            "model.path must be a complete diffusers folder"
        ) from err


_DENOISER_ON_META = contextvars.ContextVar("vipo_denoiser_on_meta", default=False)


@contextmanager
def denoiser_on_meta(enabled: bool = True):
    """Inside it, `denoiser_from_folder` reads only the denoiser's config and makes it on the meta
    device: no weights read, no memory (a rank that receives its FSDP shard from rank 0,
    parallel.materialise). The frozen encoders and VAE load as usual."""
    token = _DENOISER_ON_META.set(enabled)
    try:
        yield
    finally:
        _DENOISER_ON_META.reset(token)


def denoiser_from_folder(cls, root, subfolder: str):
    """A family's trainable network from its diffusers folder (see `denoiser_on_meta`)."""
    if not _DENOISER_ON_META.get():
        return from_folder(cls, root, subfolder)
    try:
        config = cls.load_config(root, subfolder=subfolder)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise RunError(f"{Path(root) / subfolder}: {cls.__name__} has no readable config ({reason})") from err
    with torch.device("meta"):
        return cls.from_config(config)


def on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def place(network: nn.Module, device) -> nn.Module:
    """`network` on `device`; a network on the meta device stays there (it has nothing to move)."""
    return network if on_meta(network) else network.to(device)


def load_architecture(name_or_path: str) -> dict[str, Any]:
    """An architecture config from configs/models/ by name (`sd15-tiny`) or a JSON path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = CONFIGS_ROOT / "models" / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS_ROOT / "models").glob("*.json"))
        raise ConfigError(
            f"model.config: no architecture config {name_or_path!r} (known: {', '.join(known)})"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def frozen_mode(network: nn.Module) -> bool:
    """The train/eval mode a frozen copy of `network` (the reference) runs in: the policy's own
    (train) where no module's output depends on the mode (no dropout with p > 0, no batch norm),
    eval otherwise. In train mode PyTorch can take other code paths (a dropout of p = 0 still
    returns a new tensor), and with them other memory layouts and other bf16 GEMM kernels: the
    reference then differs from the policy it was copied from, and z at step 0 is not 0 (SDXL with
    bf16 autocast started at loss 0.596 with accuracy 1.0)."""
    for module in network.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return False
    return True


def repeat_pairs(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conditioning of B prompts -> 2B rows: winner and loser of a pair share their prompt."""
    return {key: torch.cat([value, value]) for key, value in cond.items()}


class DiffusionAdapter(ABC):
    """A model family: frozen encoders + schedule around a trainable `network`."""

    family: str
    prediction_type: str  # "epsilon" or "flow"
    denoiser: str = "transformer"  # its subfolder in a diffusers pipeline folder
    context = (
        None  # engine/context_parallel.py's ContextParallel while a sample's tokens are split over ranks
    )

    def __init__(self, network: nn.Module, device: torch.device):
        self.network = network
        self.device = device

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors for B prompts (no grad)."""

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of [N, 3, H, W] pixels in [-1, 1] (no grad): a posterior sample with a
        generator, its mean without; the pixels themselves for a model without a VAE (`self.vae`
        None, the tiny pixel-space variants). Families set `vae` and `dtype`."""
        pixels = pixels.to(self.device)
        if self.vae is None:
            return pixels.to(self.dtype)
        return vae_latents(self.vae, pixels, generator).to(self.dtype)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The VAE posterior (mean, log-variance) in the latent space `encode_pixels` puts its
        latents in (SD/SDXL (z - shift) * scale, SD3/FLUX with their shift): what the latent
        cache stores. Pixel-space models: the pixels and no variance."""
        if self.vae is None:
            return self.encode_pixels(pixels), None
        config = self.vae.config
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        shift = getattr(config, "shift_factor", None) or 0.0
        mean = (posterior.mean - shift) * config.scaling_factor
        logvar = posterior.logvar.float() + 2 * math.log(abs(config.scaling_factor))
        return mean.to(self.dtype), logvar.to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of latents: the inverse of `encode_pixels`."""
        if self.vae is None:
            return latents.float()
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return self.vae.decode(
            (latents.float() / config.scaling_factor + shift).to(self.vae.dtype)
        ).sample.float()

    @abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n training timesteps (ints for DDPM schedules, floats in [0, 1] for flow matching)."""

    @abstractmethod
    def add_noise(
        self, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t and the regression target (eps, or the velocity eps - x0 for flow matching)."""

    def noisy_inputs(
        self, latents: torch.Tensor, generator: torch.Generator, paired: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t, t and target for latents. `paired` ([2B, ...] winners then losers): noise and t
        are drawn once per pair and shared by its winner and loser; otherwise once per sample."""
        n = latents.shape[0] // 2 if paired else latents.shape[0]
        eps = torch.randn((n, *latents.shape[1:]), generator=generator, device=generator.device)
        t = self.sample_timesteps(n, generator)
        if paired:
            eps, t = torch.cat([eps, eps]), torch.cat([t, t])
        eps, t = eps.to(latents.device, latents.dtype), t.to(latents.device)
        x_t, target = self.add_noise(latents, eps, t)
        return x_t, t, target

    @abstractmethod
    def predict(
        self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The network's prediction for x_t's rows. `cond` holds B rows: for 2B rows (pairs) it is
        repeated so winner and loser share their prompt; for B rows it is used as is."""

    def drop_encoders(self) -> None:
        """Free the frozen encoders (text encoders, VAE): a run from the latent cache never calls
        them, and for FLUX or Wan they are tens of GB. A call after this says so instead of failing
        obscurely (or, for encode_pixels, silently treating pixels as latents)."""
        for name, value in list(vars(self).items()):
            if name.startswith(("text_encoder", "vae")) and isinstance(value, nn.Module):
                setattr(self, name, _FreedEncoder(name))

    def export(self, out_dir: Path) -> None:
        """Save the denoiser in diffusers layout (`out_dir/unet` or `out_dir/transformer`)."""
        self.network.save_pretrained(Path(out_dir) / self.denoiser, safe_serialization=True)


class _FreedEncoder:
    """What a freed encoder leaves behind: any use of it is one clear error."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute):
        raise RunError(
            f"the adapter's {self._name} was freed: this run trains from the latent cache (data.cache)"
        )

    def __call__(self, *args, **kwargs):
        self.__getattr__("__call__")


class FlowMatchingAdapter(DiffusionAdapter):
    """The rectified-flow schedule shared by the transformer families."""

    prediction_type = "flow"

    def __init__(self, network, device, *, timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0):
        super().__init__(network, device)
        if timestep_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep_sampling must be logit_normal or uniform, got {timestep_sampling!r}")
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std

    def sample_timesteps(self, n, generator):
        if self.timestep_sampling == "uniform":
            return torch.rand(n, generator=generator, device=generator.device)
        # Logit-normal: more steps in the middle of the path, where the velocity is hardest.
        z = torch.randn(n, generator=generator, device=generator.device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def add_noise(self, latents, eps, t):
        t = t.float().view(-1, *([1] * (latents.dim() - 1)))
        x0, eps = latents.float(), eps.float()
        x_t = (1 - t) * x0 + t * eps
        return x_t.to(latents.dtype), (eps - x0).to(latents.dtype)


def token_ids(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """[B, L] ids: a WordTokenizer pads to its own length; a loaded one to `max_length`, or
    to its model_max_length (77 for CLIP)."""
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer(prompts)
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def rows_for(cond: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """`cond` (B rows) for a prediction over `rows` rows: 2B pairs share their prompt; B is used as is."""
    batch = next(iter(cond.values())).shape[0]
    if rows == batch:
        return cond
    if rows == 2 * batch:
        return repeat_pairs(cond)
    raise ValueError(f"conditioning of {batch} rows does not fit {rows} inputs (expected B or 2B rows)")


def clip_penultimate(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP's penultimate hidden state (SDXL and SD3 condition on it, not the last layer) and,
    for a CLIPTextModelWithProjection, its pooled projection `text_embeds`."""
    ids = token_ids(tokenizer, prompts).to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], getattr(out, "text_embeds", None)


def require_subfolders(root: Path, parts: tuple[str, ...], family: str) -> None:
    """Refuse a model.path that lacks any of a family's diffusers subfolders, naming them all."""
    missing = ", ".join(f"{part}/" for part in parts if not (root / part).is_dir())
    if missing:
        raise RunError(f"model.path {root}: not a diffusers {family} folder, missing {missing}")


def vae_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample of the VAE posterior (its mean without a generator), shifted and scaled as the
    family's pipeline expects: SD3 and FLUX latents are not centred (shift_factor), SD's are."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    latents = posterior.sample(generator) if generator is not None else posterior.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


FLASH_ATTN_FAMILIES = ("flux", "wan")  # their diffusers attention goes through the backend dispatcher


def configure_attention(adapter: DiffusionAdapter, attention: str) -> None:
    """Select the attention kernels of `adapter.network` (model.attention).

    The SDPA choices are PyTorch's process-wide backend switches, set only for a CUDA model:
    restricting to one backend makes an unsupported shape or dtype fail loudly instead of falling
    back to a slower kernel. flash_attn routes the DiT families' attention through diffusers'
    dispatcher to the flash-attn package; the UNets and SD3 call SDPA directly, so it is refused there.
    """
    if attention == "sdpa":
        return
    if attention in ("sdpa_flash", "sdpa_cudnn"):
        if adapter.device.type != "cuda":
            # CPU SDPA runs the math kernel, which these switches would turn off (it then fails).
            logging.getLogger(__name__).warning(
                "model.attention=%s is for CUDA; %s keeps SDPA's default", attention, adapter.device
            )
            return
        torch.backends.cuda.enable_flash_sdp(attention == "sdpa_flash")
        torch.backends.cuda.enable_cudnn_sdp(attention == "sdpa_cudnn")
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        return
    if attention != "flash_attn":
        raise ConfigError(f"model.attention: unknown value {attention!r}")
    if adapter.family not in FLASH_ATTN_FAMILIES:
        raise ConfigError(
            f"model.attention=flash_attn works for {', '.join(FLASH_ATTN_FAMILIES)}; {adapter.family} calls "
            "SDPA directly: use sdpa or sdpa_flash"
        )
    try:
        adapter.network.set_attention_backend("flash")
    except (RuntimeError, ImportError) as err:
        raise RunError(
            f"model.attention=flash_attn: {err} (pip install 'vipo[gpu]' on a CUDA machine)"
        ) from None
