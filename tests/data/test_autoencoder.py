"""The autoencoder interface: KL VAE by local path (the tiny saved VAE of conftest.py), the pixel
identity, and offline errors."""

import pytest
import torch
from diffusers import AutoencoderKL

from dit.autoencoder import SD_SCALE_FACTOR, AutoencoderUnavailable, build_autoencoder


def test_vae_loads_from_local_directory(tiny_vae_dir):
    ae = build_autoencoder(str(tiny_vae_dir))
    assert ae.latent_channels == 4
    assert ae.downsample_factor == 2
    assert ae.scale_factor == pytest.approx(SD_SCALE_FACTOR)
    assert ae.to_dict()["name"] == str(tiny_vae_dir)
    assert ae.latent_size(16) == 8
    with pytest.raises(ValueError, match="not divisible"):
        ae.latent_size(15)


def test_vae_encode_is_scaled_posterior_and_decode_inverts_the_scale(tiny_vae_dir):
    ae = build_autoencoder(str(tiny_vae_dir))
    ref = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
    mean_latents = ae.encode(x, sample=False)
    torch.testing.assert_close(mean_latents, posterior.mean * SD_SCALE_FACTOR)

    # A posterior sample is mean + std * eps with eps drawn from the given generator.
    z = ae.encode(x, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (posterior.mean + posterior.std * eps) * SD_SCALE_FACTOR)
    assert not torch.equal(z, ae.encode(x, generator=torch.Generator().manual_seed(4)))

    images = ae.decode(z)
    assert images.shape == (2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(images, ref.decode(z / SD_SCALE_FACTOR).sample)


def test_explicit_scale_factor_overrides_the_config(tiny_vae_dir):
    ae = build_autoencoder(str(tiny_vae_dir), scale_factor=0.5)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ae.encode(x, sample=False) / 0.5, ae.encode_moments(x)[0])


def test_pixel_autoencoder_is_the_identity():
    ae = build_autoencoder("pixel")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(ae.encode(x), x)
    assert torch.equal(ae.decode(x), x)
    assert (ae.latent_channels, ae.downsample_factor, ae.scale_factor) == (3, 1, 1.0)


def test_missing_hub_model_fails_at_once_naming_the_model_and_the_fixes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AutoencoderUnavailable) as err:
        build_autoencoder("dit-tests/no-such-vae")
    message = str(err.value)
    assert "dit-tests/no-such-vae" in message
    assert "save_pretrained" in message and "HF_HUB_OFFLINE" in message


def test_missing_local_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "vae"
    with pytest.raises(AutoencoderUnavailable, match="does not exist"):
        build_autoencoder(str(missing))
