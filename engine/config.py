"""Run configuration: typed dataclasses, loaded from YAML, overridden with dotted keys.

    cfg = load_config("configs/train/demo.yaml", ["optim.lr=1e-8", "loss.alpha=8"])

Every field carries its doc in `metadata["help"]`. A key the dataclasses do not have, a value
of the wrong type or out of range, raises ConfigError naming the key, where it came from and
what is allowed. YAML is read with a `yaml.SafeLoader` that also refuses a key given twice;
nothing in a config is executed.
"""

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vipo.configs import ROOT as CONFIGS_ROOT
from vipo.configs import builtin_recipes

from .families import family


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
    device: str = _f("auto", "auto (cuda when available), cpu, cuda (this process's GPU) or cuda:N")
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
        if self.reference.table and self.reference.mode != "precomputed":
            raise ConfigError(f"reference.table is for reference.mode=precomputed, got {self.reference.mode!r}")
        data = self.data
        if data.source != "procedural" and not data.path:
            raise ConfigError(f"data.source is {data.source!r}: set data.path to the data (file, folder or glob)")
        if data.source == "procedural" and data.path:
            raise ConfigError(
                f"data.path is {data.path!r} but data.source is 'procedural', which makes its pairs and reads "
                "no files: set data.source (manifest, pickapic, shards, video), or drop data.path"
            )
        if data.keep_ties and self.loss.objective != "sft":
            raise ConfigError("data.keep_ties is only for loss.objective=sft: a tie has no winner for a preference loss")
        if data.source == "shards" and (data.buckets or data.bucket_area):
            raise ConfigError("data.source=shards streams pairs and cannot batch by bucket yet: drop data.buckets / "
                              "data.bucket_area, or convert the shards to a manifest")  # fmt: skip
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
            ("demo.sft_steps", self.demo.sft_steps, 0),
            ("demo.held_out_pairs", self.demo.held_out_pairs, 1),
            ("demo.sample_prompts", self.demo.sample_prompts, 1),
        ):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        for key, value in (("optim.lr", self.optim.lr), ("demo.sft_lr", self.demo.sft_lr)):
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        if not all(0.0 <= beta < 1.0 for beta in self.optim.betas):
            raise ConfigError(f"optim.betas: each AdamW beta must be in [0, 1), got {list(self.optim.betas)}")
        if self.train.seed >= 2**63:  # torch and numpy generators take 64-bit seeds; vipo adds offsets
            raise ConfigError(f"train.seed must be < 2**63, got {self.train.seed}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.train.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N (N a GPU index), got {self.train.device!r}")
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
        _check_paths(self)
        if self.model.path is None:  # with model.path the weights' folder decides; model.config is unused
            _check_architecture(self.model)
        return self


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
        for name, tp in _field_types(type(values)).items():
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
        raise ConfigError("train.output_dir is empty: name the run folder (e.g. train.output_dir=runs/my-run)")
    for folder in (Path(output_dir), *Path(output_dir).parents):
        if folder.exists():
            if folder == Path(output_dir) and not folder.is_dir():
                raise ConfigError(f"train.output_dir {output_dir} is a file, not a folder: choose another one")
            if not folder.is_dir():
                raise ConfigError(f"train.output_dir {output_dir} lies under {folder}, which is a file: "
                                  "choose another one")  # fmt: skip
            break


def architecture_path(name_or_path: str) -> Path:
    """configs/models/NAME.json for a name (`sd15-tiny`), the path itself for a .json path."""
    path = Path(name_or_path)
    return path if path.suffix == ".json" else CONFIGS_ROOT / "models" / f"{name_or_path}.json"


def _check_architecture(model: ModelConfig) -> None:
    """model.config exists, is a JSON object, and is an architecture of model.family."""
    path = architecture_path(model.config)
    known = sorted(p.stem for p in (CONFIGS_ROOT / "models").glob("*.json"))
    if not path.is_file():
        raise ConfigError(f"model.config: no architecture config {model.config!r} (known: {', '.join(known)})")
    try:
        arch = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"model.config {path}: not UTF-8 text, not an architecture JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"model.config {path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(arch, dict):
        raise ConfigError(f"model.config {path}: an architecture config is a JSON object, got {_shown(arch, 60)}")
    family = arch.get("family")
    if not isinstance(family, str):
        raise ConfigError(
            f"model.config {path} names no \"family\" (got {family!r}): add \"family\": \"{model.family}\" "
            f"if it is a {model.family} architecture"
        )
    if family != model.family:
        same = [name for name in known if _family_of(name) == model.family]
        raise ConfigError(
            f"model.config {model.config!r} is an architecture of family {family!r}, but model.family is "
            f"{model.family!r}: use a config of family {model.family!r} ({', '.join(same) or 'none shipped'}), "
            f"or model.family={family}"
        )


def _family_of(name: str) -> str | None:
    try:
        return json.loads(architecture_path(name).read_text(encoding="utf-8")).get("family")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Loading

SECTIONS = ", ".join(f.name for f in dataclasses.fields(RunConfig))
# A data file given where a recipe belongs, and the source that reads it.
DATA_SUFFIXES = {".parquet": "pickapic", ".jsonl": "manifest", ".tar": "shards"}
MAX_RECIPE_BYTES = 1 << 20


class _DuplicateKey(yaml.YAMLError):
    pass


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no tags, nothing executed) that refuses a key given twice in one
    mapping, where safe_load keeps the last one without a word."""

    def construct_document(self, node):
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    break
                if earlier is not None:
                    raise _DuplicateKey(
                        f"line {line}: key '{self._prefix(node)}{key}' is given twice (first at line {earlier}); "
                        "YAML would keep only the last"
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep)

    def _prefix(self, target: yaml.Node) -> str:
        """'loss.' for the mapping under `loss:`, found from the document's root (errors only)."""
        stack, seen = [(self._root, "")], set()
        while stack:
            node, prefix = stack.pop()
            if node is target:
                return prefix
            if isinstance(node, yaml.MappingNode) and id(node) not in seen:
                seen.add(id(node))
                stack += [(v, f"{prefix}{k.value}.") for k, v in node.value if isinstance(k, yaml.ScalarNode)]
        return ""


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where, and what (PyYAML's own text spans several)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        what = "; ".join(p for p in (err.context, err.problem) if p)
        if "constructor for the tag" in what:
            what += " (recipes are plain YAML: no tags)"
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what
    return "not valid YAML: " + " ".join(str(err).split())


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


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
        return ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {_shown(value)}")

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
            try:
                value = _safe_load(value) if value.strip().startswith("[") else value.split(",")
            except yaml.YAMLError:
                raise bad() from None
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
                return int(value)  # exact, however long
            except ValueError:
                pass
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
        try:
            number = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            raise bad() from None
        except OverflowError:  # an int past float's range
            number = math.inf
        if number is None:
            raise bad()
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {key} must be a finite float, got {_shown(value)}")
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
    types_ = _field_types(cls)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping of its keys "
            f"({', '.join(types_)}), got {_shown(data)}"
        )
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
        if child is None:  # `loss:` with nothing under it in the file
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{key}' goes below '{part}', which is not a section")
        node = child
    node[parts[-1]] = value


def _check_override_key(item: str, key: str) -> None:
    """Refuse a key with an empty part, one below a value, or a whole section; a name the
    sections lack is left to _build, whose message lists what the section allows."""
    if "" in key.split("."):
        raise ConfigError(f"override {item!r}: {key!r} has an empty part; keys are section.key (see `vipo config keys`)")
    section, walked = RunConfig, []
    for part in key.split("."):
        if section is None:
            raise ConfigError(f"override {item!r}: {'.'.join(walked)} is a value, not a section")
        types_ = _field_types(section)
        if part not in types_:
            return
        walked.append(part)
        section = types_[part] if dataclasses.is_dataclass(types_[part]) else None
    if section is not None:
        example = dataclasses.fields(section)[0].name
        raise ConfigError(
            f"override {item!r}: {key} is a section; set its keys one by one (e.g. {key}.{example}=...)"
        )


def parse_overrides(overrides: list[str], *, run_config: bool = True) -> list[tuple[str, Any]]:
    """`["optim.lr=1e-8", "loss.alpha=8"]` -> [("optim.lr", "1e-8"), ("loss.alpha", 8)].
    A key given twice takes its last value, as a later command-line flag does. `run_config`:
    keys are RunConfig's dotted ones (checked here); False for other KEY=VALUE settings."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if run_config:
            _check_override_key(item, key)
        try:
            value = _safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def _read_recipe(path: Path) -> dict:
    """The recipe file's mapping, or a ConfigError naming the file and what is wrong with it."""

    def not_a_recipe(why: str) -> ConfigError:
        return ConfigError(f"{path} is not a recipe (YAML): {why}")

    suffix = path.suffix.lower()
    if suffix in DATA_SUFFIXES and path.is_file():
        source = DATA_SUFFIXES[suffix]
        raise not_a_recipe(f"{suffix} is data; to read it, give data.source={source} data.path={path}")
    try:
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            raise not_a_recipe(f"{path.stat().st_size} bytes, where a recipe is a few KB of text")
        raw = path.read_bytes()
    except FileNotFoundError:
        hint = f" (built-in recipes: {', '.join(builtin_recipes())})" if path.parent == CONFIGS_ROOT / "train" else ""
        raise ConfigError(f"recipe file not found: {path}{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe path is a directory, not a YAML file: {path}") from None
    except OSError as err:  # permissions, a file where a folder of the path should be, ...
        raise ConfigError(f"cannot read recipe {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_a_recipe(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        tree = _safe_load(text)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise not_a_recipe(_yaml_problem(err)) from None
    if tree is None:
        raise ConfigError(f"recipe {path} is empty: a recipe sets some of the sections {SECTIONS} "
                          "(see configs/train/demo.yaml)")  # fmt: skip
    if not isinstance(tree, dict):
        kind = {str: "text", list: "a list", int: "a number", float: "a number"}.get(type(tree), type(tree).__name__)
        raise not_a_recipe(f"it holds {kind} ({_shown(tree, 60)}), not a mapping of sections ({SECTIONS})")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from a YAML file (or the defaults) plus dotted overrides."""
    tree: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        tree = _read_recipe(Path(path))
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
