"""Issue 22, items 5 and 7: REPA's projector initialisation and its DINOv2 position table, as
REPA's own code (sihyun-yu/REPA@67f7145) has them.

- item 5: REPA's SiT initialises every linear layer, its projectors included, with Xavier-uniform
  weights and zero biases (models/sit.py:16-23, 206-208, 210-219). Ours used torch's default
  (Kaiming-uniform weights with bound 1/sqrt(fan_in), uniform biases). The init still comes from
  the run's seed alone.
- item 7: REPA loads DINOv2 through torch.hub and resamples its position table once, to the patch
  grid of the encoder's input, with timm's `resample_abs_pos_embed` (bicubic, antialiased, one
  prefix token: utils.py:95-98); DINOv2 then uses the table as it is. Our torch.hub path left the
  518 px table to DINOv2's interpolation at every call (bicubic without antialiasing): other
  targets. A tiny DINOv2-like network planted in a temporary, offline torch.hub cache (it
  interpolates its table per call as DINOv2 does when the grid differs) shows the hub path now
  gives REPA's table and tokens, the same as timm's loader on the same weights, and not the
  per-call interpolation's.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import save_for_hf

from conftest import tiny_dit, toy_run_config
from dit.models.repa import IMAGENET_MEAN, IMAGENET_STD, RepaHead, load_encoder

# ------------------------------------------------------------------------------ item 5


def _linears(head: RepaHead) -> list[torch.nn.Linear]:
    return [m for m in head.projector if isinstance(m, torch.nn.Linear)]


def test_the_projector_starts_xavier_uniform_with_zero_biases_as_repa():
    """The paper's head (SiT-XL/2's 1152 -> 2048 -> 2048 -> DINOv2-B's 768): each weight is
    uniform on [-b, b], b = sqrt(6 / (fan_in + fan_out)) (Xavier-uniform: its largest entry
    reaches b, its standard deviation is b / sqrt(3)); each bias is zero. torch's default init
    (bound 1/sqrt(fan_in), 0.68 b to 0.58 b here, and non-zero biases) fails every check."""
    torch.manual_seed(0)
    head = RepaHead(1152, 768, projector_dim=2048)
    layers = _linears(head)
    assert [tuple(m.weight.shape) for m in layers] == [(2048, 1152), (2048, 2048), (768, 2048)]
    for i, layer in enumerate(layers):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = layer.weight.detach().double()
        assert float(w.abs().max()) <= bound, i
        assert float(w.abs().max()) > 0.999 * bound, (i, float(w.abs().max()), bound)
        assert math.isclose(float(w.std()), bound / math.sqrt(3.0), rel_tol=0.01), (i, float(w.std()), bound)
        assert abs(float(w.mean())) < 0.01 * bound, i
        assert torch.count_nonzero(layer.bias) == 0, i


def test_the_projector_init_is_fixed_by_the_seed_and_the_trainer_seeds_it_with_the_run_seed():
    """The same seed, the same head; another seed, another head. The trainer builds it under the
    run's `seed` (whatever the global generator held before, which it leaves as it was): the head
    of `seed=3` is the head built right after torch.manual_seed(3)."""
    from dit.train.trainer import build_repa

    def head_of(seed: int) -> dict:
        torch.manual_seed(seed)
        return RepaHead(32, 24, projector_dim=16).state_dict()

    assert all(torch.equal(a, b) for a, b in zip(head_of(1).values(), head_of(1).values()))
    assert not torch.equal(head_of(1)["projector.0.weight"], head_of(2)["projector.0.weight"])

    # a latents cache with features of width 24: no encoder is loaded
    cached = SimpleNamespace(encoded=True, dataset=SimpleNamespace(use_repa_features=lambda name, res: {"dim": 24}))

    def trained_head(seed: int) -> dict:
        cfg = toy_run_config("repa.encoder=some-encoder", "repa.depth=1", "repa.projector_dim=16", f"seed={seed}")
        model = tiny_dit()  # 32 wide
        torch.manual_seed(12345)  # the global generator before: neither used nor changed
        before = torch.random.get_rng_state()
        term = build_repa(cfg, model, cached, torch.device("cpu"))
        assert torch.equal(torch.random.get_rng_state(), before)
        term.head.detach()
        return term.head.state_dict()

    for seed in (3, 4):
        got, want = trained_head(seed), head_of(seed)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), seed
        assert all(torch.count_nonzero(got[f"projector.{i}.bias"]) == 0 for i in (0, 2, 4))
    assert not torch.equal(trained_head(3)["projector.0.weight"], trained_head(4)["projector.0.weight"])


# ------------------------------------------------------------------------------ item 7

PATCH, TRAIN_SIDE, WIDTH = 14, 518, 16  # DINOv2's patch and training side (a 37 x 37 table), narrow
# timm's DINOv2 architecture (ImageNet's mean and std, layer scale), one narrow block
VIT_ARGS = dict(img_size=TRAIN_SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=1, num_heads=2, init_values=1e-5)

# The planted hubconf.py: DINOv2's interface on a timm ViT. forward_features takes any multiple
# of the patch, adds the position table interpolated to the input's grid at every call when the
# grids differ (bicubic, no antialiasing: what DINOv2's interpolate_pos_encoding does), and
# returns a dict holding the normalised patch tokens; the weights are the test's.
HUBCONF = '''
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


class DinoLike(VisionTransformer):
    patch_size, num_tokens = {patch}, 1

    def forward_features(self, x):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        table = self.pos_embed
        side = round((table.shape[1] - 1) ** 0.5)
        if (side, side) != (h, w):
            grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=False)
            table = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(table.dtype)], dim=1)
        x = self.norm(self.blocks(self.norm_pre(x + table)))
        return {{"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1:]}}


def build():
    net = DinoLike(num_classes=0, **{vit_args!r})
    net.load_state_dict(torch.load({weights!r}, weights_only=True))
    return net.eval()


def dinov2_vitb14(*args, **kwargs):
    return build()
'''


def _smooth_table(side: int, width: int) -> torch.Tensor:
    """A (1, 1 + side^2, width) table of low-frequency waves over the grid (as a trained table is
    smooth), the class token's entry first."""
    i, j = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                          indexing="ij")
    gen = torch.Generator().manual_seed(7)
    freq = torch.rand(width, 2, generator=gen, dtype=torch.float64) * 3  # up to 3 periods across
    phase = torch.rand(width, generator=gen, dtype=torch.float64) * 2 * math.pi
    waves = torch.sin(2 * math.pi * (freq[:, :1, None] * i + freq[:, 1:, None] * j) / side + phase[:, None, None])
    grid = waves.reshape(width, side * side).T.float()
    return torch.cat([torch.randn(1, width, generator=gen).float(), grid])[None]


@pytest.fixture
def planted_dinov2(tmp_path, monkeypatch):
    """An offline torch.hub cache holding facebookresearch/dinov2 with the DINOv2-like network,
    the same weights written as timm's save_for_hf does, and a builder of a fresh copy."""
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **VIT_ARGS)
    with torch.no_grad():
        net.pos_embed.copy_(_smooth_table(TRAIN_SIDE // PATCH, WIDTH))
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    timm_dir = tmp_path / "timm_encoder"
    save_for_hf(net, timm_dir, model_args=VIT_ARGS, safe_serialization=True)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() follows TORCH_HOME
    monkeypatch.setattr(torch.hub, "urlopen", _offline)
    repo = Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(HUBCONF.format(patch=PATCH, vit_args=VIT_ARGS, weights=str(weights)))

    def fresh():  # the hub network as torch.hub.load returns it, before anything of ours
        return torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14", skip_validation=True, trust_repo=True)

    return SimpleNamespace(fresh=fresh, timm_dir=timm_dir)


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("offline (test)")


def _normalised(images: torch.Tensor) -> torch.Tensor:
    """What the encoder feeds the network: [-1, 1] -> [0, 1] -> ImageNet's mean and std."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


@pytest.mark.parametrize("resolution", [224, 112])  # REPA's 16 x 16 grid, and 8 x 8
@torch.no_grad()
def test_the_hub_encoder_gets_repas_position_table_and_tokens_like_the_timm_loader(planted_dinov2, resolution):
    grid = resolution // PATCH
    original = planted_dinov2.fresh().pos_embed.detach().clone()
    assert original.shape == (1, 1 + (TRAIN_SIDE // PATCH) ** 2, WIDTH)
    repas = resample_abs_pos_embed(original, [grid, grid], num_prefix_tokens=1)  # REPA's, at load

    encoder = load_encoder("facebookresearch/dinov2:dinov2_vitb14", resolution=resolution, trust_hub_repo=True)
    table = encoder.net.pos_embed.detach()
    assert table.shape == (1, 1 + grid * grid, WIDTH), table.shape
    assert float((table - repas).abs().max()) <= 1e-6

    images = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, grid * grid, WIDTH)
    reference = planted_dinov2.fresh()  # REPA's encoder: the hub network, its table resized by timm once
    reference.pos_embed.data = resample_abs_pos_embed(reference.pos_embed.data, [grid, grid], num_prefix_tokens=1)
    want = reference.forward_features(_normalised(images))["x_norm_patchtokens"]
    assert float((tokens - want).abs().max()) <= 1e-6

    # timm's loader, the same weights saved at 518 px and loaded at `resolution`: the same tokens
    timm_tokens = load_encoder(str(planted_dinov2.timm_dir), resolution=resolution)(images)
    assert float((timm_tokens - tokens).abs().max()) <= 1e-6

    # what the hub path gave before: the 37 x 37 table interpolated at every call, not REPA's
    per_call = planted_dinov2.fresh().forward_features(_normalised(images))["x_norm_patchtokens"]
    assert float((per_call - want).abs().max()) > 1e-3
