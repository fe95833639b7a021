"""SDXL and SD3.5 adapters: a training step at tiny size, their conditioning layouts and noise
conventions, folder checks, and the real architecture configs (sized on the meta device)."""

from types import SimpleNamespace

import pytest
import torch

from vipo.engine.models import load_architecture

from vipo_testing import tiny_adapter

FAMILIES = ["sdxl", "sd3"]
PROMPTS = ["a red circle", "a blue square on green"]


@pytest.fixture(params=FAMILIES)
def adapter(request):
    return tiny_adapter(request.param)


@pytest.fixture
def sd3():
    return tiny_adapter("sd3")


def text_encoders(adapter):
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return {name: getattr(adapter, name) for name in names if hasattr(adapter, name)}


def latents_for(adapter, rows, generator):
    return torch.randn(rows, adapter.network.config.in_channels, 16, 16, generator=generator)


class Recorder(torch.nn.Module):
    """Stands in for the denoiser: keeps the call's arguments, returns x_t."""

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        x_t = args[0] if args else kwargs["hidden_states"]
        return SimpleNamespace(sample=x_t)


# -- noise, timesteps and targets ------------------------------------------------------------


def test_winner_and_loser_share_noise_and_timestep(adapter):
    generator = torch.Generator().manual_seed(0)
    latents = latents_for(adapter, 6, generator)
    x_t, t, target = adapter.noisy_inputs(latents, generator)
    eps = target if adapter.prediction_type == "epsilon" else target + latents
    assert torch.equal(t[:3], t[3:]) and len(set(t[:3].tolist())) == 3
    torch.testing.assert_close(eps[:3], eps[3:])
    assert not torch.allclose(eps[0], eps[1])
    assert not torch.allclose(x_t[:3], x_t[3:])  # same noise, different images


def test_sd3_adds_noise_on_the_straight_path_and_targets_the_velocity(sd3):
    generator = torch.Generator().manual_seed(1)
    latents = latents_for(sd3, 4, generator)
    eps, t = torch.randn(latents.shape, generator=generator), torch.rand(4, generator=generator)
    x_t, target = sd3.add_noise(latents, eps, t)
    w = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - w) * latents + w * eps)
    torch.testing.assert_close(target, eps - latents)
    _, t_drawn, _ = sd3.noisy_inputs(latents, generator)
    assert t_drawn.is_floating_point() and bool(((t_drawn > 0) & (t_drawn < 1)).all())


def test_sd3_draws_t_logit_normal_by_default_and_uniform_on_request(sd3):
    assert sd3.timestep_sampling == "logit_normal"
    t = sd3.sample_timesteps(20000, torch.Generator().manual_seed(2))
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.logit(t.double())
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05
    sd3.timestep_sampling = "uniform"
    try:
        u = sd3.sample_timesteps(20000, torch.Generator().manual_seed(2))
    finally:
        sd3.timestep_sampling = "logit_normal"
    # Logit-normal puts ~1.4% of its mass below 0.1; uniform puts 10% there.
    assert (t < 0.1).float().mean() < 0.03 and abs((u < 0.1).float().mean().item() - 0.1) < 0.01


# -- conditioning ----------------------------------------------------------------------------


def penultimate_and_pooled(text_encoder, tokenizer):
    out = text_encoder(tokenizer(PROMPTS), output_hidden_states=True)
    return out.hidden_states[-2], getattr(out, "text_embeds", None)


def test_prompts_are_encoded_as_the_diffusers_pipelines_lay_them_out(adapter):
    cond = adapter.encode_prompts(PROMPTS)
    clip_l, pooled_l = penultimate_and_pooled(adapter.text_encoder, adapter.tokenizer)
    clip_g, pooled_g = penultimate_and_pooled(adapter.text_encoder_2, adapter.tokenizer_2)
    clip = torch.cat([clip_l, clip_g], dim=-1)
    hidden = cond["encoder_hidden_states"]
    if adapter.family == "sdxl":
        torch.testing.assert_close(hidden, clip)
        torch.testing.assert_close(cond["text_embeds"], pooled_g)
        assert hidden.shape[-1] == adapter.network.config.cross_attention_dim
    else:
        t5 = adapter.text_encoder_3(adapter.tokenizer_3(PROMPTS)).last_hidden_state
        clip_tokens, width = clip.shape[1:]
        assert hidden.shape == (2, clip_tokens + t5.shape[1], t5.shape[-1]) and width < t5.shape[-1]
        torch.testing.assert_close(hidden[:, :clip_tokens, :width], clip)
        assert not hidden[:, :clip_tokens, width:].any()  # CLIP zero-padded to T5's width
        torch.testing.assert_close(hidden[:, clip_tokens:], t5)
        torch.testing.assert_close(cond["pooled_projections"], torch.cat([pooled_l, pooled_g], dim=-1))
    assert not torch.allclose(hidden[0], hidden[1])


def test_predict_repeats_the_conditioning_for_pairs_and_keeps_it_for_single_rows(adapter):
    generator = torch.Generator().manual_seed(3)
    cond = adapter.encode_prompts(PROMPTS)
    doubled = {key: torch.cat([value, value]) for key, value in cond.items()}
    x_t = latents_for(adapter, 4, generator)
    t = adapter.sample_timesteps(2, generator).repeat(2)
    network = adapter.network.eval()
    with torch.no_grad():
        pairs = adapter.predict(network, x_t, t, cond)
        torch.testing.assert_close(pairs, adapter.predict(network, x_t, t, doubled))
        single = adapter.predict(network, x_t[:2], t[:2], cond)
        torch.testing.assert_close(single, pairs[:2], rtol=1e-4, atol=1e-5)
        # Every conditioning tensor reaches the network.
        for key in cond:
            other = {**cond, key: torch.randn_like(cond[key])}
            assert not torch.allclose(adapter.predict(network, x_t[:2], t[:2], other), single), key
    with pytest.raises(ValueError, match="does not fit"):
        adapter.predict(network, x_t[:3], t[:3], cond)


def test_the_denoiser_gets_the_family_timestep_and_added_conditions(adapter):
    generator = torch.Generator().manual_seed(4)
    cond = adapter.encode_prompts(PROMPTS)
    x_t = latents_for(adapter, 4, generator)[..., :12]  # a non-square image
    t = adapter.sample_timesteps(4, generator)
    recorder = Recorder()
    adapter.predict(recorder, x_t, t, cond)
    if adapter.family == "sdxl":
        assert torch.equal(recorder.args[1], t)  # DDPM step index as is
        added = recorder.kwargs["added_cond_kwargs"]
        torch.testing.assert_close(added["text_embeds"], torch.cat([cond["text_embeds"]] * 2))
        # (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels: pixel space here
        assert added["time_ids"].tolist() == [[16, 12, 0, 0, 16, 12]] * 4
    else:
        torch.testing.assert_close(recorder.kwargs["timestep"], t * 1000)
        pooled = recorder.kwargs["pooled_projections"]
        torch.testing.assert_close(pooled, torch.cat([cond["pooled_projections"]] * 2))


def test_vae_latents_are_shifted_and_scaled_and_time_ids_count_pixels(adapter):
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    shift = 0.25 if adapter.family == "sd3" else None  # SDXL's VAE scales only
    vae = AutoencoderKL(
        latent_channels=adapter.network.config.in_channels,
        layers_per_block=1,
        block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=4,
        scaling_factor=1.5,
        shift_factor=shift,
    )
    encoders = list(text_encoders(adapter).values())
    tokenizers = [
        getattr(adapter, name.replace("text_encoder", "tokenizer")) for name in text_encoders(adapter)
    ]
    if adapter.family == "sdxl":
        with_vae = type(adapter)(
            adapter.network, encoders, tokenizers, vae, adapter.alphas_cumprod, adapter.device
        )
    else:
        with_vae = type(adapter)(adapter.network, encoders, tokenizers, vae, adapter.device)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    mean = vae.encode(pixels).latent_dist.mean
    latents = with_vae.encode_pixels(pixels)
    torch.testing.assert_close(latents, (mean - (shift or 0.0)) * 1.5)
    if adapter.family == "sdxl":  # 8x8 latents of 16x16 pixels: time_ids count pixels
        assert latents.shape[-2:] == (8, 8)
        assert with_vae.time_ids(latents).tolist() == [[16, 16, 0, 0, 16, 16]] * 2


# -- building from a folder ------------------------------------------------------------------


# -- architecture configs --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdxl", "sdxl-tiny"])
def test_sdxl_configs_wire_two_text_encoders_into_the_unet(name):
    arch = load_architecture(name)
    unet, first, second = arch["unet"], arch["text_encoder"], arch["text_encoder_2"]
    assert arch["family"] == "sdxl" and arch["about"]
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    # pooled CLIP-G projection + 6 time_ids, each embedded in addition_time_embed_dim
    added = second["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert unet["projection_class_embeddings_input_dim"] == added
    assert arch["max_prompt_tokens"] <= min(
        first["max_position_embeddings"], second["max_position_embeddings"]
    )
    assert unet["in_channels"] == (arch["vae"]["latent_channels"] if arch["vae"] else 3)


@pytest.mark.parametrize("name", ["sd3.5-medium", "sd3-tiny"])
def test_sd3_configs_wire_three_text_encoders_into_the_transformer(name):
    arch = load_architecture(name)
    dit, t5 = arch["transformer"], arch["text_encoder_3"]
    clip_l, clip_g = arch["text_encoder"], arch["text_encoder_2"]
    assert arch["family"] == "sd3" and arch["about"]
    assert dit["joint_attention_dim"] == t5["d_model"] >= clip_l["hidden_size"] + clip_g["hidden_size"]
    assert dit["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"]
    assert dit["caption_projection_dim"] == dit["num_attention_heads"] * dit["attention_head_dim"]
    assert arch["timestep_sampling"] in ("logit_normal", "uniform")
    assert dit["in_channels"] == (arch["vae"]["latent_channels"] if arch["vae"] else 3)
