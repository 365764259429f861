"""REPA (dit/models/repa.py): the alignment loss against an independent computation, where its gradient
goes, the frozen encoder loaded from a local timm directory, the feature cache next to the
latents (the same views as the latents, read back by the latents dataset), and REPA training:
the loss falls, the projector stays out of the model's state dict, training from the cache
equals training with the encoder on the fly, and a run killed with -9 resumes bitwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import save_for_hf

from conftest import (assert_one_line, assert_same_training_state, joined, run_program, single_thread,
                      start_training, tiny_dit, toy_run_config as config, train_on_two_gloo_ranks)
from dit.autoencoder import build_autoencoder
from dit.config import ConfigError, check_static
from dit.data import (CacheFormat, CacheRun, ImageFolderDataset, LatentCacheDataset, LatentCacheMismatch,
                      build_latent_cache)
from dit.models import DiT
from dit.models.repa import EncoderUnavailable, RepaHead, load_encoder, resample_tokens
from dit.data.toy import write_toy_imagefolder
from dit.train import run_training

# 4 x 4 = 16 tokens of width 32, as many as the tiny DiT's (16 px, patch 4), which is 64 wide
ENCODER_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random timm ViT written as timm's save_for_hf does (config.json + model.safetensors)."""
    path = tmp_path_factory.mktemp("encoder")
    with torch.random.fork_rng(devices=[]), single_thread():  # no OpenMP team in the parent of forked runs
        torch.manual_seed(1)
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **ENCODER_ARGS)
    save_for_hf(net, path, model_args=ENCODER_ARGS, safe_serialization=True)
    return path, net.eval()


def test_loss_equals_independent_cosine_computation():
    torch.manual_seed(0)
    head = RepaHead(hidden_size=6, encoder_dim=5, projector_dim=7)
    h = torch.randn(3, 4, 6)  # (N, T, D) tokens as the hook would capture them
    feats = torch.randn(3, 4, 5)
    head._tokens = h
    loss = head(feats)
    # independent: the MLP by hand, then normalise, dot, mean, negate
    lin = [m for m in head.projector if isinstance(m, torch.nn.Linear)]
    torch.set_grad_enabled(False)  # the reference needs no graph (restored below)
    z = h @ lin[0].weight.T + lin[0].bias
    z = F.silu(z) @ lin[1].weight.T + lin[1].bias
    z = F.silu(z) @ lin[2].weight.T + lin[2].bias
    zn = z / z.norm(dim=-1, keepdim=True)
    fn = feats / feats.norm(dim=-1, keepdim=True)
    expected = -np.mean([[float(zn[i, t] @ fn[i, t]) for t in range(4)] for i in range(3)])
    torch.set_grad_enabled(True)
    assert abs(float(loss.detach()) - expected) < 1e-6
    assert [tuple(m.weight.shape) for m in lin] == [(7, 6), (7, 7), (5, 7)]
    with pytest.raises(ValueError, match="dimension 9"):  # features of another encoder: refused
        head.loss(torch.randn(3, 4, 9))


def test_gradient_reaches_only_blocks_up_to_k_and_the_projector():
    model = tiny_dit(depth=4).train()
    head = RepaHead(model.config.hidden_size, encoder_dim=10, projector_dim=16).attach(model, depth=2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 2])
    model(x, t, y)
    head(torch.randn(2, 16, 10)).backward()  # the REPA loss alone
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    def reached(prefix):
        return [n for n, g in grads.items() if n.startswith(prefix) and g is not None and g.abs().sum() > 0]

    for prefix in ("blocks.0.", "blocks.1.", "x_embedder.", "t_embedder.", "y_embedder."):
        assert reached(prefix), prefix
    assert not reached("blocks.2.") and not reached("blocks.3.") and not reached("final_layer.")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # the head is not part of the model, and detach() stops the capture
    assert not any(k.startswith("projector") for k in model.state_dict())
    # gradient checkpointing runs the block again in backward: the loss is the same
    model.gradient_checkpointing = True
    torch.manual_seed(1)  # the same label dropout
    model(x, t, y)
    again = head(torch.zeros(2, 16, 10).normal_(generator=torch.Generator().manual_seed(0)))
    model.gradient_checkpointing = False
    torch.manual_seed(1)
    model(x, t, y)
    torch.testing.assert_close(again, head(torch.zeros(2, 16, 10).normal_(generator=torch.Generator().manual_seed(0))))
    head.detach()
    model(x, t, y)
    with pytest.raises(RuntimeError, match="no tokens captured"):
        head(torch.randn(2, 16, 10))
    with pytest.raises(ValueError, match="repa.depth=5"):
        head.attach(model, depth=5)


def test_resampling_a_coarser_grid_is_bilinear_interpolation():
    feats = torch.randn(2, 4, 3)  # a 2 x 2 encoder grid
    out = resample_tokens(feats, 16)  # to 4 x 4
    grid = feats.transpose(1, 2).reshape(2, 3, 2, 2)
    ref = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).reshape(2, 3, 16).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    # align_corners=False on 2 -> 4: the corner token equals the corner feature
    torch.testing.assert_close(out[:, 0], feats[:, 0])
    with pytest.raises(ValueError, match="square"):
        resample_tokens(torch.randn(1, 6, 3), 16)


def test_encoder_loads_from_a_local_directory_with_its_preprocessing(encoder_dir):
    path, net = encoder_dir
    enc = load_encoder(str(path), resolution=16)
    assert enc.dim == 32 and not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.net.training  # frozen: stays in eval mode
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = enc(images)
    assert tokens.shape == (2, 16, 32) and not tokens.requires_grad
    # independent: [0, 1], bicubic to 16, the ViT's own mean/std, tokens without the class token
    x = F.interpolate((images + 1) / 2, size=(16, 16), mode="bicubic", align_corners=False)
    mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net.forward_features((x - mean) / std)[:, 1:]
    torch.testing.assert_close(tokens, ref, rtol=1e-5, atol=1e-5)


def test_a_classifier_vit_and_a_convnet_load_as_encoders(tmp_path):
    """What a user trains themselves: a ViT with its class head (dropped: its patch tokens are
    the features) and a convolutional net (its feature map's positions are the tokens)."""
    torch.manual_seed(0)
    vit_args = {**ENCODER_ARGS, "num_classes": 10}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **vit_args).eval()
    save_for_hf(vit, tmp_path / "vit", model_args=vit_args, safe_serialization=True)
    enc = load_encoder(str(tmp_path / "vit"), resolution=16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean = torch.tensor(vit.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(vit.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = vit.forward_features(((x + 1) / 2 - mean) / std)[:, 1:]
    torch.testing.assert_close(enc(x), ref, rtol=1e-5, atol=1e-5)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    save_for_hf(cnn, tmp_path / "cnn", model_args={"num_classes": 10}, safe_serialization=True)
    enc = load_encoder(str(tmp_path / "cnn"), resolution=64)  # stride 32: a 2 x 2 map
    mean = torch.tensor(cnn.pretrained_cfg["mean"]).view(1, 3, 1, 1)  # its own normalisation
    std = torch.tensor(cnn.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = cnn.forward_features(F.interpolate((x + 1) / 2, size=(64, 64), mode="bicubic", align_corners=False)
                                   .sub(mean).div(std))
    assert enc.dim == 512
    torch.testing.assert_close(enc(x), ref.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_encoder_errors_name_the_problem(tmp_path):
    with pytest.raises(EncoderUnavailable, match="does not exist"):
        load_encoder(str(tmp_path / "missing_encoder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderUnavailable, match="no config.json"):
        load_encoder(str(tmp_path / "empty"))
    with pytest.raises(EncoderUnavailable, match="not a timm model"):
        load_encoder("no_such_encoder_xyz")
    with pytest.raises(EncoderUnavailable, match="weights file"):
        load_encoder("vit_tiny_patch16_224", weights=str(tmp_path / "w.safetensors"))


def test_a_known_timm_id_offline_without_its_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(EncoderUnavailable, match="not in the local cache.*save_for_hf"):
        load_encoder("vit_tiny_patch16_224", resolution=224)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i, (h, w) in enumerate([(20, 24), (16, 16), (24, 40), (18, 30), (33, 17)]):
        (root / ("a" if i < 3 else "b")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / ("a" if i < 3 else "b") / f"{i}.png")
    return root


def test_feature_cache_holds_the_encoder_of_the_same_view(image_folder, encoder_dir, tmp_path):
    enc = load_encoder(str(encoder_dir[0]), resolution=16)
    out = build_latent_cache(image_folder, build_autoencoder("pixel"), tmp_path / "cache", 16,
                             fmt=CacheFormat(dtype="float32", shard_size=2, repa_dtype="float32"),
                             run=CacheRun(batch_size=2, num_workers=0, device="cpu", progress=False),
                             repa_encoder=enc)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["repa"] == {"name": str(encoder_dir[0]), "resolution": 16, "dim": 32, "num_tokens": 16,
                            "dtype": "float32"}
    images = ImageFolderDataset(image_folder, 16, hflip=False)
    ds = LatentCacheDataset(out, hflip=True, seed=5, repa_features=True)
    ds.check_repa(str(encoder_dir[0]), 16)
    flips = set()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            latent, label, feats = ds[i]
            flip = ds.noise_for(i)[0]
            flips.add(flip)
            image = images[i][0].flip(-1) if flip else images[i][0]
            torch.testing.assert_close(latent, image)  # pixel space: the latent is the view itself
            torch.testing.assert_close(feats, enc(image[None])[0], rtol=1e-5, atol=1e-5)
            assert label == images[i][1]
    assert flips == {False, True}
    # float16 storage is the encoder's output rounded
    half = build_latent_cache(image_folder, build_autoencoder("pixel"), tmp_path / "half", 16,
                              run=CacheRun(num_workers=0, progress=False), repa_encoder=enc)
    ds16 = LatentCacheDataset(half, hflip=False, repa_features=True)
    torch.testing.assert_close(ds16.features(3), enc(images[3][0][None])[0].half().float())
    with pytest.raises(LatentCacheMismatch, match="at 16 px, the config asks for"):
        ds.check_repa(str(encoder_dir[0]), 224)
    # the same out_dir without the encoder is a different cache
    with pytest.raises(LatentCacheMismatch, match="repa"):
        build_latent_cache(image_folder, build_autoencoder("pixel"), out, 16,
                           fmt=CacheFormat(dtype="float32", shard_size=2), run=CacheRun(num_workers=0, progress=False))
    # a cache without features cannot feed REPA
    plain = build_latent_cache(image_folder, build_autoencoder("pixel"), tmp_path / "plain", 16,
                               run=CacheRun(num_workers=0, progress=False))
    assert len(LatentCacheDataset(plain)[0]) == 2
    with pytest.raises(LatentCacheMismatch, match="no REPA encoder features"):
        LatentCacheDataset(plain, repa_features=True)


# ------------------------------------------------------------------ training with REPA

# The tiny run of conftest.TOY_RUN (2 blocks, 16 px toy images in pixel space, batch 8), 64 wide,
# a flow objective, REPA on block 1 with a small projector.
def repa_overrides(encoder: Path, *extra) -> list[str]:
    return ["objective=flow", "model.hidden_size=64", f"repa.encoder={encoder}", "repa.resolution=16",
            "repa.depth=1", "repa.projector_dim=32", "repa.coeff=0.5", *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_repa_run_lowers_both_losses_and_keeps_the_projector_out_of_the_model(tmp_path, encoder_dir):
    with single_thread():
        result = run_training(config(*repa_overrides(encoder_dir[0], "max_steps=60", "optim.lr=3e-3",
                                                     "global_batch_size=16", "ckpt.every=1000")), tmp_path / "repa")
        plain = run_training(config("objective=flow", "model.hidden_size=64", "max_steps=1", "global_batch_size=16"),
                             tmp_path / "plain")
    rows = read_metrics(tmp_path / "repa")
    repa = [r["loss/repa"] for r in rows]
    total = [r["train/loss"] for r in rows]
    assert all(-1.0 <= v <= 1.0 for v in repa)  # a mean of -cos
    assert np.mean(repa[-10:]) < np.mean(repa[:10]) - 0.2, (repa[:10], repa[-10:])  # the projector aligns
    assert np.mean(total[-10:]) < np.mean(total[:10]), (total[:10], total[-10:])
    state = torch.load(result["checkpoint"], weights_only=True)
    other = torch.load(plain["checkpoint"], weights_only=True)
    # contract 8: the model and EMA state dicts (and the model's optimizer state) have the same keys
    # with and without REPA; the projector and its AdamW live in `repa`
    for part in ("model", "ema"):
        assert state[part].keys() == other[part].keys()
    assert state["opt"]["state"].keys() == other["opt"]["state"].keys()
    head = state["repa"]["head"]
    assert [tuple(head[f"projector.{i}.weight"].shape) for i in (0, 2, 4)] == [(32, 64), (32, 32), (32, 32)]
    assert set(state["repa"]["opt"]["state"]) == set(head)
    # the exported model is the plain DiT
    DiT(**state["model_config"]).load_state_dict(state["ema"])


def test_repa_keys_are_checked_before_any_work(encoder_dir):
    with pytest.raises(ConfigError, match="repa.depth=3 is not a block"):
        check_static(config(*repa_overrides(encoder_dir[0], "repa.depth=3")))
    with pytest.raises(ConfigError, match="repa.coeff"):
        check_static(config(*repa_overrides(encoder_dir[0], "repa.coeff=-1")))
    check_static(config("repa.depth=99"))  # REPA off: its keys are not looked at


def test_training_from_the_feature_cache_equals_the_encoder_on_the_fly(tmp_path, encoder_dir):
    root = write_toy_imagefolder(tmp_path / "images", num_per_class=2, image_size=16, seed=0)
    enc = load_encoder(str(encoder_dir[0]), resolution=16)
    cache = build_latent_cache(root, build_autoencoder("pixel"), tmp_path / "cache", 16,
                               fmt=CacheFormat(dtype="float32", mean_dtype="float32", repa_dtype="float32"),
                               run=CacheRun(num_workers=0, progress=False), repa_encoder=enc)
    # DiT's diffusion objective here (the other tests train flow): REPA adds to either alike
    common = [o if o != "objective=flow" else "objective=diffusion"
              for o in repa_overrides(encoder_dir[0], "max_steps=2", "ckpt.every=1000", "data.hflip=true")]
    with single_thread():
        run_training(config(*common, "data=imagefolder", f"data.root={root}", "data.image_size=16",
                            "data.num_workers=0"), tmp_path / "fly")
        run_training(config(*common, "data=latents", f"data.root={cache}", "data.image_size=null",
                            "data.num_workers=0"), tmp_path / "cached")
    fly, cached = read_metrics(tmp_path / "fly"), read_metrics(tmp_path / "cached")
    for a, b in zip(fly, cached):
        assert math.isclose(a["loss/repa"], b["loss/repa"], rel_tol=1e-5, abs_tol=1e-6), (a, b)
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-5, abs_tol=1e-6), (a, b)
    # a cache without features is refused in one line naming the fix
    plain = build_latent_cache(root, build_autoencoder("pixel"), tmp_path / "plain", 16,
                               run=CacheRun(num_workers=0, progress=False))
    with pytest.raises(ConfigError, match="no REPA encoder features"):
        run_training(config(*common, "data=latents", f"data.root={plain}", "data.image_size=null",
                            "data.num_workers=0"), tmp_path / "refused")


@pytest.mark.slow
def test_repa_run_resumes_bitwise_after_kill9(tmp_path, encoder_dir):
    common = [*repa_overrides(encoder_dir[0]), "max_steps=12", "ckpt.every=3", "ckpt.keep_last=1",
              "optim.grad_accum_steps=2"]
    with single_thread():
        reference = torch.load(run_training(config(*common), tmp_path / "reference")["checkpoint"],
                               weights_only=True)
    run = tmp_path / "run"
    for step, when in ((5, "after_step"), (8, "mid_step")):
        assert joined(start_training(config(*common, f"debug.kill_at_step={step}", f"debug.kill_when={when}"),
                                     run)) == -9
    assert joined(start_training(config(*common), run)) == 0
    resumed = torch.load(run / "checkpoints" / "0000012.pt", weights_only=True)
    assert_same_training_state(resumed, reference)
    for key, value in reference["repa"]["head"].items():
        assert torch.equal(resumed["repa"]["head"][key], value), key
    for key, state in reference["repa"]["opt"]["state"].items():
        assert all(torch.equal(v, resumed["repa"]["opt"]["state"][key][n]) for n, v in state.items()), key


@pytest.mark.slow
def test_two_gloo_ranks_train_repa_as_one_process(tmp_path, encoder_dir):
    """The projector's gradients are averaged over ranks (the model's DDP wrapper does not know
    the head): two ranks of half the batch each end where one process does."""
    common = [*repa_overrides(encoder_dir[0]), "max_steps=3", "ckpt.every=1000"]
    with single_thread():
        single = torch.load(run_training(config(*common), tmp_path / "one")["checkpoint"], weights_only=True)
    two = train_on_two_gloo_ranks(config(*common), tmp_path / "two", step=3)
    for part, a, b in (("model", single["model"], two["model"]), ("repa", single["repa"]["head"], two["repa"]["head"])):
        for key, ref in a.items():
            rel = (b[key] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert rel <= 1e-5, f"{part}.{key}: {rel:.2e}"
    first = lambda run: json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["loss/repa"]
    assert math.isclose(first("one"), first("two"), rel_tol=1e-5)


def test_cache_latents_cli_stores_the_features_and_names_a_missing_encoder_in_one_line(
        tmp_path, encoder_dir, capsys, monkeypatch):
    root = write_toy_imagefolder(tmp_path / "images", num_per_class=1, image_size=16, seed=0)
    common = [f"data_root={root}", "vae=pixel", "image_size=16", "num_workers=0", "progress=false",
              "repa_resolution=16"]
    code, out, err = run_program("cache_latents", [*common, f"out_dir={tmp_path / 'c'}",
                                                   f"repa_encoder={encoder_dir[0]}", "repa_dtype=float32"],
                                 capsys, monkeypatch)
    assert code == 0, err
    ds = LatentCacheDataset(tmp_path / "c", hflip=False)
    assert ds.use_repa_features(str(encoder_dir[0]), 16)["dim"] == 32
    enc = load_encoder(str(encoder_dir[0]), resolution=16)
    image = ImageFolderDataset(root, 16, hflip=False)[3][0]
    torch.testing.assert_close(ds[3][2], enc(image[None])[0], rtol=1e-5, atol=1e-5)
    code, _, err = run_program("cache_latents", [*common, f"out_dir={tmp_path / 'd'}",
                                                 f"repa_encoder={tmp_path / 'no_encoder'}"], capsys, monkeypatch)
    assert_one_line(code, err, "no_encoder", "save_for_hf")
    assert not (tmp_path / "d").exists()  # refused before any work


def test_gradient_accumulation_gives_the_update_of_the_whole_batch(tmp_path, encoder_dir):
    """Each micro-batch aligns its own rows' features: two micro-batches update the projector
    and the model as one batch does (up to float rounding)."""
    common = [*repa_overrides(encoder_dir[0]), "max_steps=2", "ckpt.every=1000", "optim.lr=1e-3"]
    with single_thread():
        one = torch.load(run_training(config(*common), tmp_path / "one")["checkpoint"], weights_only=True)
        two = torch.load(run_training(config(*common, "optim.grad_accum_steps=2"), tmp_path / "two")["checkpoint"],
                         weights_only=True)
    for part, a, b in (("model", one["model"], two["model"]), ("repa", one["repa"]["head"], two["repa"]["head"])):
        for key, ref in a.items():
            rel = (b[key] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert rel <= 1e-5, f"{part}.{key}: {rel:.2e}"
    assert not torch.equal(one["repa"]["head"]["projector.0.weight"],
                           load_initial_projector(encoder_dir[0], tmp_path))  # it did train


def load_initial_projector(encoder: Path, tmp_path: Path) -> torch.Tensor:
    """The projector's first weight at step 0 (a run's checkpoint after 0 updates: lr 0)."""
    with single_thread():
        state = torch.load(run_training(config(*repa_overrides(encoder), "max_steps=1", "optim.lr=0"),
                                        tmp_path / "init")["checkpoint"], weights_only=True)
    return state["repa"]["head"]["projector.0.weight"]
