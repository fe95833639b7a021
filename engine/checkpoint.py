"""Checkpoints: written under a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint whole; `latest` names the newest complete one and is written last.

    <output_dir>/checkpoints/step-000100/
        model.safetensors      trainable weights (the LoRA weights alone for a LoRA policy)   | one process, ddp
        optimizer.pt           optimizer and LR-schedule state (loaded with weights_only=True) |
        dcp/                   weights + optimizer, one shard file per rank (fsdp):            | fsdp
                               torch.distributed.checkpoint, resumable on any world size       |
        deepspeed/             DeepSpeed's own ZeRO checkpoint (same world size to resume)     | zero2, zero3
        scheduler.pt           LR-schedule state (dcp and deepspeed formats)
        rng.safetensors        the noise generator's state (one per rank for per-rank noise)
        state.json             step, data position, non-finite counters, format, world size
        config.yaml            the resolved run config
        manifest.json          size and SHA-256 of every file above (integrity.py), written last
    <output_dir>/checkpoints/latest

Sharded formats need a file system every rank sees (one node, or a shared file system across
nodes): each rank writes its shards into the temporary folder, rank 0 renames it after a barrier.

Reading never runs code from the checkpoint: safetensors, JSON and weights-only pickles here, and
safe_load.py's allow-lists for what torch.distributed.checkpoint and DeepSpeed read.
"""

import json
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .config import to_dict
from .errors import RunError
from .integrity import MANIFEST, check, resolve_checkpoint, write_manifest
from .safe_load import (
    dcp_planner,
    dcp_reader,
    deepspeed_loads,
    read_dcp_metadata,
    refusal,
    unsupported_global,
)

DEEPSPEED_TAG = "deepspeed"


def _trainable_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {name for name, p in network.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items() if k in names}


def _paths(out_dir: Path, step: int, suffix: str = "") -> tuple[Path, Path, Path]:
    root = Path(out_dir) / "checkpoints"
    return root, root / f"step-{step:06d}{suffix}", root / f".step-{step:06d}{suffix}.tmp"


def _fsync_tree(path: Path) -> None:
    """File contents on disk before the rename makes them visible."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _write_trainer_state(tmp: Path, step: int, state: dict, cfg) -> None:
    state = {"step": step, **state, "manifest": MANIFEST}
    (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def _publish(tmp: Path, final: Path, root: Path, *, latest: bool = True) -> None:
    """tmp becomes `final`, then `latest` names it (unless `latest` is False: a checkpoint kept for
    inspection that no resume should pick). A checkpoint already at `final` (a resumed run saving
    the same step again) stays whole until the new one is in place."""
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if latest:
        latest_tmp = root / f".latest.tmp-{os.getpid()}"
        latest_tmp.write_text(final.name, encoding="utf-8")
        os.replace(latest_tmp, root / "latest")
    if old is not None:
        shutil.rmtree(old)


def save_checkpoint(
    out_dir: Path,
    step: int,
    network,
    optimizer,
    scheduler,
    generator,
    state: dict,
    cfg,
    rng: dict | None = None,
    *,
    latest: bool = True,
    suffix: str = "",
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """One process (or rank 0 of a ddp run, whose replicas are identical). `rng` replaces the
    generator's state when there is one stream per rank; `extra` maps more safetensors files of
    the checkpoint (e.g. ema.safetensors) to their tensors."""
    root, final, tmp = _paths(out_dir, step, suffix)
    root.mkdir(parents=True, exist_ok=True)
    tmp = tmp.with_name(f"{tmp.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_trainable_state(network), tmp / "model.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
    )
    save_file(rng or {"noise_generator": generator.get_state()}, tmp / "rng.safetensors")
    for name, tensors in (extra or {}).items():
        save_file(tensors, tmp / name)
    _write_trainer_state(tmp, step, {"format": "safetensors", **state}, cfg)
    write_manifest(tmp)
    _publish(tmp, final, root, latest=latest)
    return final


def save_sharded_checkpoint(
    out_dir: Path,
    step: int,
    *,
    world,
    network,
    optimizer,
    scheduler,
    engine,
    rng: dict,
    state: dict,
    cfg,
    latest: bool = True,
    suffix: str = "",
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Every rank calls this. FSDP writes with torch.distributed.checkpoint (each rank its
    shards, keyed by parameter name so any world size can read them); ZeRO with DeepSpeed's
    save_checkpoint. Rank 0 adds the trainer's state and `extra` (more safetensors files, whole
    tensors: e.g. ema.safetensors) and publishes after a barrier."""
    root, final, tmp = _paths(out_dir, step, suffix)
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash mid-write
            shutil.rmtree(tmp)
        tmp.mkdir()
    world.barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        fmt = "deepspeed"
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(_dcp_state(network, optimizer), checkpoint_id=tmp / "dcp")
        fmt = "dcp"
    world.barrier()
    if world.is_main:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        save_file(rng, tmp / "rng.safetensors")
        for name, tensors in (extra or {}).items():
            save_file(tensors, tmp / name)
        _write_trainer_state(tmp, step, {"format": fmt, "world_size": world.size, **state}, cfg)
    world.barrier()
    write_manifest(tmp, world)  # every rank hashes a share of the files
    if world.is_main:
        _publish(tmp, final, root, latest=latest)
    world.barrier()
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def checkpoint_state(path: Path) -> dict:
    """state.json of a checkpoint; `format` is safetensors for checkpoints that predate it."""
    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunError(f"{file}: unreadable ({type(err).__name__}: {err})") from None
    state.setdefault("format", "safetensors")
    if state["format"] not in ("safetensors", "dcp", "deepspeed"):
        raise RunError(
            f"{file}: unknown checkpoint format {state['format']!r} (safetensors, dcp or deepspeed)"
        )
    return state


@contextmanager
def reading(file: Path):
    """Any failure to read `file` (truncated, zeroed, wrong kind) as one line naming it. DCP
    reports a reader's error inside a CheckpointException (a BaseException): it is unwrapped."""
    try:
        yield
    except (RunError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # safetensors, torch.load and DCP raise many kinds
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict) and failures:
            inner = [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
            for exc in inner:
                if isinstance(exc, RunError):
                    raise exc from None
            err = inner[0]
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise refusal(file, unsupported_global(err)) from None  # torch.load(weights_only=True) said no
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise RunError(f"{file}: unreadable ({type(err).__name__}{': ' + text if text else ''})") from None


# ---------------------------------------------------------------------------------------------
# Reading


@contextmanager
def _single_process_ok():
    """torch.distributed.checkpoint warns whenever it reads without a process group; one process
    reading a checkpoint that many wrote is what it is asked to do here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def _dcp_state(network, optimizer) -> dict:
    """Trainable weights and optimizer state keyed by parameter name (DTensor shards under
    FSDP, whole tensors otherwise): the layout torch.distributed.checkpoint reshards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        network, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    return {"model": model_state, "optimizer": optim_state}


def _dcp_weights(path: Path) -> dict[str, torch.Tensor]:
    """Whole trainable tensors of a dcp checkpoint, read in this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(path) / "dcp"
    metadata = read_dcp_metadata(folder)
    weights = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with _single_process_ok(), reading(folder):
        dcp.load(
            {"model": weights}, storage_reader=dcp_reader(folder), planner=dcp_planner(folder), no_dist=True
        )
    return weights


def _deepspeed_weights(path: Path) -> dict[str, torch.Tensor]:
    """fp32 trainable tensors of a ZeRO checkpoint, merged from every rank's partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with deepspeed_loads(), reading(Path(path) / DEEPSPEED_TAG):
        return dict(
            get_fp32_state_dict_from_zero_checkpoint(
                str(path), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True
            )
        )


def trusted_checkpoint(path: Path, what: str) -> Path:
    """`path` as a checkpoint to read weights from (`what` names who asks, e.g. model.init_from):
    a checkpoint folder that passes its integrity check, or a run folder's newest checkpoint that
    passes (falling back past damaged ones with a warning naming the damaged file). A damaged
    checkpoint named explicitly is refused: which weights to use is the caller's choice."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{what}: {path} is not a folder (a run folder or one of its checkpoints/step-N)")
    if not (path / "state.json").is_file():
        if not (path / "checkpoints").is_dir():
            raise RunError(
                f"{what}: {path} is neither a vipo checkpoint (no state.json) nor a run folder "
                "(no checkpoints/)"
            )
        found = resolve_checkpoint(path, what=f"read for {what}", set_aside=False)
        if found is None:
            raise RunError(f"{what}: {path} is a run folder without checkpoints")
        return found
    problem = check(path)
    if problem:
        raise RunError(f"{what}: checkpoint {path} is damaged ({problem}); name an older one of that run")
    return path


def read_weights(path: Path, what: str = "model.init_from") -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint of any format, whole, on the CPU, after its
    integrity check (`trusted_checkpoint`)."""
    path = trusted_checkpoint(path, what)
    fmt = checkpoint_state(path)["format"] if (path / "state.json").is_file() else "safetensors"
    if fmt == "dcp":
        return _dcp_weights(path)
    if fmt == "deepspeed":
        return _deepspeed_weights(path)
    file = path / "model.safetensors"
    if not file.is_file():
        raise RunError(f"{what}: {path} has no model.safetensors (not a vipo checkpoint folder)")
    with reading(file):
        return load_file(file)


def load_weights(path: Path, network, what: str = "model.init_from") -> None:
    """Start `network` from a checkpoint's weights (every tensor it has must match); any format."""
    weights = read_weights(path, what)
    own = network.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise RunError(f"{what}: {path}: {len(unknown)} tensors this model does not have, e.g. {unknown[0]}")
    mismatched = [k for k, v in weights.items() if v.shape != own[k].shape]
    if mismatched:
        key = mismatched[0]
        raise RunError(
            f"{what}: {path}: {key} is {tuple(weights[key].shape)}, the model's {tuple(own[key].shape)}"
        )
    network.load_state_dict(weights, strict=False)


def load_checkpoint(path: Path, network, optimizer, scheduler, generator=None) -> dict:
    """Restore weights, optimizer, schedule and (given `generator`) the noise generator of a
    safetensors checkpoint (one process / ddp); returns state.json."""
    path = Path(path)
    with reading(path / "model.safetensors"):
        weights = load_file(path / "model.safetensors")
    missing = set(_trainable_state(network)) - set(weights)
    if missing:
        raise RunError(
            f"{path}: checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
        )
    with reading(path / "model.safetensors"):
        network.load_state_dict(weights, strict=False)
    with reading(path / "optimizer.pt"):
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
    if generator is not None:
        generator.set_state(read_rng(path)["noise_generator"])
    return checkpoint_state(path)


def read_rng(path: Path) -> dict[str, torch.Tensor]:
    with reading(Path(path) / "rng.safetensors"):
        return load_file(Path(path) / "rng.safetensors")


def load_sharded_checkpoint(
    path: Path, *, network, optimizer, scheduler, engine, universal: Path | None = None
) -> tuple[dict, dict]:
    """Every rank calls this for a dcp or deepspeed checkpoint; returns (state.json, rng tensors).
    `universal`: the DeepSpeed states converted to DeepSpeed's universal format (another world size)."""
    path = Path(path)
    state = checkpoint_state(path)
    if state["format"] == "deepspeed":
        where = path if universal is None else universal.parent
        config = engine._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal is not None  # read by load_checkpoint
        try:
            with deepspeed_loads(), reading(where / DEEPSPEED_TAG):
                loaded, _ = engine.load_checkpoint(
                    str(where),
                    tag=DEEPSPEED_TAG,
                    load_module_strict=False,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                )
        finally:
            config.load_universal_checkpoint = before
        if loaded is None:
            raise RunError(f"{path}: DeepSpeed found no checkpoint in {path / DEEPSPEED_TAG}")
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        folder = path / "dcp"
        read_dcp_metadata(folder)  # refused here, in one line, rather than inside DCP's collectives
        target = _dcp_state(network, optimizer)
        with _single_process_ok(), reading(folder):
            dcp.load(target, storage_reader=dcp_reader(folder), planner=dcp_planner(folder))
        set_state_dict(
            network,
            optimizer,
            model_state_dict=target["model"],
            optim_state_dict=target["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
    with reading(path / "scheduler.pt"):
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])
    return state, read_rng(path)


# ---------------------------------------------------------------------------------------------
# Export


def gather_full_state(network, strategy: str, world, engine=None) -> dict[str, torch.Tensor] | None:
    """Every weight of the policy, whole, on rank 0's CPU (None on the other ranks). A
    collective under fsdp and zero3: every rank calls it."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif strategy == "zero3":
        full = engine._zero3_consolidated_16bit_state_dict()  # as accelerate's get_state_dict does
    else:
        full = {k: v.detach().cpu() for k, v in network.state_dict().items()} if world.is_main else None
    return dict(full) if world.is_main else None


def _plain_class(network: nn.Module) -> type:
    """The model's own class under FSDP2's wrapper class."""
    from torch.distributed.fsdp import FSDPModule

    return next(
        c for c in type(network).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule)
    )


def plain_twin(network: nn.Module, full_state: dict[str, torch.Tensor]) -> nn.Module:
    """An unwrapped CPU copy of `network` holding `full_state`, built on the meta device so no
    random initialisation is paid for."""
    with torch.device("meta"):
        twin = _plain_class(network).from_config(network.config)
        for name, lora_config in (getattr(network, "peft_config", None) or {}).items():
            twin.add_adapter(lora_config, adapter_name=name)
    twin.to_empty(device="cpu")
    try:
        twin.load_state_dict(full_state)
    except RuntimeError as err:
        raise RunError(f"gathered weights do not fit {type(twin).__name__}: {err}") from None
    return twin.requires_grad_(False).eval()


def export_full_weights(adapter, network, strategy: str, world, out_dir: Path, engine=None) -> Path | None:
    """Gather the policy's weights on rank 0 and write a diffusers-layout folder there through
    the adapter's `export` (a LoRA merged into its base, as `vipo export` does). Every rank
    calls it; returns the folder on rank 0, None elsewhere."""
    full = gather_full_state(network, strategy, world, engine)
    out = None
    if world.is_main:
        twin = plain_twin(network, full)
        if getattr(twin, "peft_config", None):
            twin.fuse_lora()
            twin.unload_lora()
        live = adapter.network
        adapter.network = twin
        try:
            adapter.export(Path(out_dir))
        finally:
            adapter.network = live
        out = Path(out_dir)
    world.barrier()
    return out
