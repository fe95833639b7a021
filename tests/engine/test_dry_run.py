"""`vipo train RECIPE --dry-run`: config, data sample, meta-device model and memory, in seconds,
with nothing trained or written."""

import json

from PIL import Image

from vipo.engine.cli import main


def write_manifest(root, corrupt: int):
    lines = []
    for i in range(6):
        for side in ("w", "l"):
            path = root / f"{side}{i}.png"
            if side == "w" and i == corrupt:
                path.write_bytes(b"not an image")
            else:
                Image.new("RGB", (24, 24), (40 * i, 0, 0)).save(path)
        lines.append(json.dumps({"prompt": f"p{i}", "winner": f"w{i}.png", "loser": f"l{i}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def test_a_dry_run_checks_data_and_model_and_writes_nothing(tmp_path, capsys):
    manifest = write_manifest(tmp_path, corrupt=3)
    out = tmp_path / "run"
    args = ["train", "demo", "data.source=manifest", f"data.path={manifest}", f"train.output_dir={out}"]
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"data: manifest {manifest}: 6 pairs; a sample of 6: decoded 5, 1 bad" in text
    assert "w3.png" in text and "policy memory per GPU before activations" in text
    assert not out.exists()  # no run folder, no checkpoint


def test_a_full_size_model_is_built_on_the_meta_device(tmp_path, capsys):
    # The SD1.5 recipe's UNet at full size (860M), LoRA off: gradients and AdamW state as counted.
    overrides = [
        "data.source=procedural",
        "data.path=null",
        "data.resolution=64",
        f"train.output_dir={tmp_path}",
    ]
    assert main(["train", "vipo-sd15-poly", *overrides, "--dry-run"]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("model: "))
    # SD1.5's UNet has 859,520,964 parameters: fp32 weights and gradients 3.20 GiB each, AdamW twice.
    assert line.startswith("model: 859.52M parameters (100.0% trainable), policy weights 3.20 GiB"), line
    assert "gradients 3.20, AdamW state 6.40" in text and "nothing was read" in line


def test_a_dry_run_of_bad_data_ends_in_one_line(tmp_path, capsys):
    overrides = ["data.source=manifest", f"data.path={tmp_path / 'missing.jsonl'}"]
    assert main(["train", "demo", *overrides, "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl" in err[0]
