"""vipo.kernels as a drop-in for the loss of diffusers' Diffusion-DPO example.

huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (SD1.5,
LoRA, the reference is the UNet with its adapters disabled) trains with its own loss lines; the
README's replacement computes the reference errors with `sample_errors` and the loss with
`poly_dpo_loss(..., beta=beta_from("diffusers-sd15", beta_dpo), ties="half")`. Here both run the
script's training step on a tiny random UNet and local tensors (latents stand in for the VAE's
output, random embeddings for the text encoder's) from the same seed, and must give the same
losses, implicit accuracies, logged errors and final LoRA weights.

Tolerances: the script forms the four errors of a pair in float32, errors of about 1 whose
combination `ref_diff - model_diff` is about 1e-5, and multiplies it by beta_dpo (2500): its
own z and loss are up to a few 1e-4 off a float64 evaluation at its default beta. That bounds
the agreement (Z_TOL below), not float32's 1e-7. The LoRA updates then differ by what AdamW
makes of gradients that differ by as little.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vipo.kernels import beta_from, poly_dpo_loss, sample_errors

from vipo_testing import assert_close

pytest.importorskip("diffusers")
pytest.importorskip("peft")

STEPS = 3
PAIRS = 2
LATENT = (4, 8, 8)
TOKENS, WIDTH = 8, 32
# The script's defaults (--beta_dpo 2500, --rank 4, --learning_rate 5e-4, AdamW, --max_grad_norm 1).
ARGS = dict(
    beta_dpo=2500,
    rank=4,
    learning_rate=5e-4,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_weight_decay=1e-2,
    adam_epsilon=1e-08,
    max_grad_norm=1.0,
)


def tiny_lora_unet():
    """A tiny SD1.5-shaped UNet with the script's LoRA adapter, its weights fixed by seed 0.

    peft's "gaussian" init leaves lora_B zero, as in the script: the first step starts with the
    policy equal to its reference (z = 0 for every pair), the later ones do not."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=LATENT[1],
        in_channels=LATENT[0],
        out_channels=LATENT[0],
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.requires_grad_(False)
    # Set up LoRA (the script's lines).
    unet_lora_config = LoraConfig(
        r=ARGS["rank"],
        lora_alpha=ARGS["rank"],
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    unet.add_adapter(unet_lora_config)
    return unet


def diffusers_loss(args, unet, model_pred, target, noisy_model_input, timesteps, encoder_hidden_states):
    """The loss lines of huggingface/diffusers
    examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, as they are there
    (`accelerator.unwrap_model(unet)` is `unet`, no accelerator here)."""
    # Compute losses.
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)

    # For logging
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l  # These are both LBS (as is t)

    # Reference model predictions.
    unet.disable_adapters()
    with torch.no_grad():
        ref_preds = unet(
            noisy_model_input,
            timesteps,
            encoder_hidden_states,
        ).sample.detach()
        ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))

        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_loss.mean()

    # Re-enable adapters.
    unet.enable_adapters()

    # Final loss.
    logits = ref_diff - model_diff
    if args.loss_type == "sigmoid":
        loss = -1 * F.logsigmoid(args.beta_dpo * logits).mean()
    elif args.loss_type == "hinge":
        loss = torch.relu(1 - args.beta_dpo * logits).mean()
    elif args.loss_type == "ipo":
        losses = (logits - 1 / (2 * args.beta)) ** 2
        loss = losses.mean()
    else:
        raise ValueError(f"Unknown loss type {args.loss_type}")

    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc, raw_model_loss, raw_ref_loss, args.beta_dpo * logits


def vipo_loss(args, unet, model_pred, target, noisy_model_input, timesteps, encoder_hidden_states):
    """The same lines as the drop-in replaces them (kernels/README.md), with the beta convention
    and the count of ties read from args ("diffusers-sd15" and "half" there) so that a test
    below can get them wrong."""
    # Reference model predictions.
    unet.disable_adapters()
    with torch.no_grad():
        ref_preds = unet(
            noisy_model_input,
            timesteps,
            encoder_hidden_states,
        ).sample.detach()
        ref_err = sample_errors(ref_preds, target)
        raw_ref_loss = ref_err.mean()

    # Re-enable adapters.
    unet.enable_adapters()

    # Final loss (z = beta * logits of this script: vipo's beta is twice --beta_dpo).
    out = poly_dpo_loss(
        model_pred,
        target,
        ref_err=ref_err,
        beta=beta_from(args.convention, args.beta_dpo),
        ties=args.ties,
        loss_type=args.loss_type,
    )
    loss, implicit_acc = out.loss, out.accuracy
    raw_model_loss = out.policy_err.mean()
    return loss, implicit_acc, raw_model_loss, raw_ref_loss, out.logits


def train(loss_fn, seed, loss_type="sigmoid", convention="diffusers-sd15", ties="half", steps=STEPS):
    """`steps` steps of the script's training loop -> the logged values of each step, the LoRA
    weights before and after."""
    from diffusers import DDPMScheduler

    # The script defines no --beta: its ipo branch reads args.beta, taken here to be --beta_dpo.
    args = SimpleNamespace(
        **ARGS, loss_type=loss_type, convention=convention, ties=ties, beta=ARGS["beta_dpo"]
    )
    unet = tiny_lora_unet()
    lora = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    initial = {name: p.detach().clone() for name, p in lora.items()}
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    params_to_optimize = list(filter(lambda p: p.requires_grad, unet.parameters()))
    optimizer = torch.optim.AdamW(
        params_to_optimize,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    data = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the script draws noise and timesteps from the global generator
    logs = []
    unet.train()
    for _ in range(steps):
        # The script's (batch_size, 2*channels, h, w) -> (2*batch_size, channels, h, w), on
        # latents here (it does this to pixel values, then encodes them with the VAE).
        pixel_values = torch.randn(PAIRS, 2 * LATENT[0], *LATENT[1:], generator=data)
        latents = torch.cat(pixel_values.chunk(2, dim=1))
        prompt_embeds = torch.randn(PAIRS, TOKENS, WIDTH, generator=data)

        # Sample noise that we'll add to the latents
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)

        # Sample a random timestep for each image
        bsz = latents.shape[0] // 2
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device, dtype=torch.long
        ).repeat(2)

        noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = prompt_embeds.repeat(2, 1, 1)

        # Predict the noise residual
        model_pred = unet(
            noisy_model_input,
            timesteps,
            encoder_hidden_states,
        ).sample
        target = noise  # prediction_type "epsilon"

        loss, implicit_acc, raw_model_loss, raw_ref_loss, z = loss_fn(
            args, unet, model_pred, target, noisy_model_input, timesteps, encoder_hidden_states
        )

        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        logs.append(
            {
                "loss": loss.detach().item(),
                "raw_model_loss": raw_model_loss.detach().item(),
                "ref_loss": raw_ref_loss.detach().item(),
                "implicit_acc": implicit_acc.detach().item(),
                "z": z.detach().double(),
                "max_err": (model_pred - target).detach().double().pow(2).mean(dim=(1, 2, 3)).max().item(),
            }
        )
    final = {name: p.detach().clone() for name, p in lora.items()}
    return logs, initial, final


def column(logs, key):
    return torch.stack([torch.as_tensor(entry[key], dtype=torch.float64) for entry in logs])


def update(initial, final):
    """The LoRA update of a run, flattened."""
    return torch.cat([(final[name] - initial[name]).flatten().double() for name in sorted(final)])


# How far apart the two formulas' z may be: the script forms the four errors of a pair in
# float32 (a few ulps each, and errors here are below ERR_SCALE) before subtracting them, and
# beta_dpo multiplies what is left. Its loss is that far from exact at the script's beta; the
# loss moves by at most |dl/dz| <= 1 (sigmoid, hinge) times that.
ERR_SCALE = 2.0
Z_TOL = ARGS["beta_dpo"] * 8 * torch.finfo(torch.float32).eps * ERR_SCALE


def loss_tolerance(loss_type, logs):
    if loss_type != "ipo":
        return Z_TOL
    # (h - 1/(2 beta_dpo))^2 with h = z / beta_dpo, h known to within dh = Z_TOL / beta_dpo:
    # the loss to within 2 (sqrt(l) + dh) dh.
    dh = Z_TOL / ARGS["beta_dpo"]
    return 2 * (column(logs, "loss").max().sqrt().item() + dh) * dh


def assert_same_run(logs, expected_logs, loss_type="sigmoid"):
    """The logged values of two runs of the script's loop agree: z, loss, accuracy, errors."""
    # The first step starts at z = 0 exactly (lora_B is zero): a tie for every pair, counted
    # half right; the later steps are away from it, so the comparisons compare something.
    for run in (expected_logs, logs):
        assert torch.equal(run[0]["z"], torch.zeros(PAIRS, dtype=torch.float64))
    assert column(expected_logs[1:], "z").abs().max() > 4 * Z_TOL
    assert column(expected_logs, "max_err").max() < ERR_SCALE

    z, expected_z = column(logs, "z"), column(expected_logs, "z")
    assert_close(z, expected_z, atol=Z_TOL, name="z")
    tol = loss_tolerance(loss_type, expected_logs)
    assert_close(column(logs, "loss"), column(expected_logs, "loss"), atol=tol, name="loss")
    # Each accuracy is its run's z counted the script's way (a tie as half); where no z is
    # within Z_TOL of 0 (the z agree to Z_TOL, so their signs do too), the two are equal.
    for run in (expected_logs, logs):
        counted = [((e["z"] > 0).double() + 0.5 * (e["z"] == 0).double()).mean().item() for e in run]
        assert column(run, "implicit_acc").tolist() == counted, "implicit_acc"
    clear = expected_z.abs().amin(dim=1) > Z_TOL
    clear[0] = True  # the ties of the first step, exact in both
    acc, expected_acc = column(logs, "implicit_acc"), column(expected_logs, "implicit_acc")
    assert acc[clear].tolist() == expected_acc[clear].tolist(), "implicit_acc"
    for key in ("raw_model_loss", "ref_loss"):
        assert_close(column(logs, key), column(expected_logs, key), atol=1e-6, name=key)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_vipo_trains_as_the_scripts_loss(seed, loss_type):
    expected_logs, initial, expected_final = train(diffusers_loss, seed, loss_type)
    logs, vipo_initial, final = train(vipo_loss, seed, loss_type)
    assert all(torch.equal(initial[name], vipo_initial[name]) for name in initial)
    assert_same_run(logs, expected_logs, loss_type)
    expected_update, vipo_update = update(initial, expected_final), update(initial, final)
    assert expected_update.norm() > 0
    assert (vipo_update - expected_update).norm() <= 1e-2 * expected_update.norm()


@pytest.mark.parametrize(
    "mistake, caught_by",
    [
        # The SDXL script's convention (beta as is) on the SD1.5 script's beta halves z.
        ({"convention": "diffusers-sdxl"}, "z"),
        # The official count of ties (as wrong) reports 0 where the script reports 0.5.
        ({"ties": "zero"}, "implicit_acc"),
    ],
    ids=["beta-convention", "ties"],
)
def test_the_comparison_catches_a_wrong_drop_in(seed, mistake, caught_by):
    expected_logs, _, _ = train(diffusers_loss, seed)
    logs, _, _ = train(vipo_loss, seed, **mistake)
    with pytest.raises(AssertionError, match=f"^{caught_by}:?"):
        assert_same_run(logs, expected_logs)
