"""Run configuration: typed dataclasses, loaded from YAML, overridden with dotted keys.

    cfg = load_config("configs/train/demo.yaml", ["optim.lr=1e-8", "loss.alpha=8"])

Every field carries its doc in `metadata["help"]`. A key the dataclasses do not have, a value
of the wrong type or out of range, raises ConfigError naming the key, where it came from and
what is allowed. YAML is read with a `yaml.SafeLoader` that also refuses a key given twice;
nothing in a config is executed.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vipo.configs import ROOT as CONFIGS_ROOT
from vipo.configs import builtin_recipes

from .families import check_architecture, family
from .schema import ConfigError, field_types, load, option, read_yaml, to_dict
from .schema import describe as schema_describe

__all__ = ["ConfigError", "RunConfig", "describe", "load_config", "load_tree", "read_recipe", "to_dict"]


@dataclass
class ModelConfig:
    family: Literal["sd15", "sdxl", "sd3", "flux", "wan"] = option(
        "sd15", "model family: sd15, sdxl (UNet, eps-prediction); sd3, flux, wan (flow matching)"
    )
    path: str | None = option(
        None, "local diffusers-layout folder with the real weights; None builds from `config`"
    )
    config: str = option(
        "sd15-tiny", "architecture config in configs/models/ (or a .json path), random weights"
    )
    init_from: str | None = option(
        None,
        "checkpoint folder (…/checkpoints/step-N) whose weights start the policy and the reference, "
        "e.g. the SFT stage's last checkpoint (the paper's stage 2)",
    )
    lora_rank: int = option(0, "LoRA rank on the denoiser's attention projections; 0 = full fine-tune")
    gradient_checkpointing: bool = option(False, "recompute block activations in backward to save memory")
    param_dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        "dtype of the denoiser's weights (and of the latents it is given): bfloat16 halves weight memory and "
        "trains bf16 weights directly (pure bf16); float32 with train.mixed_precision=bf16 autocasts instead",
    )
    attention: Literal["sdpa", "sdpa_flash", "sdpa_cudnn", "flash_attn"] = option(
        "sdpa",
        "attention kernels: sdpa (PyTorch picks), sdpa_flash / sdpa_cudnn (only that SDPA backend, an error "
        "where it cannot run), flash_attn (the flash-attn package, flux and wan; pip install 'vipo[gpu]')",
    )


@dataclass
class DataConfig:
    source: Literal["procedural", "pickapic", "manifest", "shards", "video"] = option(
        "procedural",
        "pair source: procedural (shapes made on the fly), pickapic (Pick-a-Pic parquet shards), manifest "
        "(JSONL of image pairs), shards (tar shards of image pairs), video (JSONL of video pairs)",
    )
    path: str | None = option(
        None,
        "the data: parquet file/folder/glob, manifest .jsonl, tar shard folder/glob (all but procedural)",
    )
    validation_path: str | None = option(
        None,
        "held-out pairs for train.validate_every_steps, in data.source's format (procedural data: clean "
        "pairs of another seed when unset)",
    )
    num_pairs: int = option(512, "pairs in the procedural data set")
    resolution: int = option(16, "image side in pixels (square crops); video: frame height and width")
    buckets: list[tuple[int, int]] = option(
        [],
        "aspect buckets as [[width, height], ...] (e.g. [[1280, 720], [960, 960]]); batches use one bucket",
    )
    bucket_area: int = option(0, "make buckets at this pixel area (e.g. 1048576 for 1024px); 0 = no buckets")
    bucket_step: int = option(64, "bucket sides are multiples of this")
    random_crop: bool = option(False, "random instead of centre crops (the same box for winner and loser)")
    hflip_prob: float = option(0.0, "horizontal flip probability, drawn once per pair")
    keep_ties: bool = option(
        False, "pickapic: keep tied pairs (SFT only: ties never reach a preference loss)"
    )
    check_files: bool = option(
        False, "manifest: drop pairs with missing files up front (counted) instead of at read"
    )
    allow_outside_root: bool = option(
        False,
        "manifest / video: let entries point outside the manifest's folder (absolute paths, '..', symlinks "
        "that lead out); refused by default, naming the path",
    )
    num_frames: int = option(17, "video: frames per clip (1 + 4k for Wan)")
    frame_stride: int = option(1, "video: take every n-th frame (ignored when fps is set)")
    fps: float = option(0.0, "video: resample clips to this frame rate by timestamps; 0 = use frame_stride")
    frame_start: Literal["start", "center", "random"] = option(
        "random", "video: where the frame window starts"
    )
    video_backend: Literal["auto", "dali", "pyav"] = option(
        "auto", "video decoding: auto (DALI NVDEC where a GPU has it, else PyAV), dali, pyav"
    )
    image_backend: Literal["auto", "dali", "pil"] = option(
        "auto",
        "image decoding for training and `vipo cache`: auto (DALI nvJPEG on the GPU, a micro-batch a run, "
        "where DALI and a GPU are; else PIL in the loader), dali (DALI; its CPU decoder without a GPU), pil",
    )
    regime: Literal["clean", "noisy", "shuffled"] = option(
        "clean", "procedural labels: clean, noisy (flipped labels), shuffled (losers from other prompts)"
    )
    flip_prob: float = option(0.3, "share of flipped labels in the noisy regime")
    caption_dropout: float = option(
        0.0, "probability of an empty prompt, drawn per pair (winner and loser alike)"
    )
    cache: str | None = option(None, "latent cache folder written by `vipo cache`; None encodes online")
    max_bad_fraction: float = option(
        0.01,
        "stop the run when more than this share of the pairs tried are bad files (corrupt, missing, short)",
    )
    prefetch_batches: int = option(
        2, "batches prepared ahead in a background thread while the step runs; 0 = off"
    )
    num_workers: int = option(
        0,
        "DataLoader worker processes per rank decoding whole batches (each prefetch_batches ahead); 0 = "
        "the thread above. Same batches and resume position as 0; tar shards always use the thread",
    )


@dataclass
class ReferenceConfig:
    mode: Literal["copy", "adapter", "precomputed"] = option(
        "copy",
        "copy: frozen copy of the initial denoiser; adapter: the LoRA policy with adapters off; "
        "precomputed: e_ref from `vipo score-reference`'s table (needs data.cache)",
    )
    table: str | None = option(None, "precomputed: reference-error table folder; None = DATA.CACHE/reference")
    dtype: Literal["policy", "bfloat16"] = option(
        "policy",
        "copy: the frozen copy's weights in the policy's dtype, or bfloat16 (half their memory, as the "
        "official 16-bit reference; needs train.mixed_precision=bf16, whose autocast casts them anyway)",
    )
    offload: bool = option(
        False,
        "copy under strategies none / ddp / zero2: the copy's weights in host memory (pinned on a GPU) "
        "between reference passes, copied to the device for each pass and freed before the policy "
        "forward; costs one host-to-device copy of them per micro-batch",
    )


@dataclass
class LossConfig:
    objective: Literal["sft", "dpo", "poly_dpo"] = option(
        "poly_dpo",
        "sft: diffusion loss (stage 1); dpo: Diffusion-DPO (alpha must be 0); poly_dpo: adds alpha * (1 - p)",
    )
    winners_only: bool = option(
        True, "sft: train on winners only (the paper's stage 1); false uses both images"
    )
    beta: float = option(
        5000.0, "KL strength, official convention: z = -0.5 * beta * (model_diff - ref_diff)"
    )
    alpha: float = option(
        0.0, "Poly-DPO coefficient: > 0 for noisy labels, < 0 for over-simple pairs, 0 = DPO"
    )
    beta_convention: Literal["official", "diffusers-sd15", "diffusers-sdxl", "sum"] = option(
        "official", "convention `beta` is written in; converted with vipo.kernels.beta_from"
    )
    loss_type: Literal["sigmoid", "hinge", "ipo"] = option(
        "sigmoid",
        "pair loss of dpo / poly_dpo: sigmoid (Diffusion-DPO; with alpha, Poly-DPO), or diffusers' "
        "hinge relu(1 - z) and ipo (h - 1/beta)^2 (alpha 0)",
    )


Schedule = Literal[
    "warmup_constant",
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
]
# Schedules that decay to their end over train.max_steps.
DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")
POLYNOMIAL_END_LR = 1e-7  # diffusers' get_scheduler passes no lr_end: the function's default


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "base learning rate per pair; the step LR is lr * pairs per step when scale_lr")
    scale_lr: bool = option(True, "multiply lr by the pairs per optimizer step (the paper's convention)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    weight_decay: float = option(0.0, "AdamW weight decay")
    eps: float = option(1e-8, "AdamW epsilon (diffusers' --adam_epsilon); > 0")
    optimizer: Literal["adamw", "adamw8bit"] = option(
        "adamw",
        "adamw: torch.optim.AdamW (fused on a GPU); adamw8bit: bitsandbytes' 8-bit AdamW (pip "
        "install 'vipo[bnb]'; parallel.strategy none or ddp)",
    )
    schedule: Schedule = option(
        "warmup_constant",
        "LR schedule over train.max_steps optimizer steps: warmup_constant (update k at lr * min(1, "
        "k / warmup_steps)); diffusers' get_scheduler schedules constant, constant_with_warmup, linear, "
        "cosine, cosine_with_restarts, polynomial (their warm-up starts at LR 0)",
    )
    warmup_steps: int = option(0, "optimizer steps of linear warm-up (every schedule but constant)")
    num_cycles: int = option(1, "cosine_with_restarts: cosine cycles, each ending in a hard restart")
    power: float = option(1.0, "polynomial: the decay's power (to diffusers' end LR, 1e-7)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables clipping")


@dataclass
class TrainConfig:
    batch_pairs: int = option(
        8,
        "preference pairs per micro-batch over ALL processes (global); each of N processes takes "
        "batch_pairs / N, so a recipe means the same run on 1 or 64 GPUs; the LR scales with "
        "the global batch_pairs * grad_accum_steps",
    )
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(200, "optimizer steps")
    ema_decay: float = option(
        0.0,
        "EMA of the trained weights, e.g. 0.9999 (0: off): float32, saved in each checkpoint "
        "(ema.safetensors), written by `vipo export --ema`; every strategy (sharded like its master weights)",
    )
    seed: int = option(0, "seed for weights, data order, noise and timesteps")
    log_every_steps: int = option(20, "steps between metric logs")
    output_dir: str = option("runs/demo", "where metrics and checkpoints go")
    checkpoint_every_steps: int = option(
        0, "steps between checkpoints; 0 = only at the end (and on SIGTERM / SIGINT)"
    )
    checkpoint_every_minutes: float = option(
        0.0, "minutes between checkpoints, measured on rank 0 and agreed by all ranks; 0 = off"
    )
    max_nonfinite_steps: int = option(
        3, "stop (with a checkpoint) after this many non-finite losses in a row"
    )
    device: str = option("auto", "auto (cuda when available), cpu, cuda (this process's GPU) or cuda:N")
    mixed_precision: Literal["no", "bf16"] = option(
        "no", "bf16: autocast forward passes to bfloat16 (fp32 weights)"
    )
    compile: Literal["off", "blocks", "full"] = option(
        "off",
        "torch.compile of the denoiser (and a copy reference): blocks (each repeated block, diffusers' "
        "compile_repeated_blocks; the blocks the model declares for sharding otherwise), full (the whole "
        "network), off. Applied after activation checkpointing and before sharding, torchtitan's order",
    )
    report_to: list[Literal["tensorboard", "wandb"]] = option(
        [], "metric sinks besides metrics.jsonl: tensorboard, wandb (pip install 'vipo[track]')"
    )
    run_name: str | None = option(None, "run name for the sinks (default: the output folder's name)")
    validate_every_steps: int = option(
        0,
        "steps between validations (0 = off): a sample grid of train.validate_prompts with fixed seeds "
        "(validation/step-N.png, TensorBoard, wandb) and the held-out implicit accuracy (val_accuracy); "
        "strategies none and ddp, on rank 0",
    )
    validate_prompts: str | None = option(
        None,
        "prompt file of the validation grid (.txt, .jsonl, .json); default: prompts of the held-out pairs",
    )
    validate_pairs: int = option(32, "held-out pairs the validation accuracy is measured on (0: no accuracy)")


@dataclass
class ContextParallelConfig:
    ulysses: int = option(
        1,
        "ranks that split each sample's tokens by all-to-all over attention heads (DeepSpeed-Ulysses); "
        "must divide the heads (Wan2.1-1.3B: 12). 1 = off",
    )
    ring: int = option(
        1,
        "ranks that split each sample's tokens by ring attention (any head count; needs "
        "model.attention=flash_attn). Group size = ulysses x ring, consecutive ranks",
    )

    @property
    def size(self) -> int:
        """The ranks of a context group: they share each pair (1 = no context parallelism)."""
        return self.ulysses * self.ring


@dataclass
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp", "zero2", "zero3"] = option(
        "none",
        "none: one process; ddp: replicas; fsdp: FSDP2 fully_shard per block; zero2 / zero3: DeepSpeed "
        "ZeRO (optimizer+grads / +params sharded). Launch N processes with torchrun or deepspeed",
    )
    reshard_after_forward: bool = option(
        True,
        "fsdp: free gathered block weights after forward (false: keep them for backward, ZeRO-2-like; "
        "not with reference.mode=adapter)",
    )
    cpu_offload: bool = option(False, "fsdp: keep sharded weights, grads and optimizer state in host memory")
    shard_size: int = option(
        0,
        "fsdp: ranks a model is sharded over; 0 = all of them. Less (e.g. 8, a node) = hybrid sharding "
        "(HSDP): shard inside each group of shard_size ranks, replicate across groups",
    )
    deepspeed_config: str | None = option(
        None, "zero2/zero3: your own DeepSpeed JSON; vipo fills batch sizes and clipping from the recipe"
    )
    noise_draw: Literal["global", "per_rank"] = option(
        "global",
        "global: every rank draws noise, t and caption dropout for the whole global micro-batch and keeps "
        "its rows (N processes reproduce 1 process); per_rank: a generator per (seed, rank), O(local) memory",
    )
    meta_init: bool = option(
        True,
        "fsdp with model.path: only rank 0 reads the denoiser's weights; the other ranks make it (and a "
        "copy reference) on the meta device and receive their shards from rank 0. false: every rank reads them",
    )
    context_parallel: ContextParallelConfig = field(default_factory=ContextParallelConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "RunConfig":
        """Checks across fields; load_config calls it once file and overrides are merged."""
        if self.loss.objective == "dpo" and self.loss.alpha != 0.0:
            raise ConfigError(
                f"loss.alpha is {self.loss.alpha} but loss.objective is 'dpo' (alpha 0); "
                "use loss.objective=poly_dpo for alpha != 0"
            )
        if self.loss.loss_type != "sigmoid" and self.loss.alpha != 0.0:
            raise ConfigError(
                f"loss.alpha is {self.loss.alpha} but loss.loss_type is {self.loss.loss_type!r}: the "
                "Poly-DPO term belongs to the sigmoid loss; set loss.alpha=0 or loss.loss_type=sigmoid"
            )
        if self.loss.objective != "sft" and self.loss.beta <= 0:
            raise ConfigError(
                f"loss.beta must be > 0 for loss.objective={self.loss.objective}, got {self.loss.beta} "
                "(0 learns nothing, < 0 trains toward the losers)"
            )
        if self.reference.mode == "adapter" and self.model.lora_rank < 1:
            raise ConfigError(
                "reference.mode is 'adapter' but model.lora_rank is 0: the adapter "
                "reference needs a LoRA policy (set model.lora_rank, or reference.mode=copy)"
            )
        if self.reference.mode == "precomputed" and not self.data.cache:
            raise ConfigError(
                "reference.mode is 'precomputed' but data.cache is not set: the reference table is scored on "
                "a latent cache (`vipo cache`, then `vipo score-reference`); set data.cache=FOLDER"
            )
        if self.reference.dtype != "policy" and self.reference.mode != "copy":
            raise ConfigError(
                f"reference.dtype={self.reference.dtype} is for reference.mode=copy, got {self.reference.mode!r} "
                "(the adapter reference is the policy's own weights; precomputed holds none)"
            )
        if self.reference.dtype == "bfloat16" and self.train.mixed_precision != "bf16":
            raise ConfigError(
                "reference.dtype=bfloat16 needs train.mixed_precision=bf16 (without autocast, the "
                f"bfloat16 weights would meet float32 inputs); got {self.train.mixed_precision!r}"
            )
        if self.reference.offload and self.reference.mode != "copy":
            raise ConfigError(
                f"reference.offload is for reference.mode=copy, got {self.reference.mode!r} "
                "(the adapter reference is the policy's own weights; precomputed holds none)"
            )
        if self.reference.table and self.reference.mode != "precomputed":
            raise ConfigError(
                f"reference.table is for reference.mode=precomputed, got {self.reference.mode!r}"
            )
        data = self.data
        if data.source != "procedural" and not data.path:
            raise ConfigError(
                f"data.source is {data.source!r}: set data.path to the data (file, folder or glob)"
            )
        if data.source == "procedural" and data.path:
            raise ConfigError(
                f"data.path is {data.path!r} but data.source is 'procedural', which makes its pairs and reads "
                "no files: set data.source (manifest, pickapic, shards, video), or drop data.path"
            )
        if data.keep_ties and self.loss.objective != "sft":
            raise ConfigError(
                "data.keep_ties is only for loss.objective=sft: a tie has no winner for a preference loss"
            )
        if data.source == "shards" and (data.buckets or data.bucket_area):
            raise ConfigError(
                "data.source=shards streams pairs and cannot batch by bucket yet: drop data.buckets / "
                "data.bucket_area, or convert the shards to a manifest"
            )
        if not 0.0 <= data.hflip_prob <= 1.0:
            raise ConfigError(f"data.hflip_prob must be in [0, 1], got {data.hflip_prob}")
        frames = family(self.model.family).frame_problem(data.num_frames) if data.source == "video" else None
        if frames:
            raise ConfigError(f"data.num_frames={data.num_frames}: {frames}")
        if not 0.0 <= data.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {data.max_bad_fraction}")
        if not 0.0 <= self.data.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.data.caption_dropout}")
        if not 0.0 <= data.flip_prob <= 1.0:
            raise ConfigError(f"data.flip_prob must be in [0, 1], got {data.flip_prob}")
        for key, value, low in (
            ("model.lora_rank", self.model.lora_rank, 0),
            ("data.num_pairs", self.data.num_pairs, 1),
            ("data.resolution", self.data.resolution, 8),
            ("data.bucket_area", self.data.bucket_area, 0),
            ("data.bucket_step", self.data.bucket_step, 8),
            ("data.num_frames", self.data.num_frames, 1),
            ("data.frame_stride", self.data.frame_stride, 1),
            ("data.fps", self.data.fps, 0),
            ("data.prefetch_batches", self.data.prefetch_batches, 0),
            ("data.num_workers", self.data.num_workers, 0),
            ("train.checkpoint_every_steps", self.train.checkpoint_every_steps, 0),
            ("train.checkpoint_every_minutes", self.train.checkpoint_every_minutes, 0),
            ("train.max_nonfinite_steps", self.train.max_nonfinite_steps, 1),
            ("train.batch_pairs", self.train.batch_pairs, 1),
            ("train.grad_accum_steps", self.train.grad_accum_steps, 1),
            ("train.max_steps", self.train.max_steps, 0),
            ("train.log_every_steps", self.train.log_every_steps, 1),
            ("train.seed", self.train.seed, 0),
            ("optim.warmup_steps", self.optim.warmup_steps, 0),
            ("optim.weight_decay", self.optim.weight_decay, 0),
            ("optim.max_grad_norm", self.optim.max_grad_norm, 0),
            ("parallel.shard_size", self.parallel.shard_size, 0),
        ):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if not self.optim.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.optim.eps}")
        if not all(0.0 <= beta < 1.0 for beta in self.optim.betas):
            raise ConfigError(f"optim.betas: each AdamW beta must be in [0, 1), got {list(self.optim.betas)}")
        if self.train.seed >= 2**63:  # torch and numpy generators take 64-bit seeds; vipo adds offsets
            raise ConfigError(f"train.seed must be < 2**63, got {self.train.seed}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.train.device):
            raise ConfigError(
                f"train.device must be auto, cpu, cuda or cuda:N (N a GPU index), got {self.train.device!r}"
            )
        for sink in set(self.train.report_to):
            if self.train.report_to.count(sink) > 1:
                raise ConfigError(f"train.report_to names {sink!r} twice: {self.train.report_to}")
        _check_buckets(data)
        if data.source == "procedural" and not data.cache and self.train.batch_pairs > data.num_pairs:
            raise ConfigError(
                f"train.batch_pairs={self.train.batch_pairs} is more than the {data.num_pairs} pairs of the data set "
                f"(data.num_pairs={data.num_pairs}): set train.batch_pairs to at most {data.num_pairs}, or "
                f"data.num_pairs to at least {self.train.batch_pairs}"
            )
        _check_optim(self)
        _check_parallel(self)
        _check_paths(self)
        if self.model.path is None:  # with model.path the weights' folder decides; model.config is unused
            check_architecture(self.model.config, self.model.family)
        return self


def _check_optim(cfg: RunConfig) -> None:
    """Schedule and optimizer combinations that would fail, or silently do something else."""
    optim, max_steps = cfg.optim, cfg.train.max_steps
    name, warmup = optim.schedule, optim.warmup_steps
    if name == "constant" and warmup:
        raise ConfigError(
            f"optim.schedule=constant has no warm-up but optim.warmup_steps={warmup}: set "
            "optim.warmup_steps=0, or use optim.schedule=warmup_constant or constant_with_warmup"
        )
    if name in DECAYING_SCHEDULES and max_steps < 1:
        raise ConfigError(
            f"optim.schedule={name} decays over train.max_steps optimizer steps, but train.max_steps is "
            f"{max_steps}: set train.max_steps to the run's length"
        )
    if name in DECAYING_SCHEDULES and warmup >= max_steps:
        raise ConfigError(
            f"optim.warmup_steps={warmup} leaves no step to decay in: optim.schedule={name} warms up, then "
            f"decays until train.max_steps={max_steps}; lower optim.warmup_steps below train.max_steps"
        )
    if optim.num_cycles < 1:
        raise ConfigError(f"optim.num_cycles must be >= 1, got {optim.num_cycles}")
    if optim.power <= 0:
        raise ConfigError(f"optim.power must be > 0, got {optim.power}")
    if name == "polynomial":
        pairs = cfg.train.batch_pairs * cfg.train.grad_accum_steps
        step_lr = optim.lr * pairs if optim.scale_lr else optim.lr
        if step_lr <= POLYNOMIAL_END_LR:
            raise ConfigError(
                f"optim.schedule=polynomial decays to {POLYNOMIAL_END_LR:g}, but the step LR is {step_lr:g} "
                f"(optim.lr={optim.lr:g}" + (f" x {pairs} pairs" if optim.scale_lr else "") + "): raise "
                "optim.lr, or choose another optim.schedule"
            )
    if optim.optimizer == "adamw8bit" and cfg.parallel.strategy not in ("none", "ddp"):
        raise ConfigError(
            f"optim.optimizer=adamw8bit does not run under parallel.strategy={cfg.parallel.strategy}: "
            "bitsandbytes keeps its 8-bit state per whole tensor, not on FSDP or ZeRO shards; use "
            "parallel.strategy none or ddp, or optim.optimizer=adamw"
        )


# Strategies under which a copy reference is a plain replica on every rank (no gradients or optimizer
# state to shard; parallel.parallelize_reference leaves it alone): reference.offload is for these.
REPLICATED_REFERENCE = ("none", "ddp", "zero2")


def _check_parallel(cfg: RunConfig) -> None:
    """Strategy combinations the dataclass cannot refuse by type alone."""
    par = cfg.parallel
    strategy = par.strategy
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no EMA), got {cfg.train.ema_decay}")
    if par.cpu_offload and strategy != "fsdp":
        raise ConfigError(
            f"parallel.cpu_offload is for strategy fsdp, got {strategy!r}; for ZeRO offload put "
            "offload_optimizer / offload_param in parallel.deepspeed_config"
        )
    if cfg.reference.offload and strategy not in REPLICATED_REFERENCE:
        how = (
            "parallel.cpu_offload=true keeps the reference's shards on the host"
            if strategy == "fsdp"
            else "zero3 already partitions the copy over the ranks"
        )
        raise ConfigError(
            f"reference.offload is for the replicated reference of strategies none, ddp and zero2, got "
            f"{strategy!r}: {how}"
        )
    if par.shard_size and strategy != "fsdp":
        raise ConfigError(f"parallel.shard_size (hybrid sharding) is for strategy fsdp, got {strategy!r}")
    if par.deepspeed_config and strategy not in ("zero2", "zero3"):
        raise ConfigError(f"parallel.deepspeed_config needs strategy zero2 or zero3, got {strategy!r}")
    if par.deepspeed_config and not Path(par.deepspeed_config).is_file():
        raise ConfigError(f"parallel.deepspeed_config: no such file {par.deepspeed_config}")
    if cfg.train.validate_every_steps < 0 or cfg.train.validate_pairs < 0:
        raise ConfigError(
            "train.validate_every_steps and train.validate_pairs must be >= 0, got "
            f"{cfg.train.validate_every_steps} and {cfg.train.validate_pairs}"
        )
    cp = par.context_parallel
    if cfg.train.validate_every_steps and (strategy not in ("none", "ddp") or cp.size > 1):
        raise ConfigError(
            f"train.validate_every_steps runs on rank 0 with the whole policy: strategies none and ddp without "
            f"context parallelism, not {strategy}{' with context_parallel' if cp.size > 1 else ''}; "
            "validate from checkpoints with `vipo sample` / `vipo eval` instead"
        )
    for key in ("ulysses", "ring"):
        if getattr(cp, key) < 1:
            raise ConfigError(
                f"parallel.context_parallel.{key} must be >= 1 (1: off), got {getattr(cp, key)}"
            )
    if cp.size > 1:
        if strategy not in ("ddp", "fsdp"):
            raise ConfigError(
                f"parallel.context_parallel needs parallel.strategy ddp or fsdp, got {strategy!r}"
            )
        if cfg.train.compile != "off":
            raise ConfigError(
                "parallel.context_parallel does not run under train.compile yet: set train.compile=off"
            )
    if strategy == "fsdp" and not par.reshard_after_forward and cfg.reference.mode == "adapter":
        # PEFT switches LoRA requires_grad off for the reference pass and on again after it; with
        # blocks left gathered in between, the flags land on the gathered copies and FSDP, which
        # reads them on its shards, reduces no LoRA gradient.
        raise ConfigError(
            "parallel.reshard_after_forward=false does not work with reference.mode=adapter under fsdp: "
            "keep reshard_after_forward=true, or use reference.mode=copy"
        )


def _check_buckets(data: DataConfig) -> None:
    if data.buckets and data.bucket_area:
        raise ConfigError(
            "data.buckets and data.bucket_area are both set: give the bucket list, or the area to make "
            "buckets at, not both"
        )
    for size in data.buckets:
        if min(size) < 8:
            raise ConfigError(f"data.buckets: each [width, height] must be at least [8, 8], got {list(size)}")
        if data.buckets.count(size) > 1:
            raise ConfigError(f"data.buckets: {list(size)} is given twice")
    if data.bucket_area and data.bucket_area < data.bucket_step**2:
        raise ConfigError(
            f"data.bucket_area={data.bucket_area} is less than one square of data.bucket_step="
            f"{data.bucket_step} ({data.bucket_step**2} pixels): no bucket fits"
        )


def _check_paths(cfg: RunConfig) -> None:
    """Paths whose kind is wrong already: a folder where one file belongs, a file where a folder
    goes, an empty string (an unset shell variable, `model.path=$MODEL`) where None means 'off'."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for name, tp in field_types(type(values)).items():
            if tp == (str | None) and getattr(values, name) == "":
                raise ConfigError(f"{section.name}.{name} is empty: give a value, or null to leave it unset")
    data = cfg.data
    if data.source in ("manifest", "video") and Path(data.path).is_dir():
        raise ConfigError(
            f"data.path {data.path} is a folder, but data.source={data.source} reads one JSONL manifest "
            "file: name the .jsonl file (a folder is for data.source=pickapic or shards)"
        )
    output_dir = cfg.train.output_dir
    if not output_dir.strip():
        raise ConfigError(
            "train.output_dir is empty: name the run folder (e.g. train.output_dir=runs/my-run)"
        )
    for folder in (Path(output_dir), *Path(output_dir).parents):
        if folder.exists():
            if folder == Path(output_dir) and not folder.is_dir():
                raise ConfigError(
                    f"train.output_dir {output_dir} is a file, not a folder: choose another one"
                )
            if not folder.is_dir():
                raise ConfigError(
                    f"train.output_dir {output_dir} lies under {folder}, which is a file: choose another one"
                )
            break


# ---------------------------------------------------------------------------------------------
# Loading

SECTIONS = ", ".join(f.name for f in dataclasses.fields(RunConfig))
# A data file given where a recipe belongs, and the source that reads it.


def read_recipe(path: Path) -> dict:
    """A recipe file's mapping (schema.read_yaml with the recipe's words)."""
    path = Path(path)
    hint = (
        f" (built-in recipes: {', '.join(builtin_recipes())})"
        if path.parent == CONFIGS_ROOT / "train"
        else ""
    )
    return read_yaml(path, what="recipe", sections=SECTIONS + " (see configs/train/demo.yaml)", hint=hint)


# Sections of a recipe read by another command, which RunConfig leaves to it.
FOREIGN_SECTIONS = {"demo": "`vipo demo`"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from a YAML file (or the defaults) plus dotted overrides."""
    tree = read_recipe(Path(path)) if path is not None else {}
    return load_tree(tree, overrides, where=str(path) if path is not None else "defaults")


def load_tree(tree: dict, overrides: list[str] | None = None, *, where: str = "defaults") -> RunConfig:
    """RunConfig from a recipe's mapping; its foreign sections (FOREIGN_SECTIONS) are left out."""
    tree = {key: value for key, value in tree.items() if key not in FOREIGN_SECTIONS}
    for item in overrides or []:
        section = item.partition("=")[0].strip().split(".")[0]
        if section in FOREIGN_SECTIONS:
            raise ConfigError(
                f"override {item!r}: the {section} section is read by {FOREIGN_SECTIONS[section]} only"
            )
    return load(RunConfig, tree, overrides, where=where).validate()


@dataclass
class DemoConfig:
    """The `demo:` section of a recipe: what `vipo demo` adds to a training run (RunConfig leaves it)."""

    sft_steps: int = option(300, "stage 1 (SFT on winners) steps before the preference stage")
    sft_lr: float = option(1e-4, "stage 1 learning rate per pair (scaled like optim.lr)")
    held_out_pairs: int = option(128, "clean held-out pairs for the preference accuracy")
    sample_prompts: int = option(8, "prompts in the before/after sample grid")


def load_demo_config(
    path: str | Path | None, overrides: list[str] | None = None
) -> tuple[RunConfig, DemoConfig]:
    """(RunConfig, DemoConfig) of a recipe: `demo.*` keys and overrides go to the demo, the rest
    to the run."""
    overrides = overrides or []
    tree = read_recipe(path) if path is not None else {}
    demo_tree = tree.get("demo") or {}
    demo_overrides = [
        o.split(".", 1)[1] for o in overrides if o.partition("=")[0].strip().startswith("demo.")
    ]
    run_overrides = [o for o in overrides if not o.partition("=")[0].strip().startswith("demo.")]
    demo = load(
        DemoConfig,
        demo_tree,
        demo_overrides,
        where=str(path) if path is not None else "defaults",
        prefix="demo.",
    )
    for key, value, low in (
        ("demo.sft_steps", demo.sft_steps, 0),
        ("demo.held_out_pairs", demo.held_out_pairs, 1),
        ("demo.sample_prompts", demo.sample_prompts, 1),
    ):
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if demo.sft_lr <= 0:
        raise ConfigError(f"demo.sft_lr must be > 0, got {demo.sft_lr}")
    return load_tree(tree, run_overrides, where=str(path) if path is not None else "defaults"), demo


def describe(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) of every RunConfig field: `vipo config keys`."""
    return schema_describe(cls or RunConfig, prefix)
