"""Fault injection on recipes, overrides and CLI arguments: every user mistake ends in one line
on stderr that names the key (or file, or argument) and the bad value; exit status 2 for a
config or usage error, 1 for a run error; never a traceback, and no wrong value goes through."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from vipo.engine.cli import main

TINY_RUN = ["train.max_steps=1", "data.num_pairs=8", "train.batch_pairs=2", "train.log_every_steps=1"]


def vipo(argv, capsys):
    """(exit status, stderr lines) of the CLI run in-process; a traceback fails the test."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    except BaseException as err:  # noqa: BLE001 - the very thing this file hunts
        pytest.fail(f"{' '.join(argv)} raised {type(err).__name__}: {err}")
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code, lines, expected_code, names):
    assert code == expected_code, f"exit {code}, stderr {lines}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {lines}"
    assert "Traceback" not in lines[0]
    assert lines[0].startswith("vipo"), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad recipes, a data folder, a file where a folder belongs, a tiny manifest of 2 pairs;
    written once for the module (no case writes into it but the runs, each to its own folder)."""
    tmp_path = tmp_path_factory.mktemp("faults")
    write = {
        "random.yaml": bytes(range(128, 256)) * 4,
        "empty.yaml": b"",
        "comments.yaml": b"# a recipe\n# still to be written\n",
        "list.yaml": b"- model\n- data\n",
        "scalar.yaml": b"just some words\n",
        "tag.yaml": b"loss: !!python/object/apply:os.system ['echo pwned']\n",
        "tag-object.yaml": b"loss: !!python/object:collections.OrderedDict {}\n",
        "duplicate.yaml": b"loss:\n  beta: 100.0\n  alpha: 1.0\n  beta: 200.0\n",
        "duplicate-section.yaml": b"loss:\n  beta: 100.0\noptim:\n  lr: 1.0e-6\nloss:\n  alpha: 1.0\n",
        "unclosed.yaml": b"optim:\n  betas: [0.9, 0.99\n",
        "tabs.yaml": b"loss:\n\tbeta: 1.0\n",
        "nul.yaml": b"loss:\n  beta: 1\x00\n",
        "wrong-type.yaml": b"train:\n  max_steps: many\n",
        "section-scalar.yaml": b"loss: 3\n",
        "unknown-section.yaml": b"losses:\n  beta: 1.0\n",
        "notes.txt": b"beta five thousand, alpha eight\n",
        "bad.json": b"{not json",
        "list.json": b"[1, 2]",
        "no-family.json": b'{"unet": {}}',
        "flow-duplicate.yaml": b"loss: {beta: 1.0, beta: 2.0}\n",
        "null-section.yaml": b"loss:\noptim:\n  lr: 1.0e-6\n",
        "occupied": b"a file where the run folder should go\n",
    }
    write["huge.yaml"] = b"# " + b"x" * (2 << 20) + b"\n"
    for name, data in write.items():
        (tmp_path / name).write_bytes(data)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "image.png")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a red square"], "label_0": [1.0]}), tmp_path / "data.parquet")
    (tmp_path / "folder").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    pairs = [
        {"prompt": "red", "winner": "0.png", "loser": "1.png"},
        {"prompt": "red", "winner": "2.png", "loser": "3.png"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return tmp_path


def show(*overrides):
    return ["config", "show", "demo", *overrides]


# (id, argv with {tmp} for the files folder, exit status, what the one line must name)
CASES = [
    # -- the recipe file ------------------------------------------------------------------------
    ("binary-recipe", ["config", "show", "{tmp}/random.yaml"], 2, ["random.yaml", "is not a recipe (YAML)"]),
    ("png-recipe", ["config", "show", "{tmp}/image.png"], 2, ["image.png", "is not a recipe (YAML)"]),
    (
        "parquet-recipe",
        ["config", "show", "{tmp}/data.parquet"],
        2,
        ["data.parquet", "is not a recipe (YAML)"],
    ),
    (
        # `vipo data stats` takes a data path: read as Pick-a-Pic parquet, it lacks the columns.
        "data-stats-parquet",
        ["data", "stats", "{tmp}/data.parquet", "-q"],
        1,
        ["data.parquet", "missing column(s) jpg_0"],
    ),
    ("text-recipe", ["config", "show", "{tmp}/notes.txt"], 2, ["notes.txt", "is not a recipe (YAML)"]),
    (
        "list-recipe",
        ["config", "show", "{tmp}/list.yaml"],
        2,
        ["list.yaml", "is not a recipe (YAML)", "list"],
    ),
    ("scalar-recipe", ["config", "show", "{tmp}/scalar.yaml"], 2, ["scalar.yaml", "is not a recipe (YAML)"]),
    ("empty-recipe", ["config", "show", "{tmp}/empty.yaml"], 2, ["recipe", "empty.yaml", "is empty"]),
    ("comments-only", ["config", "show", "{tmp}/comments.yaml"], 2, ["comments.yaml", "is empty"]),
    ("python-tag", ["config", "show", "{tmp}/tag.yaml"], 2, ["tag.yaml", "python/object/apply", "line 1"]),
    (
        "python-object-tag",
        ["config", "show", "{tmp}/tag-object.yaml"],
        2,
        ["tag-object.yaml", "python/object"],
    ),
    (
        "duplicate-key",
        ["config", "show", "{tmp}/duplicate.yaml"],
        2,
        ["duplicate.yaml", "loss.beta", "line 4", "line 2"],
    ),
    (
        "duplicate-in-flow-mapping",
        ["config", "show", "{tmp}/flow-duplicate.yaml"],
        2,
        ["loss.beta", "twice", "line 1"],
    ),
    (
        "duplicate-section",
        ["config", "show", "{tmp}/duplicate-section.yaml"],
        2,
        ["'loss'", "line 5", "line 1"],
    ),
    ("unclosed-list", ["config", "show", "{tmp}/unclosed.yaml"], 2, ["unclosed.yaml", "line"]),
    ("tab-indent", ["config", "show", "{tmp}/tabs.yaml"], 2, ["tabs.yaml", "line 2"]),
    ("nul-byte", ["config", "show", "{tmp}/nul.yaml"], 2, ["nul.yaml", "is not a recipe (YAML)"]),
    (
        "wrong-type-in-file",
        ["config", "show", "{tmp}/wrong-type.yaml"],
        2,
        ["wrong-type.yaml", "train.max_steps", "'many'"],
    ),
    (
        "section-is-a-scalar",
        ["config", "show", "{tmp}/section-scalar.yaml"],
        2,
        ["section-scalar.yaml", "loss", "3"],
    ),
    ("unknown-section", ["config", "show", "{tmp}/unknown-section.yaml"], 2, ["'losses'", "model, data"]),
    ("recipe-is-a-folder", ["config", "show", "{tmp}/folder"], 2, ["folder", "directory"]),
    (
        "recipe-below-a-file",
        ["config", "show", "{tmp}/occupied/recipe.yaml"],
        2,
        ["occupied/recipe.yaml", "cannot read"],
    ),
    (
        "recipe-too-large",
        ["config", "show", "{tmp}/huge.yaml"],
        2,
        ["huge.yaml", "is not a recipe (YAML)", "bytes"],
    ),
    ("recipe-file-missing", ["config", "show", "{tmp}/missing.yaml"], 2, ["missing.yaml", "not found"]),
    ("recipe-name-unknown", ["config", "show", "no-such-recipe"], 2, ["no-such-recipe", "demo"]),
    ("train-recipe-unknown", ["train", "no-such-recipe"], 2, ["no-such-recipe", "built-in"]),
    # -- malformed overrides --------------------------------------------------------------------
    ("override-without-value", show("loss.beta"), 2, ["'loss.beta'", "section.key=value"]),
    ("override-without-key", show("=3"), 2, ["'=3'", "section.key=value"]),
    ("override-empty-part", show("loss..beta=1"), 2, ["loss..beta", "empty"]),
    ("override-leading-dot", show(".beta=1"), 2, [".beta", "empty"]),
    ("override-below-a-value", show("loss.beta.x=1"), 2, ["loss.beta.x", "loss.beta", "not a section"]),
    ("override-a-whole-section", show("loss=3"), 2, ["loss", "section"]),
    ("override-a-section-with-a-mapping", show("loss={beta: 1}"), 2, ["loss", "section"]),
    ("override-unknown-section", show("losses.beta=1"), 2, ["'losses'", "model, data"]),
    ("override-unknown-key", show("loss.betta=1"), 2, ["'loss.betta'", "beta, alpha"]),
    (
        "override-value-with-a-tag",
        show("loss.beta=!!python/object/apply:os.system [ls]"),
        2,
        ["loss.beta", "float"],
    ),
    ("override-binary-value", show("model.path=!!binary aGVsbG8="), 2, ["model.path", "b'hello'"]),
    ("override-list-unclosed", show("data.buckets=[[64,64]"), 2, ["data.buckets", "[[64,64]"]),
    # -- types ------------------------------------------------------------------------------------
    ("float-not-a-number", show("loss.beta=abc"), 2, ["loss.beta", "float", "'abc'"]),
    ("float-inf", show("loss.alpha=inf"), 2, ["loss.alpha", "finite", "inf"]),
    ("float-nan", show("loss.alpha=.nan"), 2, ["loss.alpha", "finite", "nan"]),
    ("float-overflow", show("loss.beta=1e999"), 2, ["loss.beta", "finite", "1e999"]),
    ("float-huge-int", show("loss.beta=1" + "0" * 400), 2, ["loss.beta", "finite"]),
    ("int-fraction", show("train.batch_pairs=2.5"), 2, ["train.batch_pairs", "int", "2.5"]),
    ("int-bool", show("train.batch_pairs=true"), 2, ["train.batch_pairs", "int", "True"]),
    ("int-null", show("train.max_steps=null"), 2, ["train.max_steps", "int", "None"]),
    ("bool-word", show("optim.scale_lr=maybe"), 2, ["optim.scale_lr", "bool", "'maybe'"]),
    (
        "choice-objective",
        show("loss.objective=ppo"),
        2,
        ["loss.objective", "'sft', 'dpo', 'poly_dpo'", "'ppo'"],
    ),
    ("choice-family", show("model.family=sd2"), 2, ["model.family", "'sdxl'", "'sd2'"]),
    ("choice-source", show("data.source=webdataset"), 2, ["data.source", "'manifest'", "'webdataset'"]),
    ("choice-strategy", show("parallel.strategy=mpi"), 2, ["parallel.strategy", "'fsdp'", "'mpi'"]),
    (
        "choice-precision",
        show("train.mixed_precision=fp16"),
        2,
        ["train.mixed_precision", "'bf16'", "'fp16'"],
    ),
    ("choice-report-to", show("train.report_to=[mlflow]"), 2, ["train.report_to", "'wandb'", "mlflow"]),
    ("betas-one-value", show("optim.betas=[0.9]"), 2, ["optim.betas", "tuple[float, float]", "0.9"]),
    ("buckets-flat", show("data.buckets=[64,64]"), 2, ["data.buckets", "64"]),
    # -- ranges -----------------------------------------------------------------------------------
    ("betas-above-one", show("optim.betas=[2,3]"), 2, ["optim.betas", "[0, 1)", "2"]),
    ("beta2-one", show("optim.betas=[0.9,1.0]"), 2, ["optim.betas", "[0, 1)", "1.0"]),
    ("beta-negative-value", show("optim.betas=[-0.1,0.99]"), 2, ["optim.betas", "[0, 1)", "-0.1"]),
    ("loss-beta-zero", show("loss.beta=0"), 2, ["loss.beta", "> 0", "0"]),
    ("loss-beta-negative", show("loss.beta=-5"), 2, ["loss.beta", "> 0", "-5"]),
    ("loss-beta-zero-dpo", show("loss.objective=dpo", "loss.beta=0"), 2, ["loss.beta", "dpo"]),
    ("lr-zero", show("optim.lr=0"), 2, ["optim.lr", "> 0"]),
    ("weight-decay-negative", show("optim.weight_decay=-0.01"), 2, ["optim.weight_decay", ">= 0", "-0.01"]),
    ("adam-eps-zero", show("optim.eps=0"), 2, ["optim.eps", "> 0", "got 0"]),
    ("max-grad-norm-negative", show("optim.max_grad_norm=-1"), 2, ["optim.max_grad_norm", ">= 0", "-1"]),
    ("warmup-negative", show("optim.warmup_steps=-1"), 2, ["optim.warmup_steps", ">= 0", "-1"]),
    ("device-tpu", show("train.device=tpu"), 2, ["train.device", "'tpu'", "auto, cpu, cuda"]),
    ("device-cuda-word", show("train.device=cuda:first"), 2, ["train.device", "'cuda:first'", "cuda:N"]),
    ("device-empty", show("train.device="), 2, ["train.device", "''"]),
    ("batch-zero", show("train.batch_pairs=0"), 2, ["train.batch_pairs", ">= 1", "0"]),
    ("grad-accum-zero", show("train.grad_accum_steps=0"), 2, ["train.grad_accum_steps", ">= 1"]),
    ("max-steps-negative", show("train.max_steps=-1"), 2, ["train.max_steps", ">= 0"]),
    ("log-every-zero", show("train.log_every_steps=0"), 2, ["train.log_every_steps", ">= 1"]),
    ("seed-negative", show("train.seed=-1"), 2, ["train.seed", ">= 0", "-1"]),
    (
        "checkpoint-minutes-negative",
        show("train.checkpoint_every_minutes=-5"),
        2,
        ["train.checkpoint_every_minutes"],
    ),
    ("nonfinite-steps-zero", show("train.max_nonfinite_steps=0"), 2, ["train.max_nonfinite_steps", ">= 1"]),
    ("output-dir-empty", show("train.output_dir="), 2, ["train.output_dir", "empty"]),
    (
        "output-dir-below-a-file",
        show("train.output_dir={tmp}/occupied/run"),
        2,
        ["train.output_dir", "occupied", "file"],
    ),
    ("model-path-empty", show("model.path="), 2, ["model.path", "empty"]),
    ("init-from-empty", show("model.init_from="), 2, ["model.init_from", "empty"]),
    (
        "report-to-twice",
        show("train.report_to=[tensorboard,tensorboard]"),
        2,
        ["train.report_to", "'tensorboard'", "twice"],
    ),
    (
        "output-dir-is-a-file",
        show("train.output_dir={tmp}/occupied"),
        2,
        ["train.output_dir", "occupied", "file"],
    ),
    ("flip-prob-above-one", show("data.flip_prob=1.5"), 2, ["data.flip_prob", "[0, 1]", "1.5"]),
    ("hflip-prob-negative", show("data.hflip_prob=-0.5"), 2, ["data.hflip_prob", "[0, 1]", "-0.5"]),
    ("caption-dropout-one", show("data.caption_dropout=1"), 2, ["data.caption_dropout", "[0, 1)"]),
    ("bad-fraction-two", show("data.max_bad_fraction=2"), 2, ["data.max_bad_fraction", "[0, 1]"]),
    ("num-frames-zero", show("data.num_frames=0"), 2, ["data.num_frames", ">= 1", "0"]),
    ("frame-stride-zero", show("data.frame_stride=0"), 2, ["data.frame_stride", ">= 1", "0"]),
    ("fps-negative", show("data.fps=-1"), 2, ["data.fps", ">= 0", "-1"]),
    ("bucket-step-small", show("data.bucket_step=4"), 2, ["data.bucket_step", ">= 8", "4"]),
    ("bucket-area-negative", show("data.bucket_area=-1"), 2, ["data.bucket_area", ">= 0", "-1"]),
    (
        "bucket-area-below-a-step",
        show("data.bucket_area=100"),
        2,
        ["data.bucket_area", "100", "data.bucket_step"],
    ),
    ("bucket-side-zero", show("data.buckets=[[0,64]]"), 2, ["data.buckets", "[0, 64]"]),
    ("bucket-twice", show("data.buckets=[[64,64],[64,64]]"), 2, ["data.buckets", "[64, 64]", "twice"]),
    (
        "buckets-and-area",
        show("data.buckets=[[64,64]]", "data.bucket_area=4096"),
        2,
        ["data.buckets", "data.bucket_area"],
    ),
    ("resolution-small", show("data.resolution=4"), 2, ["data.resolution", ">= 8", "4"]),
    ("num-pairs-zero", show("data.num_pairs=0"), 2, ["data.num_pairs", ">= 1"]),
    ("prefetch-negative", show("data.prefetch_batches=-1"), 2, ["data.prefetch_batches", ">= 0"]),
    (
        "batch-above-procedural-pairs",
        show("data.num_pairs=4", "train.batch_pairs=8"),
        2,
        ["train.batch_pairs", "8", "4"],
    ),
    ("lora-rank-negative", show("model.lora_rank=-1"), 2, ["model.lora_rank", ">= 0"]),
    ("shard-size-negative", show("parallel.shard_size=-1"), 2, ["parallel.shard_size", ">= 0"]),
    ("demo-held-out-zero", show("demo.held_out_pairs=0"), 2, ["demo.held_out_pairs", ">= 1"]),
    ("demo-sft-lr-zero", show("demo.sft_lr=0"), 2, ["demo.sft_lr", "> 0"]),
    ("demo-sft-steps-negative", show("demo.sft_steps=-1"), 2, ["demo.sft_steps", ">= 0"]),
    # -- combinations -----------------------------------------------------------------------------
    ("dpo-with-alpha", show("loss.objective=dpo", "loss.alpha=8"), 2, ["loss.alpha", "'dpo'"]),
    ("hinge-with-alpha", show("loss.loss_type=hinge", "loss.alpha=8"), 2, ["loss.alpha", "'hinge'"]),
    ("unknown-loss-type", show("loss.loss_type=robust"), 2, ["loss.loss_type", "'robust'"]),
    ("adapter-without-lora", show("reference.mode=adapter"), 2, ["reference.mode", "model.lora_rank"]),
    ("precomputed-without-cache", show("reference.mode=precomputed"), 2, ["reference.mode", "data.cache"]),
    (
        "keep-ties-with-dpo",
        show("data.source=pickapic", "data.path={tmp}/data.parquet", "data.keep_ties=true"),
        2,
        ["data.keep_ties", "sft"],
    ),
    ("manifest-without-path", show("data.source=manifest"), 2, ["data.source", "data.path"]),
    (
        "manifest-is-a-folder",
        show("data.source=manifest", "data.path={tmp}/folder"),
        2,
        ["data.path", "folder", "manifest", "file"],
    ),
    (
        "video-manifest-is-a-folder",
        show("data.source=video", "data.path={tmp}/folder"),
        2,
        ["data.path", "folder"],
    ),
    (
        "path-for-procedural",
        show("data.path={tmp}/pairs.jsonl"),
        2,
        ["data.path", "procedural", "data.source"],
    ),
    ("family-of-another-config", show("model.family=sdxl"), 2, ["model.config", "sd15-tiny", "sd15", "sdxl"]),
    (
        "config-not-found",
        show("model.config=no-such-model"),
        2,
        ["model.config", "no-such-model", "sd15-tiny"],
    ),
    ("config-json-not-found", show("model.config={tmp}/missing.json"), 2, ["model.config", "missing.json"]),
    ("config-json-broken", show("model.config={tmp}/bad.json"), 2, ["model.config", "bad.json", "JSON"]),
    (
        "config-json-a-list",
        show("model.config={tmp}/list.json"),
        2,
        ["model.config", "list.json", "JSON object"],
    ),
    (
        "config-json-no-family",
        show("model.config={tmp}/no-family.json"),
        2,
        ["model.config", "no-family.json", "family"],
    ),
    # -- command-line arguments -------------------------------------------------------------------
    ("unknown-command", ["fly"], 2, ["'fly'"]),
    ("train-without-recipe", ["train"], 2, ["recipe"]),
    ("unknown-flag", ["train", "demo", "--fast"], 2, ["--fast"]),
    ("config-without-action", ["config"], 2, ["ACTION"]),
    ("local-rank-not-int", ["--local_rank=abc", "config", "keys"], 2, ["--local_rank", "'abc'"]),
    ("stats-unknown-source", ["data", "stats", "--source", "webdataset"], 2, ["--source", "'webdataset'"]),
    ("stats-without-recipe", ["data", "stats"], 1, ["recipe", "--source"]),
    ("plot-missing-run", ["plot", "{tmp}/no-run"], 1, ["no-run"]),
]


@pytest.mark.parametrize("argv, code, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_ends_in_one_line_naming_it(files, capsys, argv, code, names):
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    assert_one_line(*vipo(argv, capsys), code, [n.replace("{tmp}", str(files)) for n in names])


def test_the_sweep_is_at_least_fifty_cases_with_unique_ids():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 50 and len(set(ids)) == len(ids)


def test_overrides_after_a_flag_are_still_overrides(capsys):
    assert main(["config", "show", "--json", "demo", "loss.alpha=8"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["alpha"] == 8.0


def test_an_override_fills_a_section_the_recipe_left_empty(files, capsys):
    assert main(["config", "show", "--json", str(files / "null-section.yaml"), "loss.beta=7"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["beta"] == 7.0


def test_a_key_given_twice_on_the_command_line_takes_the_last_value(capsys):
    assert main(["config", "show", "--json", "demo", "loss.beta=1", "loss.beta=2"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["beta"] == 2.0


def test_the_sampler_names_the_global_batch_and_what_fits():
    from vipo.loaders.sampler import BatchLargerThanData, PairSampler

    with pytest.raises(
        BatchLargerThanData,
        match=r"train.batch_pairs=8 \(4 per rank x 2 ranks\) is more than the 7 "
        r"pairs of the data set \(at most 6 fit, a multiple of 2 ranks\)",
    ):
        PairSampler(7, 4, seed=0, rank=0, world_size=2)
    assert issubclass(BatchLargerThanData, ValueError)  # engine/data.py turns it into a RunError


def test_sft_does_not_need_a_positive_beta(capsys):
    assert main(["config", "show", "--json", "demo", "loss.objective=sft", "loss.beta=0"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["beta"] == 0.0


def test_a_model_config_of_the_family_and_a_folder_for_pickapic_are_fine(files, capsys):
    overrides = ["model.family=sdxl", "model.config=sdxl-tiny", "data.source=pickapic", f"data.path={files}"]
    assert main(["config", "show", "--json", "demo", *overrides]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["model"]["config"], shown["data"]["path"]) == ("sdxl-tiny", str(files))


# -- cases that need the run to start (`vipo train`, tiny) --------------------------------------


def test_a_batch_larger_than_the_manifest_names_train_batch_pairs(files, capsys):
    argv = [
        "train",
        "-q",
        "demo",
        *TINY_RUN,
        "train.batch_pairs=8",
        "data.source=manifest",
        f"data.path={files / 'pairs.jsonl'}",
        f"train.output_dir={files / 'run'}",
    ]
    # Found once the manifest is read: a run error (exit 1), naming the key, the count and the fix.
    assert_one_line(
        *vipo(argv, capsys), 1, ["train.batch_pairs=8", "2 pairs", "at most 2", "lower train.batch_pairs"]
    )


def test_the_demo_with_more_batch_than_pairs_names_the_fix(files, capsys):
    argv = [
        "train",
        "-q",
        "demo",
        "data.num_pairs=4",
        "train.batch_pairs=8",
        "train.max_steps=1",
        f"train.output_dir={files / 'demo-run'}",
    ]
    assert_one_line(*vipo(argv, capsys), 2, ["train.batch_pairs", "8", "4 pairs", "data.num_pairs"])


def test_train_refuses_an_output_dir_that_is_a_file(files, capsys):
    argv = ["train", "-q", "demo", *TINY_RUN, f"train.output_dir={files / 'occupied'}"]
    assert_one_line(*vipo(argv, capsys), 2, ["train.output_dir", "occupied"])


# -- the real command, in a subprocess --------------------------------------------------------


def run_vipo(*args):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TRITON_INTERPRET": "1",
        "DS_ACCELERATOR": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-m", "vipo.engine", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.parametrize(
    "args, code, names",
    [
        (["config", "show", "{tmp}/image.png"], 2, ["image.png", "is not a recipe (YAML)"]),
        (["config", "show", "{tmp}/duplicate.yaml"], 2, ["loss.beta", "line 4"]),
        (["config", "show", "demo", "train.device=tpu"], 2, ["train.device", "'tpu'"]),
        (["train", "demo", "--fast"], 2, ["--fast"]),
    ],
    ids=["png-recipe", "duplicate-key", "device-tpu", "unknown-flag"],
)
def test_the_installed_command_prints_one_line(files, args, code, names):
    result = run_vipo(*[a.replace("{tmp}", str(files)) for a in args])
    lines = result.stderr.strip().splitlines()
    assert_one_line(result.returncode, lines, code, names)


def test_the_installed_command_ends_a_run_error_in_one_line_after_its_logs(files, tmp_path):
    result = run_vipo(
        "train",
        "-q",
        "demo",
        *TINY_RUN,
        "train.batch_pairs=8",
        "data.source=manifest",
        f"data.path={files / 'pairs.jsonl'}",
        f"train.output_dir={tmp_path / 'run'}",
    )
    lines = result.stderr.strip().splitlines()
    # What came before the error is the run's INFO log (stderr by design), never a traceback.
    assert all(" INFO " in line for line in lines[:-1]), lines
    assert_one_line(result.returncode, lines[-1:], 1, ["train.batch_pairs=8", "2 pairs"])
