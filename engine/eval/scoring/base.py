"""What every scorer shares: the interface, local-weights checks, media handling.

    scorer.score(images, prompts) -> float32 tensor [N] on the CPU

`images` are PIL images or uint8 arrays: HxWx3 for an image, FxHxWx3 for a video, whose score
is the mean over `video_frames` evenly spaced frames (reward models are image models; the
paper scores videos with VBench, which vipo does not ship).
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...errors import RunError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ScorerError(RunError):
    """A scorer cannot be built: weights missing or not what the scorer expects."""


def require_path(scorer: str, key: str, value: str | None, kind: str = "folder") -> Path:
    """`value` as an existing folder or file, or a ScorerError naming the scorer and the path."""
    if value is None:
        raise ScorerError(
            f"scorer '{scorer}' has no weights path: set {scorer}.{key} in a scorers config "
            "(--scorers-config FILE); scorers read local files only, nothing is downloaded"
        )
    path = Path(value)
    exists = path.is_dir() if kind == "folder" else path.is_file()
    if not exists:
        raise ScorerError(f"scorer '{scorer}': {kind} not found at {path} (from {scorer}.{key})")
    return path


def require_model_folder(scorer: str, key: str, value: str | None) -> Path:
    """A transformers model folder: config.json and a weights file in it."""
    path = require_path(scorer, key, value)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not (path / "config.json").is_file() or not any((path / name).is_file() for name in weights):
        raise ScorerError(
            f"scorer '{scorer}': {path} is not a model folder (expected config.json and one of "
            f"{', '.join(weights)})"
        )
    return path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"scorers device is {name!r} but no CUDA device is available")
    return torch.device(name)


def frames_of(item, max_frames: int) -> list[Image.Image]:
    """An image as [image]; a video as up to `max_frames` evenly spaced frames."""
    if isinstance(item, Image.Image):
        return [item.convert("RGB")]
    array = np.asarray(item)
    if array.dtype != np.uint8 or array.shape[-1] != 3 or array.ndim not in (3, 4):
        raise ValueError(f"expected uint8 HxWx3 or FxHxWx3 pixels, got {array.dtype} {array.shape}")
    if array.ndim == 3:
        return [Image.fromarray(array)]
    picks = np.unique(np.linspace(0, array.shape[0] - 1, min(max_frames, array.shape[0])).round().astype(int))
    return [Image.fromarray(array[i]) for i in picks]


class Scorer(ABC):
    """A reward model: higher is better. `gain` says how the eval table compares a run with
    its base: `relative` (percent, for scores on a positive scale) or `absolute` (difference,
    for ImageReward, whose base can sit near 0), as the paper's Table 2 does."""

    name: str
    gain: str = "relative"

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        video_frames: int = 8,
    ):
        self.device, self.dtype = device, dtype
        self.batch_size, self.video_frames = batch_size, video_frames

    @abstractmethod
    def score_images(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores of one batch of RGB images with their prompts: float tensor [N]."""

    @torch.no_grad()
    def score(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        frames, owner = [], []
        for index, item in enumerate(images):
            item_frames = frames_of(item, self.video_frames)
            frames += item_frames
            owner += [index] * len(item_frames)
        frame_prompts = [prompts[i] for i in owner]
        scores = []
        for start in range(0, len(frames), self.batch_size):
            stop = start + self.batch_size
            scores.append(self.score_images(frames[start:stop], frame_prompts[start:stop]).float().cpu())
        flat = torch.cat(scores) if scores else torch.zeros(0)
        owner_t = torch.tensor(owner, dtype=torch.long)
        total = torch.zeros(len(images)).index_add_(0, owner_t, flat)
        count = torch.zeros(len(images)).index_add_(0, owner_t, torch.ones_like(flat))
        return total / count


class LinearStack(nn.Module):
    """The head of the LAION aesthetic predictor and of ImageReward: Linear layers with dropout
    between them and no activation (the originals comment their ReLUs out). Built from a state
    dict with keys `layers.{i}.weight/bias`, so the layer sizes come from the file."""

    def __init__(self, sizes: list[tuple[int, int]], indices: list[int]):
        super().__init__()
        self.indices = indices
        pairs = zip(indices, sizes, strict=True)
        self.layers = nn.ModuleDict({str(i): nn.Linear(n_in, n_out) for i, (n_in, n_out) in pairs})

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], where: str) -> "LinearStack":
        indices = sorted(
            int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")
        )
        if not indices:
            raise ScorerError(f"{where}: no layers.N.weight tensors (keys: {', '.join(list(state)[:5])} ...)")
        sizes = [tuple(state[f"layers.{i}.weight"].shape[::-1]) for i in indices]
        for (_, n_out), (n_in, _) in zip(sizes, sizes[1:], strict=False):
            if n_out != n_in:
                raise ScorerError(f"{where}: layer sizes do not chain: {sizes}")
        if sizes[-1][1] != 1:
            raise ScorerError(f"{where}: the last layer must output 1 score, got {sizes[-1][1]}")
        head = cls(sizes, indices)
        expected = {f"layers.{i}.{p}" for i in indices for p in ("weight", "bias")}
        unknown = set(state) - expected
        if unknown or expected - set(state):
            raise ScorerError(
                f"{where}: unexpected tensors {sorted(unknown)} or missing {sorted(expected - set(state))}"
            )
        head.load_state_dict(state)
        return head

    @property
    def in_features(self) -> int:
        return self.layers[str(self.indices[0])].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in self.indices:
            x = self.layers[str(i)](x)
        return x.squeeze(-1)


def load_state_file(path: Path, scorer: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights_only: nothing in it is executed).
    A {'state_dict': ...} wrapper and DataParallel's `module.` prefix are taken off."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ScorerError(f"scorer '{scorer}': cannot read weights {path}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ScorerError(f"scorer '{scorer}': {path} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state
