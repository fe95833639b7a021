"""Reading checkpoint formats that can carry code, without running any.

A run folder or an SFT checkpoint may come from someone else: loading it must never execute what
it holds. Our own files are safetensors, JSON and `torch.load(weights_only=True)` pickles; two
formats that libraries read for us are pickles that would run code:

- torch.distributed.checkpoint (fsdp): `FileSystemReader.read_metadata` unpickles `.metadata`
  with plain `pickle.load`, and `DefaultLoadPlanner.load_bytes` reads non-tensor entries with
  `torch.load(weights_only=False)`. `dcp_reader` / `DCPLoadPlanner` read both through allow-lists:
  the metadata classes DCP writes, and torch's weights-only unpickler.
- DeepSpeed (zero2, zero3): its checkpoint engine and `zero_to_fp32` call
  `torch.load(weights_only=False)`. Inside `deepspeed_loads()` every `torch.load` runs with
  `weights_only=True` and the four DeepSpeed classes its ZeRO states hold.

Anything else in such a file is refused with `UntrustedCheckpoint`, naming the file and the
global it asked for.
"""

import importlib
import pickle
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import RunError


class UntrustedCheckpoint(RunError):
    """A checkpoint file asks for something no checkpoint needs and that could run code."""


def refusal(file, what: str) -> UntrustedCheckpoint:
    return UntrustedCheckpoint(
        f"{file}: refused: it asks to load {what}, which no checkpoint needs and which could run code "
        "(a crafted or foreign file); nothing from it was executed"
    )


# ---------------------------------------------------------------------------------------------
# torch.distributed.checkpoint

# Every global a DCP `.metadata` pickle names (read off FSDP checkpoints of torch 2.11-2.13).
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise refusal(self.name, f"{module}.{name}")


def read_dcp_metadata(path: Path):
    """The `.metadata` of a DCP checkpoint folder, unpickled through the allow-list."""
    file = Path(path) / ".metadata"
    with open(file, "rb") as handle:
        try:
            return _MetadataUnpickler(handle, str(file)).load()
        except UntrustedCheckpoint:
            raise
        except Exception as err:  # truncated or not a pickle at all
            raise RunError(f"{file}: unreadable DCP metadata ({type(err).__name__}: {err})") from None


def dcp_reader(path: Path):
    """A FileSystemReader for DCP folder `path` whose metadata goes through the allow-list."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def dcp_planner(path: Path):
    """A DefaultLoadPlanner that reads DCP's non-tensor entries (optimizer hyper-parameters,
    step counts) with the weights-only unpickler."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise refusal(f"{path} ({read_item.dest_index.fqn})", unsupported_global(err)) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def unsupported_global(err: Exception) -> str:
    """The global named in torch's weights-only refusal, or the first line of it."""
    text = str(err)
    for marker in ("Unsupported global: GLOBAL ", "Unsupported global: "):
        if marker in text:
            return text.split(marker, 1)[1].split()[0]
    return text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__


# ---------------------------------------------------------------------------------------------
# DeepSpeed

# The classes DeepSpeed's ZeRO-2/3 optimizer states pickle (read off checkpoints of 0.19).
_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
_patch_lock = threading.Lock()


def _deepspeed_allow_list() -> list:
    found = []
    for module, name in _DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer classes to allow
            continue
    return found


@contextmanager
def deepspeed_loads():
    """Within: every `torch.load` (DeepSpeed's checkpoint engine, zero_to_fp32, ...) uses the
    weights-only unpickler with DeepSpeed's state classes allowed, whatever its caller asked."""
    allowed = _deepspeed_allow_list()
    original = torch.load

    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise refusal(f, unsupported_global(err)) from None

    with _patch_lock:
        torch.load = weights_only_load
        try:
            yield
        finally:
            torch.load = original
