"""FLUX.1 and Wan2.1 adapters: a training step at tiny size, FLUX's 2x2 packing, Wan's video
latents, their flow-matching conventions and conditioning, folder checks, and the real
architecture configs (sized on the meta device)."""

from types import SimpleNamespace

import pytest
import torch

from vipo.engine.models import load_architecture
from vipo.engine.models.flux import image_ids, pack_latents, unpack_latents
from vipo.kernels import sample_errors

from vipo_testing import tiny_adapter

FAMILIES = ["flux", "wan"]
PROMPTS = ["a red circle", "a blue square on green"]


@pytest.fixture(params=FAMILIES)
def adapter(request):
    return tiny_adapter(request.param)


def latents_for(adapter, rows, generator, frames=3):
    """Random latents in the family's layout: [N, 16, h, w] (FLUX), [N, C, F, h, w] (Wan)."""
    channels = adapter.network.config.in_channels
    if adapter.family == "flux":
        return torch.randn(rows, channels // 4, 8, 8, generator=generator)
    return torch.randn(rows, channels, frames, 8, 8, generator=generator)


class Recorder(torch.nn.Module):
    """Stands in for the denoiser: keeps the call's arguments, returns its input."""

    def __init__(self, guidance_embeds=False):
        super().__init__()
        self.config = SimpleNamespace(guidance_embeds=guidance_embeds)

    def forward(self, **kwargs):
        self.kwargs = kwargs
        if kwargs.get("return_dict", True) is False:  # diffusers' tuple output
            return (kwargs["hidden_states"],)
        return SimpleNamespace(sample=kwargs["hidden_states"])


# -- noise, timesteps and targets ------------------------------------------------------------


def test_winner_and_loser_share_noise_and_timestep_and_the_target_is_the_velocity(adapter):
    generator = torch.Generator().manual_seed(0)
    latents = latents_for(adapter, 6, generator)
    x_t, t, target = adapter.noisy_inputs(latents, generator)
    assert torch.equal(t[:3], t[3:]) and len(set(t[:3].tolist())) == 3
    assert t.is_floating_point() and bool(((t > 0) & (t < 1)).all())
    # x_t = (1 - t) x0 + t eps and target = eps - x0, so eps = x_t + (1 - t) * target.
    w = t.view(-1, *([1] * (latents.dim() - 1)))
    eps = x_t + (1 - w) * target
    torch.testing.assert_close(target, eps - latents)
    torch.testing.assert_close(eps[:3], eps[3:])
    assert not torch.allclose(eps[0], eps[1])
    assert not torch.allclose(x_t[:3], x_t[3:])  # same noise, different images


def test_noise_is_added_on_the_straight_path(adapter):
    generator = torch.Generator().manual_seed(1)
    latents = latents_for(adapter, 4, generator)
    eps, t = torch.randn(latents.shape, generator=generator), torch.rand(4, generator=generator)
    x_t, target = adapter.add_noise(latents, eps, t)
    for i in range(4):
        torch.testing.assert_close(x_t[i], (1 - t[i]) * latents[i] + t[i] * eps[i])
    torch.testing.assert_close(target, eps - latents)


def test_t_is_logit_normal_by_default_and_uniform_on_request(adapter):
    assert adapter.timestep_sampling == "logit_normal"
    t = adapter.sample_timesteps(20000, torch.Generator().manual_seed(2))
    logit = torch.logit(t.double())
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05
    adapter.timestep_sampling = "uniform"
    try:
        u = adapter.sample_timesteps(20000, torch.Generator().manual_seed(2))
    finally:
        adapter.timestep_sampling = "logit_normal"
    # Logit-normal puts ~1.4% of its mass below 0.1; uniform puts 10% there.
    assert (t < 0.1).float().mean() < 0.03 and abs((u < 0.1).float().mean().item() - 0.1) < 0.01


# -- FLUX: packing and the transformer call --------------------------------------------------


def test_flux_packing_round_trips_exactly_and_matches_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(3, 16, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (3, 3 * 5, 64)
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 3, 16, 6, 10))
    # The pipeline's unpack speaks in pixels: 6x10 latents are 48x80 pixels at a VAE factor of 8.
    assert torch.equal(unpack_latents(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 48, 80, 8))
    assert torch.equal(
        image_ids(6, 10, "cpu"), FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32)
    )
    # Token 1 is the patch at row 0, column 1; its features run channel-major over the 2x2 cells.
    torch.testing.assert_close(tokens[:, 1], latents[:, :, 0:2, 2:4].reshape(3, 64))
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.randn(1, 16, 5, 8))


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_gets_packed_tokens_t_in_0_1_guidance_and_its_ids(guidance_embeds):
    flux = tiny_adapter("flux")
    generator = torch.Generator().manual_seed(3)
    cond = flux.encode_prompts(PROMPTS)
    x_t = torch.randn(4, 16, 8, 6, generator=generator)  # a non-square latent
    t = flux.sample_timesteps(4, generator)
    recorder = Recorder(guidance_embeds)
    pred = flux.predict(recorder, x_t, t, cond)
    kwargs = recorder.kwargs
    assert torch.equal(pred, x_t)  # unpacked back to the latent layout
    assert torch.equal(kwargs["hidden_states"], pack_latents(x_t))
    torch.testing.assert_close(kwargs["timestep"], t)  # the transformer multiplies by 1000 itself
    if guidance_embeds:
        assert kwargs["guidance"].tolist() == [flux.guidance] * 4 and flux.guidance == 3.5
    else:
        assert kwargs["guidance"] is None
    torch.testing.assert_close(kwargs["pooled_projections"], torch.cat([cond["pooled_projections"]] * 2))
    tokens = cond["encoder_hidden_states"].shape[1]
    assert kwargs["txt_ids"].shape == (tokens, 3) and not kwargs["txt_ids"].any()
    assert kwargs["img_ids"].tolist() == [[0, r, c] for r in range(4) for c in range(3)]


def test_flux_conditions_on_t5_states_and_the_clip_pooled_output():
    flux = tiny_adapter("flux")
    cond = flux.encode_prompts(PROMPTS)
    clip = flux.text_encoder(flux.tokenizer(PROMPTS)).pooler_output
    t5 = flux.text_encoder_2(flux.tokenizer_2(PROMPTS)).last_hidden_state
    torch.testing.assert_close(cond["pooled_projections"], clip)
    torch.testing.assert_close(cond["encoder_hidden_states"], t5)
    assert cond["encoder_hidden_states"].shape[-1] == flux.network.config.joint_attention_dim
    assert not torch.allclose(cond["pooled_projections"][0], cond["pooled_projections"][1])


def test_flux_latents_are_shifted_then_scaled():
    flux = tiny_adapter("flux")
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    mean = flux.vae.encode(pixels).latent_dist.mean
    latents = flux.encode_pixels(pixels)
    assert latents.shape == (2, 16, 8, 8)
    torch.testing.assert_close(latents, (mean - 0.1159) * 0.3611)


# -- Wan: video latents and the transformer call ---------------------------------------------


def test_wan_trains_on_a_video_batch_and_reduces_errors_over_every_non_batch_dim():
    wan = tiny_adapter("wan")
    generator = torch.Generator().manual_seed(4)
    video = torch.rand(4, 3, 5, 16, 16, generator=generator) * 2 - 1  # [2B, 3, F, H, W]
    latents = wan.encode_pixels(video)
    assert latents.shape == (4, 4, 3, 8, 8)  # 2x temporal (causal: 1 + 4/2 frames), 2x spatial
    x_t, t, target = wan.noisy_inputs(latents, generator)
    cond = wan.encode_prompts(PROMPTS)
    pred = wan.predict(wan.network, x_t, t, cond)
    assert pred.shape == target.shape == latents.shape
    errors = sample_errors(pred, target)
    manual = (pred.double() - target.double()).square().mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(errors.double(), manual, rtol=1e-5, atol=1e-6)
    pred.square().mean().backward()  # gradients reach the transformer through the video path
    assert wan.network.patch_embedding.weight.grad is not None
    wan.network.zero_grad(set_to_none=True)


def test_wan_takes_images_as_one_frame_videos_and_refuses_frames_its_vae_would_drop():
    wan = tiny_adapter("wan")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = wan.encode_pixels(images)
    assert latents.shape == (2, 4, 1, 8, 8)
    torch.testing.assert_close(latents, wan.encode_pixels(images.unsqueeze(2)))
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        wan.encode_pixels(torch.zeros(2, 3, 4, 16, 16))


def test_wan_latents_are_normalised_per_channel():
    wan = tiny_adapter("wan")
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    z = wan.vae.encode(video).latent_dist.mean
    config = wan.vae.config
    assert len(set(config.latents_std)) > 1  # the tiny config makes a per-channel mix-up visible
    for channel, (mean, std) in enumerate(zip(config.latents_mean, config.latents_std, strict=True)):
        torch.testing.assert_close(wan.encode_pixels(video)[:, channel], (z[:, channel] - mean) / std)


def test_wan_gets_t_times_1000_and_umt5_states_zeroed_past_each_prompt():
    wan = tiny_adapter("wan")
    generator = torch.Generator().manual_seed(5)
    cond = wan.encode_prompts(PROMPTS)
    hidden = cond["encoder_hidden_states"]
    ids, mask = wan.tokenize(PROMPTS)
    assert mask.sum(1).tolist() == [5, 7]  # BOS + words + EOS; the rest is padding
    assert not hidden[mask == 0].any() and hidden[mask == 1].abs().sum(-1).gt(0).all()
    full = wan.text_encoder(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden[mask == 1], full[mask == 1])
    x_t = latents_for(wan, 4, generator)
    t = wan.sample_timesteps(4, generator)
    recorder = Recorder()
    wan.predict(recorder, x_t, t, cond)
    torch.testing.assert_close(recorder.kwargs["timestep"], t * 1000)
    torch.testing.assert_close(recorder.kwargs["encoder_hidden_states"], torch.cat([hidden, hidden]))


# -- conditioning rows -----------------------------------------------------------------------


def test_predict_repeats_the_conditioning_for_pairs_and_keeps_it_for_single_rows(adapter):
    generator = torch.Generator().manual_seed(6)
    cond = adapter.encode_prompts(PROMPTS)
    doubled = {key: torch.cat([value, value]) for key, value in cond.items()}
    x_t = latents_for(adapter, 4, generator, frames=1)
    t = adapter.sample_timesteps(2, generator).repeat(2)
    network = adapter.network.eval()
    with torch.no_grad():
        pairs = adapter.predict(network, x_t, t, cond)
        assert pairs.shape == x_t.shape
        torch.testing.assert_close(pairs, adapter.predict(network, x_t, t, doubled))
        single = adapter.predict(network, x_t[:2], t[:2], cond)
        torch.testing.assert_close(single, pairs[:2], rtol=1e-4, atol=1e-5)
        for key in cond:  # every conditioning tensor reaches the network
            other = {**cond, key: torch.randn_like(cond[key])}
            assert not torch.allclose(adapter.predict(network, x_t[:2], t[:2], other), single), key
    network.train()
    with pytest.raises(ValueError, match="does not fit"):
        adapter.predict(network, x_t[:3], t[:3], cond)


# -- architecture configs --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux1-dev", "flux-tiny"])
def test_flux_configs_wire_clip_t5_and_the_vae_into_the_transformer(name):
    arch = load_architecture(name)
    dit, clip, t5 = arch["transformer"], arch["text_encoder"], arch["text_encoder_2"]
    assert arch["family"] == "flux" and arch["about"]
    assert dit["joint_attention_dim"] == t5["d_model"]
    assert dit["pooled_projection_dim"] == clip["hidden_size"]  # pooler_output, not a projection
    assert dit["in_channels"] == 4 * arch["vae"]["latent_channels"] and dit["patch_size"] == 1
    assert sum(dit["axes_dims_rope"]) == dit["attention_head_dim"]
    assert arch["max_prompt_tokens"] <= clip["max_position_embeddings"]
    assert arch["timestep_sampling"] in ("logit_normal", "uniform")


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan-tiny"])
def test_wan_configs_wire_umt5_and_the_vae_into_the_transformer(name):
    arch = load_architecture(name)
    dit, umt5, vae = arch["transformer"], arch["text_encoder"], arch["vae"]
    assert arch["family"] == "wan" and arch["about"]
    assert dit["text_dim"] == umt5["d_model"]
    assert dit["in_channels"] == dit["out_channels"] == vae["z_dim"]
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == vae["z_dim"]
    assert arch["timestep_sampling"] in ("logit_normal", "uniform")
