"""The engine on a tiny SD1.5-shaped model: steps, reference strategies, resume, NaN guard."""

import json

import pytest
import torch

from vipo.engine.config import load_config
from vipo.engine.errors import RunError
from vipo.engine.models.base import repeat_pairs
from vipo.engine.models.tokenizer import WordTokenizer, check_tokenizer
from vipo.engine.trainer import Trainer

from vipo_testing import changed, snapshot


def tiny_config(tmp_path, *overrides):
    return load_config(
        None,
        [
            "model.config=sd15-tiny",
            "data.num_pairs=32",
            "data.resolution=16",
            "train.batch_pairs=2",
            "train.max_steps=2",
            "train.log_every_steps=1",
            "loss.beta=500",
            "optim.lr=1e-4",
            f"train.output_dir={tmp_path}",
            *overrides,
        ],
    )


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_dpo_step_changes_the_policy_and_not_the_reference(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), progress=False)
    policy_before = snapshot(trainer.adapter.network)
    reference_before = snapshot(trainer.reference.network)
    text_before = snapshot(trainer.adapter.text_encoder)
    trainer.train_step()
    assert changed(policy_before, trainer.adapter.network)
    assert not changed(reference_before, trainer.reference.network)
    assert not changed(text_before, trainer.adapter.text_encoder)
    assert not any(p.requires_grad for p in trainer.reference.network.parameters())


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_loss_type_reaches_the_kernel_and_gives_its_loss_at_step_zero(tmp_path, loss_type):
    """At step 0 the policy is the reference: z = 0, so hinge's loss is relu(1 - 0) = 1 and ipo's
    (0 - 1 / beta)^2 (the sigmoid loss would be log 2)."""
    cfg = tiny_config(tmp_path, f"loss.loss_type={loss_type}", "loss.objective=dpo")
    trainer = Trainer(cfg, progress=False)
    policy_before = snapshot(trainer.adapter.network)
    metrics = trainer.train_step()
    expected = 1.0 if loss_type == "hinge" else (1.0 / cfg.loss.beta) ** 2
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-6)
    assert changed(policy_before, trainer.adapter.network)  # both pull z up from 0


def test_adapter_reference_is_the_base_model_and_only_lora_weights_train(tmp_path):
    cfg = tiny_config(tmp_path, "model.lora_rank=4", "reference.mode=adapter")
    trainer = Trainer(cfg, progress=False)
    network = trainer.adapter.network
    before = snapshot(network)
    batch = trainer.next_batch()
    cond = trainer.adapter.encode_prompts(batch.prompts)
    latents = trainer.adapter.encode_pixels(batch.pixels)
    gen = torch.Generator().manual_seed(1)
    x_t, t, target = trainer.adapter.noisy_inputs(latents, gen)
    ref_before = trainer.reference.errors(x_t, t, cond, target)
    for _ in range(2):
        trainer.train_step()
    moved = changed(before, network)
    assert moved and all("lora" in name for name in moved)
    # Adapters off = the untouched base model: the reference errors did not move.
    assert torch.equal(trainer.reference.errors(x_t, t, cond, target), ref_before)
    assert network.training  # switched back after the reference pass


def test_winner_and_loser_share_noise_timestep_and_prompt(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), progress=False)
    latents = torch.randn(6, 3, 16, 16)
    x_t, t, eps = trainer.adapter.noisy_inputs(latents, torch.Generator().manual_seed(0))
    assert torch.equal(eps[:3], eps[3:]) and torch.equal(t[:3], t[3:])
    assert not torch.equal(eps[0], eps[1])
    cond = {"encoder_hidden_states": torch.randn(3, 4, 8)}
    rows = repeat_pairs(cond)["encoder_hidden_states"]
    assert torch.equal(rows[:3], rows[3:])


def test_caption_dropout_is_drawn_per_pair(tmp_path):
    trainer = Trainer(
        tiny_config(tmp_path, "data.caption_dropout=0.5", "train.batch_pairs=16"), progress=False
    )
    batch = trainer.next_batch()
    # One prompt per pair: the conditioning of a pair's winner and loser is the same row.
    assert len(batch.prompts) == batch.pairs == 16 and batch.pixels.shape[0] == 32
    assert 0 < batch.prompts.count("") < 16


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    Trainer(tiny_config(straight, "train.max_steps=4"), progress=False).train()
    split = tmp_path / "split"
    Trainer(tiny_config(split, "train.max_steps=2"), progress=False).train()
    resumed = Trainer(tiny_config(split, "train.max_steps=4"), progress=False)
    initial_reference = snapshot(resumed.reference.network)
    resumed.train(resume=True)
    a, b = read_metrics(straight), read_metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7), (x["step"], x["loss"], y["loss"])
    # The reference after a resume is still the initial model, not the half-trained policy.
    assert not changed(initial_reference, resumed.reference.network)
    assert changed(initial_reference, resumed.adapter.network)


def test_non_finite_losses_skip_the_update_and_stop_with_a_checkpoint_no_resume_picks(tmp_path, monkeypatch):
    from vipo.engine import trainer as trainer_module

    cfg = tiny_config(tmp_path, "train.max_steps=10", "train.max_nonfinite_steps=2")
    trainer = Trainer(cfg, progress=False)
    real = trainer_module.forward_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), {**metrics, "loss": metrics["loss"] * float("nan")}

    monkeypatch.setattr(trainer_module, "forward_loss", poisoned)
    before = snapshot(trainer.adapter.network)
    with pytest.raises(RunError, match="2 non-finite steps in a row"):
        trainer.train()
    assert not changed(before, trainer.adapter.network)  # no update was applied
    assert trainer.nonfinite_total == 2
    # Kept for inspection, marked, and not `latest`: a resume starts from the last good checkpoint.
    stop = tmp_path / "checkpoints" / "step-000002.nonfinite"
    assert (stop / "model.safetensors").exists()
    assert json.loads((stop / "state.json").read_text())["stopped"] == "nonfinite"
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_sft_on_winners_trains_without_a_reference(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "loss.objective=sft"), progress=False)
    assert trainer.reference is None
    before = snapshot(trainer.adapter.network)
    summary = trainer.train()
    assert summary["loss_is_finite"] and changed(before, trainer.adapter.network)


def test_sft_on_one_winner_a_step_has_the_errors_and_gradient_of_that_winner(tmp_path):
    """One pair a GPU: SFT on winners reduces one sample, an odd count for the pair kernel."""
    from vipo.engine.objectives import any_count_errors

    summary = Trainer(
        tiny_config(tmp_path, "loss.objective=sft", "train.batch_pairs=1"), progress=False
    ).train()
    assert summary["steps"] == 2 and summary["loss_is_finite"]
    pred, target = torch.randn(3, 4, 5, 5, requires_grad=True), torch.randn(3, 4, 5, 5)
    weights = torch.rand(3, 1, 5, 5)
    errors = any_count_errors(pred, target, weights)
    expected = (weights * (pred.detach().double() - target.double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(errors, expected, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(errors.sum(), pred)  # each sample's own, once: 2 w (p - t) / N
    torch.testing.assert_close(grad, 2 * weights * (pred.detach() - target) / 100)


def test_a_checkpoint_is_complete_and_named_by_latest(tmp_path):
    Trainer(tiny_config(tmp_path, "train.checkpoint_every_steps=1"), progress=False).train()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-000002"
    for name in ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "config.yaml"):
        assert (root / "step-000002" / name).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_tokenizer_without_its_files_is_refused():
    class TwoWordTokenizer:
        def __len__(self):
            return 2

    with pytest.raises(RunError, match="vocabulary of 2"):
        check_tokenizer(TwoWordTokenizer(), 49408, "model/tokenizer")


def test_word_tokenizer_pads_and_maps_known_words():
    tok = WordTokenizer(16, 6, ["red", "circle"])
    ids = tok(["a red circle", "red"])
    assert ids.shape == (2, 6)
    assert ids[0, 2].item() == ids[1, 1].item()  # "red" has one id
    assert ids[0, 1].item() == 3  # unknown word "a" -> UNK in a closed vocabulary


def test_a_model_path_that_is_not_a_diffusers_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="missing unet/, text_encoder/"):
        Trainer(tiny_config(tmp_path, f"model.path={tmp_path}"), progress=False)


def test_init_from_starts_policy_and_reference_from_a_checkpoint(tmp_path):
    sft = Trainer(
        tiny_config(tmp_path / "sft", "loss.objective=sft", "loss.winners_only=true"), progress=False
    )
    sft.train()
    trained = snapshot(sft.adapter.network)
    checkpoint = tmp_path / "sft" / "checkpoints" / "step-000002"
    dpo = Trainer(tiny_config(tmp_path / "dpo", f"model.init_from={checkpoint}"), progress=False)
    for module in (dpo.adapter.network, dpo.reference.network):
        state = module.state_dict()
        assert all(torch.equal(state[k], trained[k].to(state[k].dtype)) for k in trained)
    # A fresh model with the same seed is not the SFT model: the weights really came from disk.
    fresh = Trainer(tiny_config(tmp_path / "fresh"), progress=False)
    assert changed(trained, fresh.adapter.network)


def test_init_from_a_folder_without_weights_names_it(tmp_path):
    with pytest.raises(RunError, match=r"model.init_from: .*nowhere is not a folder"):
        Trainer(tiny_config(tmp_path, f"model.init_from={tmp_path / 'nowhere'}"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"model.init_from: .*empty is neither a vipo checkpoint"):
        Trainer(tiny_config(tmp_path, f"model.init_from={tmp_path / 'empty'}"), progress=False)


def test_bf16_autocast_trains_with_fp32_weights(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.mixed_precision=bf16"), progress=False)
    before = snapshot(trainer.adapter.network)
    metrics = trainer.train_step()
    assert torch.isfinite(metrics["loss"]) and changed(before, trainer.adapter.network)
    assert all(p.dtype == torch.float32 for p in trainer.adapter.network.parameters())


def test_held_out_accuracy_is_one_half_when_policy_is_the_reference_and_tracks_the_sign(tmp_path):
    from vipo.engine.eval.evaluate import held_out_accuracy
    from vipo.loaders.procedural import ProceduralPairs

    trainer = Trainer(tiny_config(tmp_path), progress=False)
    pairs = ProceduralPairs(6, 16, "clean", seed=3)
    tie = held_out_accuracy(trainer.adapter, trainer.reference, pairs, draws=2, batch_pairs=4)
    assert tie["accuracy"] == 0.5 and tie["pairs"] == 6 and tie["winner_change"] == 0.0

    class Shifted:  # a reference whose error is lower on every winner than on its loser
        def errors(self, x_t, t, cond, target):
            base = trainer.reference.errors(x_t, t, cond, target)
            half = base.shape[0] // 2
            return base + torch.cat([torch.full((half,), -1.0), torch.full((half,), 1.0)])

    # policy - reference error: +1 on winners, -1 on losers -> every loser preferred.
    worse = held_out_accuracy(trainer.adapter, Shifted(), pairs, draws=2, batch_pairs=4)
    assert worse["accuracy"] == 0.0 and worse["winner_change"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_train_compile_compiles_the_policy_and_the_copy_reference_and_trains_like_eager(
    tmp_path, monkeypatch, mode
):
    """The wiring of train.compile (which modules, before sharding, both networks), with torch's
    aot_eager backend: the same graphs as inductor without code generation, so CPU CI can run it."""
    from vipo.engine import models

    eager = Trainer(tiny_config(tmp_path / "eager"), progress=False)
    expected = [float(eager.train_step()["loss"]) for _ in range(2)]
    monkeypatch.setattr(models, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    trainer = Trainer(tiny_config(tmp_path / mode, f"train.compile={mode}"), progress=False)
    for network in (trainer.network, trainer.reference.network):
        compiled = [m for m in network.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        if mode == "full":
            assert compiled == [network]
        else:  # every repeated block, and only those
            assert compiled and {type(m).__name__ for m in compiled} == set(network._repeated_blocks)
    got = [float(trainer.train_step()["loss"]) for _ in range(2)]
    assert got == pytest.approx(expected, rel=1e-5)
    torch._dynamo.reset()


def test_train_compile_full_with_inductor_on_cpu_is_refused_by_name(tmp_path):
    with pytest.raises(RunError, match="train.compile=full gives wrong gradients with inductor on CPU"):
        Trainer(tiny_config(tmp_path, "train.compile=full"), progress=False)


def test_bfloat16_parameters_train_bf16_weights_and_feed_bf16_latents(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "model.param_dtype=bfloat16"), progress=False)
    assert {p.dtype for p in trainer.network.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.reference.network.parameters()} == {torch.bfloat16}
    assert trainer.adapter.dtype == torch.bfloat16
    before = snapshot(trainer.network)
    metrics = trainer.train_step()
    assert torch.isfinite(metrics["loss"]) and changed(before, trainer.network)
