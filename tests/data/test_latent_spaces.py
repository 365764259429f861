"""Latent spaces beyond SD's VAE: the latent transform (scale, shift, per-channel stats) applied
at encode and undone at decode, diffusers AutoencoderDC, measured stats, the record in caches
and checkpoints, and the guided_channels=3 warning."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_dit
from diffusers import AutoencoderDC, AutoencoderKL

from dit.autoencoder import (
    SD_SCALE_FACTOR,
    AutoencoderUnavailable,
    LatentTransform,
    autoencoder_from_spec,
    build_autoencoder,
    guided_channels_warning,
    latent_stats,
)
from dit.io.checkpoint import save_atomic
from dit.config import known_downsample_factor
from dit.data import CacheFormat, CacheRun, LatentCacheDataset, build_latent_cache
from dit.cli.latent_stats import measure_cache, measure_images
from dit.sampling.guidance import GuidedDenoiser
from dit.sampling.loading import load_for_sampling
from dit.sampling.settings import SamplerSettings


def _kl(path, **config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                      layers_per_block=1, sample_size=16, **config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dc_dir(tmp_path_factory):
    """A random two-level AutoencoderDC (8 latent channels, downsampling 2), as save_pretrained writes it."""
    path = tmp_path_factory.mktemp("dcae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderDC(latent_channels=8, attention_head_dim=4, encoder_block_types=("ResBlock",) * 2,
                      decoder_block_types=("ResBlock",) * 2, encoder_block_out_channels=(8, 16),
                      decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                      decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                      decoder_qkv_multiscales=((), ()), scaling_factor=0.5).save_pretrained(path)
    return path


def _images(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sd_vae_encode_and_decode_are_bitwise_the_old_formula(tiny_vae_dir):
    ae = build_autoencoder(str(tiny_vae_dir))
    ref = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    x = _images()
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
    z = ae.encode(x, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, (posterior.mean + posterior.std * eps) * SD_SCALE_FACTOR)
    with torch.no_grad():
        assert torch.equal(ae.decode(z), ref.decode(z / SD_SCALE_FACTOR).sample)
    # The record is what it was: no class, shift or stats keys for SD's VAE.
    assert ae.to_dict() == {"name": str(tiny_vae_dir), "latent_channels": 4, "downsample_factor": 2,
                            "scale_factor": SD_SCALE_FACTOR}


def test_shift_and_scale_come_from_the_vae_config_and_decode_undoes_them(tmp_path):
    path = _kl(tmp_path / "flux-like", scaling_factor=0.5, shift_factor=0.25)
    ae, ref = build_autoencoder(str(path)), AutoencoderKL.from_pretrained(path).eval()
    x = _images()
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        torch.testing.assert_close(ae.encode(x, sample=False), (mean - 0.25) * 0.5)
        torch.testing.assert_close(ae.decode(ae.encode(x, sample=False)), ref.decode(mean).sample, atol=1e-5, rtol=1e-5)
    assert ae.to_dict()["shift_factor"] == 0.25 and ae.to_dict()["scale_factor"] == 0.5


def test_per_channel_stats_standardise_and_invert(tmp_path, tiny_vae_dir):
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.5, 1.0]
    # From the VAE config (diffusers' latents_mean/latents_std): (z - mean) * scale / std.
    path = _kl(tmp_path / "stats", scaling_factor=0.5, latents_mean=mean, latents_std=std)
    from_config = build_autoencoder(str(path))
    x = _images()
    z = from_config.encode_moments(x)[0]
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(from_config.encode(x, sample=False), (z - m) * 0.5 / s)
    torch.testing.assert_close(from_config.transform.invert(from_config.encode(x, sample=False)), z)
    # Given by the user without a scale: the stats standardise, the scale is 1.
    given = build_autoencoder(str(tiny_vae_dir), latents_mean=mean, latents_std=std)
    assert given.scale_factor == 1.0
    torch.testing.assert_close(given.encode(x, sample=False), (given.encode_moments(x)[0] - m) / s)
    with pytest.raises(ValueError, match="latents_std has 3 values .* 4 latent channels"):
        build_autoencoder(str(tiny_vae_dir), latents_std=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="latents_std must be positive"):
        LatentTransform(1.0, std=(1.0, 0.0))
    with pytest.raises(ValueError, match="vae=pixel has no latent transform"):
        build_autoencoder("pixel", shift_factor=0.1)


def test_autoencoder_dc_is_detected_and_deterministic(dc_dir):
    ae = build_autoencoder(str(dc_dir))
    ref = AutoencoderDC.from_pretrained(dc_dir).eval()
    assert (ae.class_name, ae.latent_channels, ae.downsample_factor, ae.scale_factor) == ("AutoencoderDC", 8, 2, 0.5)
    assert known_downsample_factor(str(dc_dir)) == 2
    x = _images()
    with torch.no_grad():
        latent = ref.encode(x).latent
        assert torch.equal(ae.encode(x, generator=torch.Generator().manual_seed(0)), latent * 0.5)
        assert torch.equal(ae.encode(x), ae.encode(x, sample=False))  # no posterior: sample = mean
        assert torch.equal(ae.encode_moments(x)[1], torch.zeros_like(latent))
        torch.testing.assert_close(ae.decode(latent * 0.5), ref.decode(latent).sample)
    spec = ae.to_dict()
    assert spec["class"] == "AutoencoderDC"
    assert autoencoder_from_spec(spec).transform == ae.transform


def test_an_unsupported_diffusers_class_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderUnavailable, match="UNet2DModel.*AutoencoderKL, .*AutoencoderDC"):
        build_autoencoder(str(tmp_path))


def test_latent_stats_are_the_moments_of_the_posterior_samples():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 2, 4, 4, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) + 2,
                torch.rand(3, 2, 4, 4, generator=g)) for _ in range(2)]
    mean, std = latent_stats(batches, shift=0.5)
    means = torch.cat([m for m, _ in batches]).double().numpy()
    stds = torch.cat([s for _, s in batches]).double().numpy()
    # Independently: the pooled mean, and variance = variance of the means + mean posterior variance.
    expect_mean = means.mean(axis=(0, 2, 3)) - 0.5
    expect_var = means.var(axis=(0, 2, 3)) + (stds ** 2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, expect_mean, rtol=1e-12)
    np.testing.assert_allclose(np.square(std), expect_var, rtol=1e-10)
    # And by sampling: 400 draws per posterior agree to Monte-Carlo precision.
    m, s = torch.cat([m for m, _ in batches]), torch.cat([s for _, s in batches])
    draws = m + s * torch.randn(400, *m.shape, generator=g)
    np.testing.assert_allclose(draws.transpose(0, 2).reshape(2, -1).std(1).numpy(), std, rtol=0.02)
    with pytest.raises(ValueError, match="empty"):
        latent_stats([])


def test_measured_stats_from_a_cache_are_recorded_and_standardise_its_latents(dc_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"c{i % 2}" / f"{i}.png")
    plain = build_autoencoder(str(dc_dir))
    kw = dict(image_size=16, fmt=CacheFormat(dtype="float32"),
              run=CacheRun(batch_size=2, num_workers=0, device="cpu", progress=False))
    first = build_latent_cache(tmp_path / "img", plain, tmp_path / "c0", **kw)
    stats = measure_cache(first)
    assert stats["items"] == 4 and len(stats["latents_mean"]) == 8
    ds0 = LatentCacheDataset(first, hflip=False, sample_posterior=False)
    views = [ds0.moments(i, f)[0] for i in range(4) for f in (False, True)]
    assert stats["latents_mean"] == pytest.approx(torch.stack(views).double().mean((0, 2, 3)).tolist(), rel=1e-9)
    images = torch.stack([torch.tensor(np.array(Image.open(p)), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
                          for p in sorted((tmp_path / "img").rglob("*.png"))])
    assert measure_images(plain, [images])["latents_mean"] == pytest.approx(
        latent_stats([(ds0.moments(i)[0], ds0.moments(i)[1]) for i in range(4)])[0], abs=1e-5)

    # A cache built with the stats records them, and its items are standardised per channel.
    ae = build_autoencoder(str(dc_dir), latents_mean=stats["latents_mean"], latents_std=stats["latents_std"])
    out = build_latent_cache(tmp_path / "img", ae, tmp_path / "c1", **kw)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["autoencoder"] == ae.to_dict()
    assert meta["autoencoder"]["latents_std"] == stats["latents_std"] and meta["autoencoder"]["scale_factor"] == 1.0
    ds = LatentCacheDataset(out, hflip=False, sample_posterior=False)
    items = torch.stack([ds[i][0] for i in range(4)] + [ae.transform.apply(ds.moments(i, True)[0]) for i in range(4)])
    torch.testing.assert_close(items.mean((0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(items.std((0, 2, 3), correction=0), torch.ones(8), atol=1e-5, rtol=0)


def test_sampling_decodes_with_the_checkpoints_recorded_transform(dc_dir, tmp_path):
    ae = build_autoencoder(str(dc_dir), shift_factor=0.1, latents_mean=[0.2] * 8, latents_std=[3.0] * 8)
    model = tiny_dit(in_channels=8)
    path = tmp_path / "ckpt.pt"
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": ae.to_dict(), "config": None,
                 "format_version": 1}, path)
    _, loaded, _ = load_for_sampling(path)
    assert loaded.transform == ae.transform and loaded.class_name == "AutoencoderDC"
    latents = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(latents), ae.decode(latents))


def test_guided_channels_3_warns_on_a_latent_space_other_than_4_channels():
    assert guided_channels_warning("3", 4) is None and guided_channels_warning(3, 3) is None
    assert guided_channels_warning("all", 32) is None and guided_channels_warning(8, 32) is None
    assert "first 3 of this latent space's 8 channels" in guided_channels_warning("3", 8)
    labels = torch.tensor([0])
    with pytest.warns(UserWarning, match="guided_channels=all"):
        GuidedDenoiser(tiny_dit(in_channels=8), labels, SamplerSettings(cfg_scale=1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuidedDenoiser(tiny_dit(), labels, SamplerSettings(cfg_scale=1.5))  # SD's 4 channels: silent
        GuidedDenoiser(tiny_dit(in_channels=8), labels, SamplerSettings(cfg_scale=1.5, guided_channels="all"))


def test_autoencoder_tiny_is_read_as_a_deterministic_encoder(tmp_path):
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                        num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path)
    ae, ref = build_autoencoder(str(tmp_path)), AutoencoderTiny.from_pretrained(tmp_path).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(ae.encode(x), ref.encode(x).latents * 1.0)  # its config's scaling_factor is 1
    assert (ae.class_name, ae.downsample_factor, known_downsample_factor(str(tmp_path))) == ("AutoencoderTiny", 2, 2)
