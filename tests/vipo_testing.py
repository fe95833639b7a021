"""Helpers the tests share: numeric assertions, tiny models and their configs, weight snapshots."""

import torch

# The user property under which tests/kernels/test_compile.py leaves its ahead-of-time compile
# table; conftest.py prints it at the end of the run (reports carry it back from xdist workers).
AOT_TABLE = "aot_table"


def error_vs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute error of `actual` against a float64 `expected`."""
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "tensor") -> None:
    """torch.testing.assert_close in float64 on the CPU (dtypes may differ: a float32 result
    against its float64 oracle), its report (mismatch count, greatest error and its index)
    prefixed by `name`."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, equal_nan=True, msg=lambda message: f"{name}: {message}"
    )


def make_sd15_folder(root, *, resolution: int = 16):
    """A tiny SD1.5 model saved as a diffusers pipeline folder, as `model.path` expects a
    downloaded one (vipo.engine.models.folders)."""
    from vipo.engine.models.folders import write_sd15_folder

    return write_sd15_folder(root, resolution=resolution)


def tiny_family_config(tmp_path, family, *overrides):
    """A one-step run config of `family`'s tiny architecture on procedural pairs."""
    from vipo.engine.config import load_config

    return load_config(
        None,
        [
            f"model.family={family}",
            f"model.config={family}-tiny",
            "data.num_pairs=16",
            "data.resolution=16",
            "train.batch_pairs=2",
            "train.max_steps=1",
            "train.log_every_steps=1",
            "loss.beta=500",
            "optim.lr=1e-4",
            f"train.output_dir={tmp_path}",
            *overrides,
        ],
    )


_TINY_ADAPTERS: dict = {}


def tiny_adapter(family):
    """One random-weight tiny adapter per family, shared by the tests that only read it."""
    if family not in _TINY_ADAPTERS:
        from vipo.engine.models import build_model

        torch.manual_seed(0)
        cfg = tiny_family_config("unused", family)
        _TINY_ADAPTERS[family] = build_model(cfg.model, torch.device("cpu"), vocabulary=None)
    return _TINY_ADAPTERS[family]


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> set:
    """Names of the tensors of `module` that differ from the snapshot `before`."""
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def stored_numel(module) -> int:
    """Elements of the stored weights: parameters and persistent buffers."""
    stored = module.state_dict().keys()
    return sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers() if n in stored
    )


def write_clip_tokenizer(folder, words, max_length=16):
    """A CLIP BPE tokenizer over `words` (each word a chain of merges), from vocab/merges files."""
    import json

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = [], []
    for word in sorted(set(words)):
        parts = [*word[:-1], word[-1] + "</w>"]
        tokens += parts
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            tokens.append(parts[0])
    # Start and end of text last, as in CLIP's vocabulary (49406, 49407): OpenAI's CLIP pools the
    # text at the largest token id.
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*tokens, "<|startoftext|>", "<|endoftext|>"]))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in dict.fromkeys(merges))
    )
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def write_clips(root, count, *, frame_weights=None):
    """`count` pairs of 6-frame 32x24 VP9 clips (winner bright, loser dark) and their video
    manifest clips.jsonl; `frame_weights` (a list) goes on every line."""
    import json

    import av
    import numpy as np

    lines = []
    for i in range(count):
        for name, level in ((f"w{i}.webm", 180), (f"l{i}.webm", 60)):
            with av.open(str(root / name), "w") as container:
                stream = container.add_stream("libvpx-vp9", rate=10)
                stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
                for _ in range(6):
                    frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), level, np.uint8), format="rgb24")
                    container.mux(stream.encode(frame))
                container.mux(stream.encode())
        line = {"prompt": f"clip {i}", "winner": f"w{i}.webm", "loser": f"l{i}.webm"}
        if frame_weights is not None:
            line["frame_weights"] = frame_weights
        lines.append(json.dumps(line))
    (root / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return root / "clips.jsonl"
