"""The DiT model as a specification.

The central test writes the paper's equations out again in plain float64 torch (nothing from
`dit.models` but the class under test), fills a state dict in the official release layout with
random weights, loads it with `strict=True`, and compares the two forward passes.
"""

from __future__ import annotations

import math

import pytest
import torch

from dit.models import (
    DiT,
    DiT_models,
    LabelEmbedder,
    arch_name,
    canonical_model_name,
    model_arch,
)

# --------------------------------------------------------------------------------------
# Independent float64 reference of the paper's equations
# --------------------------------------------------------------------------------------


def ref_timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)], w_i = exp(-ln(10000) i / half), i < half = dim / 2."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float64)
    w = torch.exp(-math.log(10000.0) * i / half)
    a = t.double()[:, None] * w[None, :]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


def ref_sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos w_j), cos(pos w_j)], w_j = 1 / 10000^(j / (dim/2))."""
    j = torch.arange(dim // 2, dtype=torch.float64)
    w = 10000.0 ** (-j / (dim / 2))
    a = pos.double()[:, None] * w[None, :]
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


def ref_pos_table(dim: int, grid: int) -> torch.Tensor:
    """MAE 2-D table for row-major tokens k = row * grid + col: first half of the channels
    encodes the column, second half the row. Returns (grid*grid, dim) float64."""
    k = torch.arange(grid * grid)
    row, col = k // grid, k % grid
    return torch.cat([ref_sincos_1d(dim // 2, col), ref_sincos_1d(dim // 2, row)], dim=1)


def ref_layernorm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + 1e-6)


def ref_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def ref_linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def ref_forward(sd: dict, cfg: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DiT forward from the equations; everything float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n, c_in, side, _ = x.shape
    p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    g = side // p
    # Patchify: token k = (row, col) row-major; each patch flattened as (channel, i, j),
    # which is the layout of the (D, C, p, p) convolution weight.
    patches = x.reshape(n, c_in, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c_in * p * p)
    w = sd["x_embedder.proj.weight"].reshape(d, -1)
    h = patches @ w.T + sd["x_embedder.proj.bias"] + sd["pos_embed"]  # (n, T, d)

    t_hidden = ref_silu(ref_linear(ref_timestep_features(t, 256), sd, "t_embedder.mlp.0"))
    t_emb = ref_linear(t_hidden, sd, "t_embedder.mlp.2")
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    cond = t_emb + y_emb  # (n, d)

    for i in range(cfg["depth"]):
        b = f"blocks.{i}"
        mod = ref_linear(ref_silu(cond), sd, f"{b}.adaLN_modulation.1")
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in mod.split(d, dim=1))

        a = ref_layernorm(h) * (1 + scale1) + shift1
        qkv = ref_linear(a, sd, f"{b}.attn.qkv")  # (n, T, 3d): [q | k | v], heads contiguous
        q, k, v = (z.reshape(n, g * g, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=2))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(n, g * g, d)
        h = h + gate1 * ref_linear(o, sd, f"{b}.attn.proj")

        a = ref_layernorm(h) * (1 + scale2) + shift2
        m = ref_linear(ref_gelu_tanh(ref_linear(a, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
        h = h + gate2 * m

    mod = ref_linear(ref_silu(cond), sd, "final_layer.adaLN_modulation.1")
    shift, scale = (m[:, None, :] for m in mod.split(d, dim=1))
    out = ref_linear(ref_layernorm(h) * (1 + scale) + shift, sd, "final_layer.linear")  # (n, T, p*p*c_out)
    # Unpatchify: each token's outputs are laid out (i, j, channel).
    c_out = out.shape[-1] // (p * p)
    out = out.reshape(n, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, c_out, g * p, g * p)


def official_random_state_dict(cfg: dict, generator: torch.Generator, token_scale: float = 1.0) -> dict:
    """Random weights under the official key names and shapes (written from the release's
    layout, not read off our model), scaled so every term of the forward pass matters:
    non-zero adaLN modulation and output layers included. `token_scale` shrinks the patch
    embedding and position table, so the first LayerNorm sees a variance near its eps."""
    d, p, c = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
    mlp = int(d * cfg["mlp_ratio"])
    c_out = 2 * c if cfg["learn_sigma"] else c
    rows = cfg["num_classes"] + int(cfg["class_dropout_prob"] > 0)
    grid = cfg["input_size"] // p

    def lin(name, out_f, in_f, scale=1.0):
        return {
            f"{name}.weight": torch.randn(out_f, in_f, generator=generator, dtype=torch.float64)
            * scale / math.sqrt(in_f),
            f"{name}.bias": torch.randn(out_f, generator=generator, dtype=torch.float64) * 0.1,
        }

    sd = {
        "pos_embed": ref_pos_table(d, grid)[None] * token_scale,
        "x_embedder.proj.weight": torch.randn(d, c, p, p, generator=generator, dtype=torch.float64)
        * token_scale / math.sqrt(c * p * p),
        "x_embedder.proj.bias": torch.randn(d, generator=generator, dtype=torch.float64) * 0.1 * token_scale,
        "y_embedder.embedding_table.weight": torch.randn(rows, d, generator=generator, dtype=torch.float64),
    }
    sd |= lin("t_embedder.mlp.0", d, 256)
    sd |= lin("t_embedder.mlp.2", d, d)
    for i in range(cfg["depth"]):
        b = f"blocks.{i}"
        sd |= lin(f"{b}.attn.qkv", 3 * d, d)
        sd |= lin(f"{b}.attn.proj", d, d)
        sd |= lin(f"{b}.mlp.fc1", mlp, d)
        sd |= lin(f"{b}.mlp.fc2", d, mlp)
        sd |= lin(f"{b}.adaLN_modulation.1", 6 * d, d, scale=0.5)
    sd |= lin("final_layer.linear", p * p * c_out, d)
    sd |= lin("final_layer.adaLN_modulation.1", 2 * d, d, scale=0.5)
    # Round to float32 once, so both implementations see exactly the same numbers.
    return {k: v.float() for k, v in sd.items()}


def tiny_cfg(**kw) -> dict:
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
               mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
    cfg.update(kw)
    return cfg


EQUATION_CONFIGS = {
    "p2-sigma-null": tiny_cfg(),
    "p4-nosigma-nonull": tiny_cfg(input_size=16, patch_size=4, in_channels=3, hidden_size=48, num_heads=3,
                                  mlp_ratio=2.0, class_dropout_prob=0.0, learn_sigma=False),
    "p8-sigma-deep": tiny_cfg(input_size=16, patch_size=8, hidden_size=96, num_heads=6, depth=3, num_classes=7),
    "p2-nonsquare-heads": tiny_cfg(input_size=6, patch_size=2, in_channels=2, hidden_size=40, num_heads=5,
                                   mlp_ratio=3.0, depth=1),
    # Token variance ~1e-6 makes the LayerNorm eps (1e-6, not torch's 1e-5) visible.
    "p2-eps-sensitive": tiny_cfg(depth=1),
}
# Small tokens, small t: the float32 timestep features (as in the release) cost ~2e-6 at
# t ~ 1000, which small tokens amplify; the eps check does not need large t.
CASE_OPTIONS = {"p2-eps-sensitive": {"token_scale": 3e-3, "t": [0.0, 5.0, 20.0]}}


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", list(EQUATION_CONFIGS))
def test_official_layout_loads_strict_and_matches_paper_equations(name):
    cfg = EQUATION_CONFIGS[name]
    gen = torch.Generator().manual_seed(1234)
    opts = CASE_OPTIONS.get(name, {})
    sd = official_random_state_dict(cfg, gen, opts.get("token_scale", 1.0))
    model = DiT(**cfg).eval()
    model.load_state_dict(sd, strict=True)

    n = 3
    x = torch.randn(n, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=gen)
    t = torch.tensor(opts.get("t", [0.0, 417.0, 999.0]))
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    y = torch.tensor([0, rows - 1, 3])  # includes the null row when there is one

    with torch.no_grad():
        out = model(x, t, y)
    ref = ref_forward(sd, cfg, x, t, y)
    c_out = 2 * cfg["in_channels"] if cfg["learn_sigma"] else cfg["in_channels"]
    assert out.shape == (n, c_out, cfg["input_size"], cfg["input_size"])
    assert out.dtype == torch.float32
    assert ref.abs().max() > 0.1  # the random weights make every term count
    err = max_rel_err(out, ref)
    print(f"{name}: max relative error vs float64 reference = {err:.2e}")
    assert err <= 1e-5


def test_reference_is_sensitive_to_modulation_order():
    """Guards the reference itself: swapping shift and scale changes the output a lot, so the
    1e-5 agreement above is not an accident of tiny modulation weights."""
    cfg = EQUATION_CONFIGS["p2-sigma-null"]
    sd = official_random_state_dict(cfg, torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    ref = ref_forward(sd, cfg, x, t, y)
    swapped = dict(sd)
    for i in range(cfg["depth"]):
        for part in ("weight", "bias"):
            k = f"blocks.{i}.adaLN_modulation.1.{part}"
            s = sd[k].split(cfg["hidden_size"])
            swapped[k] = torch.cat([s[1], s[0], *s[2:]])
    assert max_rel_err(ref_forward(swapped, cfg, x, t, y).float(), ref) > 1e-2


# --------------------------------------------------------------------------------------
# The twelve configurations
# --------------------------------------------------------------------------------------

# REFERENCE_NUMBERS.md: (with pos_embed, trainable) at 256x256, 4 latent channels, learned
# sigma, 1000 classes + null.
PARAM_COUNTS = {
    "DiT-S/2": (32_963_360, 32_865_056),
    "DiT-S/4": (32_945_024, 32_920_448),
    "DiT-S/8": (33_148_160, 33_142_016),
    "DiT-B/2": (130_512_416, 130_315_808),
    "DiT-B/4": (130_475_648, 130_426_496),
    "DiT-B/8": (130_881_536, 130_869_248),
    "DiT-L/2": (458_102_816, 457_840_672),
    "DiT-L/4": (458_053_760, 457_988_224),
    "DiT-L/8": (458_594_816, 458_578_432),
    "DiT-XL/2": (675_129_632, 674_834_720),
    "DiT-XL/4": (675_074_432, 675_000_704),
    "DiT-XL/8": (675_683_072, 675_664_640),
}


def test_the_twelve_models_exist_with_official_names():
    assert set(DiT_models) == set(PARAM_COUNTS)


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_counts_match_reference(name):
    with torch.device("meta"):  # no memory for XL
        model = DiT_models[name]()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == PARAM_COUNTS[name]
    arch = model_arch(name)
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (
        arch["depth"], arch["hidden_size"], arch["num_heads"], arch["patch_size"])
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (32, 4, 1000, True)
    assert model.y_embedder.embedding_table.weight.shape[0] == 1001


def test_factory_kwargs_reach_the_model():
    with torch.device("meta"):
        model = DiT_models["DiT-B/4"](input_size=64, in_channels=3, num_classes=10,
                                     class_dropout_prob=0.0, learn_sigma=False, mlp_ratio=2.0)
    assert model.pos_embed.shape == (1, (64 // 4) ** 2, 768)
    assert model.x_embedder.proj.weight.shape == (768, 3, 4, 4)
    assert model.y_embedder.embedding_table.weight.shape == (10, 768)  # no null row
    assert model.final_layer.linear.weight.shape == (4 * 4 * 3, 768)
    assert model.blocks[0].mlp.fc1.weight.shape == (1536, 768)


# --------------------------------------------------------------------------------------
# Initialisation (adaLN-Zero)
# --------------------------------------------------------------------------------------


def test_init_is_adaln_zero_and_outputs_exactly_zero():
    model = DiT(**tiny_cfg(num_classes=1000)).eval()
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
    for p in (model.final_layer.adaLN_modulation[1].weight, model.final_layer.adaLN_modulation[1].bias,
              model.final_layer.linear.weight, model.final_layer.linear.bias):
        assert torch.count_nonzero(p) == 0
    out = model(torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 5, 999, 1000]))
    assert out.shape == (4, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_init_pos_embed_is_fixed_mae_table():
    model = DiT(**tiny_cfg(input_size=12, patch_size=2, hidden_size=64))
    grid = 6
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0].double(), ref_pos_table(64, grid), atol=1e-7, rtol=0)
    # Spot-check the layout: token (row 1, col 0) has sin(0)=0 in the column half and
    # sin(1 * w_0) = sin(1) in the first channel of the row half.
    assert model.pos_embed[0, grid, 0].item() == 0.0
    assert model.pos_embed[0, grid, 32].item() == pytest.approx(math.sin(1.0), abs=1e-7)


def test_init_embeddings_normal_002_and_linears_xavier():
    model = DiT(**tiny_cfg(hidden_size=128, num_heads=4, num_classes=1000))
    for w in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.03)
        assert abs(w.mean().item()) < 1e-3
    for w, (fan_out, fan_in) in ((model.blocks[0].attn.qkv.weight, (384, 128)),
                                 (model.blocks[1].mlp.fc2.weight, (128, 512)),
                                 (model.x_embedder.proj.weight.flatten(1), (128, 16))):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max().item() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)  # uniform(-b, b)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0


def test_seed_fixes_init():
    torch.manual_seed(7)
    a = DiT(**tiny_cfg()).state_dict()
    torch.manual_seed(7)
    b = DiT(**tiny_cfg()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warns_when_timm_fused_attention_is_off_and_outputs_agree():
    import warnings

    from timm.layers import set_fused_attn, use_fused_attn

    cfg = tiny_cfg()
    state = official_random_state_dict(cfg, torch.Generator().manual_seed(3))
    assert use_fused_attn()  # the default: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = DiT(**cfg).eval()
    set_fused_attn(False)
    try:
        with pytest.warns(UserWarning, match="TIMM_FUSED_ATTN"):
            plain = DiT(**cfg).eval()
    finally:
        set_fused_attn(True)
    fused.load_state_dict(state)
    plain.load_state_dict(state)
    x, t, y = torch.randn(2, cfg["in_channels"], 8, 8), torch.tensor([5.0, 700.0]), torch.tensor([1, 2])
    assert not plain.blocks[0].attn.fused_attn and fused.blocks[0].attn.fused_attn
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, y), fused(x, t, y), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------


@pytest.fixture
def random_model():
    cfg = tiny_cfg()
    model = DiT(**cfg).eval()
    model.load_state_dict(official_random_state_dict(cfg, torch.Generator().manual_seed(5)))
    return model


def _cfg_inputs(n=3):
    x = torch.randn(n, 4, 8, 8)
    t = torch.tensor([3.0, 250.0, 990.0])[:n]
    labels = torch.tensor([1, 7, 9])[:n]
    null = torch.full_like(labels, 10)  # null id = num_classes
    # The second half of x is ignored by design; fill it with something else to prove it.
    return (torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([labels, null]), x, t, labels, null)


@torch.no_grad()
def test_cfg_scale_one_is_conditional_output(random_model):
    xx, tt, yy, x, t, labels, null = _cfg_inputs()
    out = random_model.forward_with_cfg(xx, tt, yy, cfg_scale=1.0, guided_channels="all")
    cond = random_model(x, t, labels)
    uncond = random_model(x, t, null)
    assert (cond - uncond).abs().max() > 1e-2  # the label matters in this model
    torch.testing.assert_close(out[:3], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3:, :4], cond[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3:, 4:], uncond[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guided, k", [(3, 3), ("all", 4), (1, 1)])
@torch.no_grad()
def test_cfg_guides_only_the_chosen_channels(random_model, guided, k):
    s = 4.0
    xx, tt, yy, x, t, labels, null = _cfg_inputs()
    out = random_model.forward_with_cfg(xx, tt, yy, cfg_scale=s, guided_channels=guided)
    cond = random_model(x, t, labels)
    uncond = random_model(x, t, null)
    guided_eps = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
    assert out.shape == (6, 8, 8, 8)
    for half, plain in ((out[:3], cond), (out[3:], uncond)):
        torch.testing.assert_close(half[:, :k], guided_eps, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(half[:, k:], plain[:, k:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [0, 5, -1, "some", None])
def test_cfg_rejects_bad_guided_channels(random_model, bad):
    xx, tt, yy, *_ = _cfg_inputs()
    with pytest.raises(ValueError, match="guided_channels"):
        random_model.forward_with_cfg(xx, tt, yy, cfg_scale=2.0, guided_channels=bad)


# --------------------------------------------------------------------------------------
# Label dropout
# --------------------------------------------------------------------------------------


def test_label_dropout_uses_null_id_and_only_in_train_mode():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    table = emb.embedding_table.weight
    assert table.shape == (11, 8)  # null row = id 10
    labels = torch.arange(400) % 10
    torch.testing.assert_close(emb(labels, train=False), table[labels], rtol=0, atol=0)

    out = emb(labels, train=True)
    is_null = (out == table[10]).all(dim=1)
    is_label = (out == table[labels]).all(dim=1)
    assert bool((is_null | is_label).all())
    assert 120 < int(is_null.sum()) < 280  # about half of 400


def test_force_drop_ids_drop_exactly_the_marked_labels():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    table = emb.embedding_table.weight
    labels = torch.tensor([1, 2, 3, 4])
    force = torch.tensor([1, 0, 1, 0])
    expected = table[torch.tensor([10, 2, 10, 4])]
    for train in (False, True):
        torch.testing.assert_close(emb(labels, train=train, force_drop_ids=force), expected, rtol=0, atol=0)


def test_no_dropout_means_no_null_row_and_no_drop():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0)
    assert emb.embedding_table.weight.shape == (10, 8)
    labels = torch.arange(10)
    torch.testing.assert_close(emb(labels, train=True), emb.embedding_table.weight, rtol=0, atol=0)


@torch.no_grad()
def test_model_drops_labels_in_train_mode_only():
    cfg = tiny_cfg(class_dropout_prob=1.0)  # every label dropped while training
    model = DiT(**cfg)
    model.load_state_dict(official_random_state_dict(cfg, torch.Generator().manual_seed(3)))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.tensor([2, 3])
    model.train()
    train_out = model(x, t, y)
    model.eval()
    torch.testing.assert_close(train_out, model(x, t, torch.tensor([10, 10])), rtol=0, atol=0)
    assert (model(x, t, y) - train_out).abs().max() > 1e-3


def test_gradient_checkpointing_gives_same_gradients(random_model):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.tensor([2, 3])
    random_model.train()
    random_model.y_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
    grads = []
    for ckpt in (False, True):
        random_model.zero_grad()
        random_model.gradient_checkpointing = ckpt
        random_model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in random_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling, canonical", [
    ("DiT-XL/2", "DiT-XL/2"), ("DiT-XL-2", "DiT-XL/2"), ("DiT_XL_2", "DiT-XL/2"),
    (" DiT-S/8 ", "DiT-S/8"), ("DiT-B-4", "DiT-B/4"),
])
def test_canonical_model_name(spelling, canonical):
    assert canonical_model_name(spelling) == canonical


@pytest.mark.parametrize("bad", ["DiT-XXL/2", "DiT-S/3", "dit-s/2", "", "XL/2"])
def test_unknown_model_name_errors_and_lists_choices(bad):
    with pytest.raises(ValueError, match="unknown model") as e:
        canonical_model_name(bad)
    assert "DiT-XL/2" in str(e.value)
    with pytest.raises(ValueError):
        model_arch(bad)


def test_model_arch_and_arch_name_are_inverse():
    assert model_arch("DiT-XL-2") == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}
    assert model_arch("DiT-S/4") == {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 4}
    for name in DiT_models:
        a = model_arch(name)
        assert arch_name(a["depth"], a["hidden_size"], a["num_heads"], a["patch_size"]) == name
    assert arch_name(12, 384, 6, 3) is None
    assert arch_name(2, 64, 4, 2) is None
