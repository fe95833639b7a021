"""model.attention: the kernel switches are applied, or refused with a reason."""

from types import SimpleNamespace

import pytest
import torch

from vipo.engine.config import load_config
from vipo.engine.errors import ConfigError, RunError
from vipo.engine.models import build_model
from vipo.engine.models.base import configure_attention

BACKENDS = ("flash", "cudnn", "mem_efficient", "math")


@pytest.fixture
def sdpa_flags():
    """Reads the process-wide SDPA switches; puts them back after the test."""

    def read():
        return [getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in BACKENDS]

    saved = read()
    yield read
    for name, value in zip(BACKENDS, saved, strict=True):
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(value)


def model_cfg(family, attention):
    return load_config(
        None, [f"model.family={family}", f"model.config={family}-tiny", f"model.attention={attention}"]
    ).model


def test_sdpa_flash_leaves_only_the_flash_backend_on_for_a_cuda_model(sdpa_flags):
    cuda_model = SimpleNamespace(device=torch.device("cuda"), family="sd15")  # flags only: no CUDA needed
    configure_attention(cuda_model, "sdpa_flash")
    assert sdpa_flags() == [True, False, False, False]
    configure_attention(cuda_model, "sdpa_cudnn")
    assert sdpa_flags() == [False, True, False, False]


def test_sdpa_switches_leave_a_cpu_model_working(sdpa_flags):
    before = sdpa_flags()
    adapter = build_model(model_cfg("sd15", "sdpa_cudnn"), torch.device("cpu"))
    assert sdpa_flags() == before
    x = torch.randn(2, 3, 16, 16)
    cond = adapter.encode_prompts(["a red circle", "a blue square"])
    assert adapter.predict(adapter.network, x, torch.tensor([1, 500]), cond).shape == x.shape


def test_flash_attn_is_refused_for_families_that_call_sdpa_directly():
    with pytest.raises(ConfigError, match="flash_attn works for flux, wan; sdxl calls SDPA directly"):
        build_model(model_cfg("sdxl", "flash_attn"), torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without flash-attn")
def test_flash_attn_without_the_package_says_how_to_get_it():
    pytest.importorskip("diffusers")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(RunError, match=r"model.attention=flash_attn: .*vipo\[gpu\]"):
        build_model(model_cfg("flux", "flash_attn"), torch.device("cpu"))


def test_an_unknown_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=xformers"])
