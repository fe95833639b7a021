"""Run configuration: typed dataclasses, loaded from YAML, overridden with dotted keys.

    cfg = load_config("configs/train/demo.yaml", ["optim.lr=1e-8", "loss.alpha=8"])

Every field carries its doc in `metadata["help"]`. A key the dataclasses do not have, or a value
of the wrong type, raises ConfigError naming the key, where it came from and what is allowed.
YAML is read with `yaml.safe_load`; nothing in a config is executed.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in a recipe or an override: the message says which key and why."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    family: Literal["sd15", "sdxl", "sd3", "flux", "wan"] = _f(
        "sd15", "model family: sd15, sdxl (UNet, eps-prediction); sd3, flux, wan (flow matching)"
    )
    path: str | None = _f(
        None, "local diffusers-layout folder with the real weights; None builds from `config`"
    )
    config: str = _f("sd15-tiny", "architecture config in configs/models/ (or a .json path), random weights")
    init_from: str | None = _f(
        None,
        "checkpoint folder (…/checkpoints/step-N) whose weights start the policy and the reference, "
        "e.g. the SFT stage's last checkpoint (the paper's stage 2)",
    )
    lora_rank: int = _f(0, "LoRA rank on the denoiser's attention projections; 0 = full fine-tune")
    gradient_checkpointing: bool = _f(False, "recompute block activations in backward to save memory")
    attention: Literal["sdpa", "sdpa_flash", "sdpa_cudnn", "flash_attn"] = _f(
        "sdpa",
        "attention kernels: sdpa (PyTorch picks), sdpa_flash / sdpa_cudnn (only that SDPA backend, an error "
        "where it cannot run), flash_attn (the flash-attn package, flux and wan; pip install 'vipo[gpu]')",
    )


@dataclass
class DataConfig:
    source: Literal["procedural", "pickapic", "manifest", "shards", "video"] = _f(
        "procedural",
        "pair source: procedural (shapes made on the fly), pickapic (Pick-a-Pic parquet shards), manifest "
        "(JSONL of image pairs), shards (tar shards of image pairs), video (JSONL of video pairs)",
    )
    path: str | None = _f(
        None, "the data: parquet file/folder/glob, manifest .jsonl, tar shard folder/glob (all but procedural)"
    )
    num_pairs: int = _f(512, "pairs in the procedural data set")
    resolution: int = _f(16, "image side in pixels (square crops); video: frame height and width")
    buckets: list[tuple[int, int]] = _f(
        [], "aspect buckets as [[width, height], ...] (e.g. [[1280, 720], [960, 960]]); batches use one bucket"
    )
    bucket_area: int = _f(0, "make buckets at this pixel area (e.g. 1048576 for 1024px); 0 = no buckets")
    bucket_step: int = _f(64, "bucket sides are multiples of this")
    random_crop: bool = _f(False, "random instead of centre crops (the same box for winner and loser)")
    hflip_prob: float = _f(0.0, "horizontal flip probability, drawn once per pair")
    keep_ties: bool = _f(False, "pickapic: keep tied pairs (SFT only: ties never reach a preference loss)")
    check_files: bool = _f(False, "manifest: drop pairs with missing files up front (counted) instead of at read")
    allow_outside_root: bool = _f(
        False,
        "manifest / video: let entries point outside the manifest's folder (absolute paths, '..', symlinks "
        "that lead out); refused by default, naming the path",
    )
    num_frames: int = _f(17, "video: frames per clip (1 + 4k for Wan)")
    frame_stride: int = _f(1, "video: take every n-th frame (ignored when fps is set)")
    fps: float = _f(0.0, "video: resample clips to this frame rate by timestamps; 0 = use frame_stride")
    frame_start: Literal["start", "center", "random"] = _f("random", "video: where the frame window starts")
    video_backend: Literal["auto", "dali", "pyav"] = _f(
        "auto", "video decoding: auto (DALI NVDEC where a GPU has it, else PyAV), dali, pyav"
    )
    regime: Literal["clean", "noisy", "shuffled"] = _f(
        "clean", "procedural labels: clean, noisy (flipped labels), shuffled (losers from other prompts)"
    )
    flip_prob: float = _f(0.3, "share of flipped labels in the noisy regime")
    caption_dropout: float = _f(
        0.0, "probability of an empty prompt, drawn per pair (winner and loser alike)"
    )
    cache: str | None = _f(None, "latent cache folder written by `vipo cache`; None encodes online")
    max_bad_fraction: float = _f(
        0.01, "stop the run when more than this share of the pairs tried are bad files (corrupt, missing, short)"
    )
    prefetch_batches: int = _f(2, "batches prepared ahead in a background thread while the step runs; 0 = off")


@dataclass
class ReferenceConfig:
    mode: Literal["copy", "adapter", "precomputed"] = _f(
        "copy", "copy: frozen copy of the initial denoiser; adapter: the LoRA policy with adapters off; "
        "precomputed: e_ref from `vipo score-reference`'s table (needs data.cache)"
    )
    table: str | None = _f(None, "precomputed: reference-error table folder; None = DATA.CACHE/reference")


@dataclass
class LossConfig:
    objective: Literal["sft", "dpo", "poly_dpo"] = _f(
        "poly_dpo",
        "sft: diffusion loss (stage 1); dpo: Diffusion-DPO (alpha must be 0); poly_dpo: adds alpha * (1 - p)",
    )
    winners_only: bool = _f(True, "sft: train on winners only (the paper's stage 1); false uses both images")
    beta: float = _f(5000.0, "KL strength, official convention: z = -0.5 * beta * (model_diff - ref_diff)")
    alpha: float = _f(0.0, "Poly-DPO coefficient: > 0 for noisy labels, < 0 for over-simple pairs, 0 = DPO")
    beta_convention: Literal["official", "diffusers", "sum"] = _f(
        "official", "convention `beta` is written in; converted with vipo.kernels.beta_from"
    )


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "base learning rate per pair; the step LR is lr * pairs per step when scale_lr")
    scale_lr: bool = _f(True, "multiply lr by the pairs per optimizer step (the paper's convention)")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear warm-up steps, then constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 disables clipping")


@dataclass
class TrainConfig:
    batch_pairs: int = _f(
        8,
        "preference pairs per micro-batch over ALL processes (global); each of N processes takes "
        "batch_pairs / N, so a recipe means the same run on 1 or 64 GPUs; the LR scales with "
        "the global batch_pairs * grad_accum_steps",
    )
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    max_steps: int = _f(200, "optimizer steps")
    seed: int = _f(0, "seed for weights, data order, noise and timesteps")
    log_every_steps: int = _f(20, "steps between metric logs")
    output_dir: str = _f("runs/demo", "where metrics and checkpoints go")
    checkpoint_every_steps: int = _f(0, "steps between checkpoints; 0 = only at the end (and on SIGTERM / SIGINT)")
    checkpoint_every_minutes: float = _f(
        0.0, "minutes between checkpoints, measured on rank 0 and agreed by all ranks; 0 = off"
    )
    max_nonfinite_steps: int = _f(3, "stop (with a checkpoint) after this many non-finite losses in a row")
    device: str = _f("auto", "cuda, cpu, or auto (cuda when available)")
    mixed_precision: Literal["no", "bf16"] = _f(
        "no", "bf16: autocast forward passes to bfloat16 (fp32 weights)"
    )
    report_to: list[Literal["tensorboard", "wandb"]] = _f(
        [], "metric sinks besides metrics.jsonl: tensorboard, wandb (pip install 'vipo[track]')"
    )
    run_name: str | None = _f(None, "run name for the sinks (default: the output folder's name)")


@dataclass
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp", "zero2", "zero3"] = _f(
        "none",
        "none: one process; ddp: replicas; fsdp: FSDP2 fully_shard per block; zero2 / zero3: DeepSpeed "
        "ZeRO (optimizer+grads / +params sharded). Launch N processes with torchrun or deepspeed",
    )
    reshard_after_forward: bool = _f(
        True,
        "fsdp: free gathered block weights after forward (false: keep them for backward, ZeRO-2-like; "
        "not with reference.mode=adapter)",
    )
    cpu_offload: bool = _f(False, "fsdp: keep sharded weights, grads and optimizer state in host memory")
    shard_size: int = _f(
        0, "fsdp: ranks a model is sharded over; 0 = all of them. Less (e.g. 8, a node) = hybrid sharding "
        "(HSDP): shard inside each group of shard_size ranks, replicate across groups",
    )
    deepspeed_config: str | None = _f(
        None, "zero2/zero3: your own DeepSpeed JSON; vipo fills batch sizes and clipping from the recipe"
    )
    noise_draw: Literal["global", "per_rank"] = _f(
        "global",
        "global: every rank draws noise, t and caption dropout for the whole global micro-batch and keeps "
        "its rows (N processes reproduce 1 process); per_rank: a generator per (seed, rank), O(local) memory",
    )


@dataclass
class DemoConfig:
    sft_steps: int = _f(300, "stage 1 (SFT on winners) steps before the preference stage")
    sft_lr: float = _f(1e-4, "stage 1 learning rate per pair (scaled like optim.lr)")
    held_out_pairs: int = _f(128, "clean held-out pairs for the preference accuracy")
    sample_prompts: int = _f(8, "prompts in the before/after sample grid")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def validate(self) -> "RunConfig":
        """Checks across fields; load_config calls it once file and overrides are merged."""
        if self.loss.objective == "dpo" and self.loss.alpha != 0.0:
            raise ConfigError(
                f"loss.alpha is {self.loss.alpha} but loss.objective is 'dpo' (alpha 0); "
                "use loss.objective=poly_dpo for alpha != 0"
            )
        if self.reference.mode == "adapter" and self.model.lora_rank < 1:
            raise ConfigError(
                "reference.mode is 'adapter' but model.lora_rank is 0: the adapter "
                "reference needs a LoRA policy (set model.lora_rank, or reference.mode=copy)"
            )
        data = self.data
        if data.source != "procedural" and not data.path:
            raise ConfigError(f"data.source is {data.source!r}: set data.path to the data (file, folder or glob)")
        if data.keep_ties and self.loss.objective != "sft":
            raise ConfigError("data.keep_ties is only for loss.objective=sft: a tie has no winner for a preference loss")
        if data.source == "shards" and (data.buckets or data.bucket_area):
            raise ConfigError("data.source=shards streams pairs and cannot batch by bucket yet: drop data.buckets / "
                              "data.bucket_area, or convert the shards to a manifest")  # fmt: skip
        if not 0.0 <= data.hflip_prob <= 1.0:
            raise ConfigError(f"data.hflip_prob must be in [0, 1], got {data.hflip_prob}")
        if data.source == "video" and self.model.family == "wan" and (data.num_frames - 1) % 4:
            raise ConfigError(f"data.num_frames={data.num_frames}: Wan's VAE needs 1 + 4k frames (e.g. 17, 33, 81)")
        if not 0.0 <= data.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {data.max_bad_fraction}")
        if not 0.0 <= self.data.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.data.caption_dropout}")
        for key, value, low in (
            ("model.lora_rank", self.model.lora_rank, 0),
            ("data.num_pairs", self.data.num_pairs, 1),
            ("data.resolution", self.data.resolution, 8),
            ("data.prefetch_batches", self.data.prefetch_batches, 0),
            ("train.checkpoint_every_steps", self.train.checkpoint_every_steps, 0),
            ("train.checkpoint_every_minutes", self.train.checkpoint_every_minutes, 0),
            ("train.max_nonfinite_steps", self.train.max_nonfinite_steps, 1),
            ("train.batch_pairs", self.train.batch_pairs, 1),
            ("train.grad_accum_steps", self.train.grad_accum_steps, 1),
            ("train.max_steps", self.train.max_steps, 0),
            ("train.log_every_steps", self.train.log_every_steps, 1),
            ("optim.warmup_steps", self.optim.warmup_steps, 0),
        ):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        return self


# ---------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` as type `tp`, or ConfigError. Strings are accepted for numbers (YAML 1.1 reads
    `1e-8` as a string) but never silently truncated."""

    def bad() -> ConfigError:
        return ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads no / off / yes / on as booleans
            for alias in ("yes", "true", "on") if value else ("no", "false", "off"):
                if alias in typing.get_args(tp):
                    return alias
        raise bad()
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        raise bad()
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple:
            if len(value) != len(args):
                raise bad()
            return tuple(_coerce(v, a, key, where) for v, a in zip(value, args, strict=True))
        return [_coerce(v, args[0], key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad() from None
            if number.is_integer():
                return int(number)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(number):
            raise bad()
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'the config'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(
                f"{where}: unknown key '{dotted}' (allowed in {prefix.rstrip('.') or 'the top level'}: "
                f"{', '.join(types_)})"
            )
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.", where)
        else:
            kwargs[key] = _coerce(value, tp, dotted, where)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{key}' goes below '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["optim.lr=1e-8", "loss.alpha=8"]` -> [("optim.lr", "1e-8"), ("loss.alpha", 8)]."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from a YAML file (or the defaults) plus dotted overrides."""
    tree: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"recipe file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"recipe path is a directory, not a YAML file: {path}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    # The file alone first, so that its mistakes are named as the file's.
    _build(RunConfig, tree, "", where)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, f"override {key}")
    if overrides:
        where = "command-line override"
    return _build(RunConfig, tree, "", where).validate()


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), ready for yaml.safe_dump."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field: the source of `vipo config keys`."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            rows.append(
                (f"{prefix}{f.name}", _type_name(tp), getattr(instance, f.name), f.metadata.get("help", ""))
            )
    return rows
