"""LightningDiT's architecture options on the DiT model, as specifications.

Each option is checked against its formula written out again here in float64 (RMSNorm, SwiGLU,
qk-norm, the 2-D rotary table and its relative-position property, shift-free modulation), then
the whole model with options against a float64 forward pass built from those formulas; the
defaults must build the official model bit for bit; each option trains; checkpoints rebuild
the options.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_DIT
from test_models import (
    max_rel_err,
    ref_gelu_tanh,
    ref_layernorm,
    ref_linear,
    ref_silu,
    ref_timestep_features,
    tiny_cfg,
)

from dit.io.checkpoint import load_dit_checkpoint, save_atomic, save_weights_safetensors, with_checksum
from dit.diffusion import create_diffusion
from dit.models.layers import adaln_norm, apply_rope, make_attention, make_mlp, rope_table, swiglu_hidden
from dit.models import DiT, DiTConfig, describe, param_counts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

ALL_OPTIONS = dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True, modulation="scale_gate")
OPTION_CASES = {
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "rope": dict(rope=True),
    "qk_norm": dict(qk_norm=True),
    "qk_norm-rmsnorm": dict(qk_norm=True, norm="rmsnorm"),
    "scale_gate": dict(modulation="scale_gate"),
    "all": ALL_OPTIONS,
}

# --------------------------------------------------------------------------------------
# Independent float64 formulas
# --------------------------------------------------------------------------------------


def ref_rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def ref_affine_layernorm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps) * weight + bias


def ref_rope_angles(head_dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(T, head_dim / 2) rotation angle of each channel pair: pairs m < head_dim / 4 turn with the
    row at frequency 10000^(-m / (head_dim/4)), the next head_dim / 4 pairs with the column."""
    quarter = head_dim // 4
    freq = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    return torch.cat([rows.double()[:, None] * freq, cols.double()[:, None] * freq], dim=1)


def ref_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2m, 2m+1) of x (..., T, head_dim) as complex numbers x_2m + i x_2m+1
    times exp(i angle)."""
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def grid_positions(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(grid * grid)
    return k // grid, k % grid


def ref_forward_options(sd: dict, cfg: dict, x, t, y) -> torch.Tensor:
    """DiT forward with the architecture options of `cfg`, everything float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    n, c_in, side, _ = x.shape
    p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    hd, g = d // heads, side // p
    rms = cfg.get("norm") == "rmsnorm"
    norm = ref_rmsnorm if rms else ref_layernorm
    shift_free = cfg.get("modulation") == "scale_gate"
    patches = x.reshape(n, c_in, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c_in * p * p)
    h = patches @ sd["x_embedder.proj.weight"].reshape(d, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    t_emb = ref_linear(ref_silu(ref_linear(ref_timestep_features(t, 256), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    cond = t_emb + sd["y_embedder.embedding_table.weight"][y]
    angles = ref_rope_angles(hd, *grid_positions(g))

    def qk_norm(z, name):
        if not cfg.get("qk_norm"):
            return z
        if rms:
            return ref_rmsnorm(z) * sd[f"{name}.weight"]
        return ref_affine_layernorm(z, sd[f"{name}.weight"], sd[f"{name}.bias"])

    for i in range(cfg["depth"]):
        b = f"blocks.{i}"
        mod = [m[:, None, :] for m in ref_linear(ref_silu(cond), sd, f"{b}.adaLN_modulation.1").split(d, dim=1)]
        if shift_free:
            (scale1, gate1, scale2, gate2), shift1, shift2 = mod, 0.0, 0.0
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod
        a = norm(h) * (1 + scale1) + shift1
        q, k, v = (z.reshape(n, g * g, heads, hd).transpose(1, 2) for z in ref_linear(a, sd, f"{b}.attn.qkv").split(d, dim=2))
        q, k = qk_norm(q, f"{b}.attn.q_norm"), qk_norm(k, f"{b}.attn.k_norm")
        if cfg.get("rope"):
            q, k = ref_rotate(q, angles), ref_rotate(k, angles)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        h = h + gate1 * ref_linear((att @ v).transpose(1, 2).reshape(n, g * g, d), sd, f"{b}.attn.proj")
        a = norm(h) * (1 + scale2) + shift2
        if cfg.get("mlp") == "swiglu":
            gate, value = ref_linear(a, sd, f"{b}.mlp.fc1").chunk(2, dim=-1)
            m = ref_linear(ref_silu(gate) * value, sd, f"{b}.mlp.fc2")
        else:
            m = ref_linear(ref_gelu_tanh(ref_linear(a, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
        h = h + gate2 * m
    shift, scale = (m[:, None, :] for m in ref_linear(ref_silu(cond), sd, "final_layer.adaLN_modulation.1").split(d, dim=1))
    out = ref_linear(norm(h) * (1 + scale) + shift, sd, "final_layer.linear")
    c_out = out.shape[-1] // (p * p)
    return out.reshape(n, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(n, c_out, g * p, g * p)


def random_weights(model: DiT, gen: torch.Generator) -> dict:
    """Every trained tensor of `model` drawn at random (so that every term counts), float32."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "pos_embed":
            sd[k] = v.clone()
        elif k.endswith("norm.weight"):
            sd[k] = 1 + 0.3 * torch.randn(v.shape, generator=gen)
        elif v.ndim == 1:
            sd[k] = 0.1 * torch.randn(v.shape, generator=gen)
        else:
            scale = 0.5 if "adaLN" in k else 1.0
            sd[k] = scale * torch.randn(v.shape, generator=gen) / math.sqrt(v[0].numel() if v.ndim > 1 else 1)
    return sd


# --------------------------------------------------------------------------------------
# Defaults: the official model, bit for bit
# --------------------------------------------------------------------------------------


def test_options_at_their_defaults_build_the_official_model_bitwise():
    base = dict(TINY_DIT, num_heads=4)
    defaults = dict(norm="layernorm", mlp="gelu", rope=False, qk_norm=False, modulation="shift_scale_gate")
    torch.manual_seed(3)
    plain = DiT(**base)
    torch.manual_seed(3)
    explicit = DiT(**base, **defaults)
    a, b = plain.state_dict(), explicit.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [type(m) for m in plain.modules()] == [type(m) for m in explicit.modules()]
    # The record of the official model is what it was before the options existed.
    assert plain.config.to_dict() == explicit.config.to_dict() == {
        "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 4,
        "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 5, "learn_sigma": True}
    assert plain.config.options() == {}
    with torch.no_grad():
        for p in list(plain.parameters()) + list(explicit.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 400.0, 999.0]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        assert torch.equal(plain.eval()(x, t, y), explicit.eval()(x, t, y))


def test_options_are_recorded_only_when_they_differ_and_read_back():
    config = DiTConfig(**TINY_DIT, rope=True, mlp="swiglu")
    record = config.to_dict()
    assert {k: record[k] for k in ("rope", "mlp")} == {"rope": True, "mlp": "swiglu"}
    assert not {"norm", "qk_norm", "modulation"} & set(record)
    assert DiTConfig(**record) == config
    assert config.options() == {"mlp": "swiglu", "rope": True}


@pytest.mark.parametrize("bad, match", [
    (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm"),
    (dict(mlp="relu"), "mlp must be one of gelu, swiglu"),
    (dict(modulation="shift"), "modulation must be one of shift_scale_gate, scale_gate"),
    (dict(rope="yes"), "rope must be true or false"),
    (dict(qk_norm=1), "qk_norm must be true or false"),
    (dict(rope=True, hidden_size=36, num_heads=6), "divisible by 4"),  # head_dim 6
])
def test_bad_options_are_refused_naming_the_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        DiT(**(TINY_DIT | bad))


# --------------------------------------------------------------------------------------
# Each option against its formula
# --------------------------------------------------------------------------------------


def test_rmsnorm_matches_its_formula_with_eps_1e6_and_no_weight():
    norm = adaln_norm("rmsnorm", 16)
    assert list(norm.parameters()) == []
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(norm(x), ref_rmsnorm(x), rtol=1e-12, atol=1e-12)
    tiny = x * 1e-3  # mean square ~1e-6: eps 1e-6 (not 1e-5 or float eps) is visible
    torch.testing.assert_close(norm(tiny), ref_rmsnorm(tiny, 1e-6), rtol=1e-12, atol=1e-12)
    assert (norm(tiny) - ref_rmsnorm(tiny, 1e-5)).abs().max() > 0.1


def test_swiglu_matches_its_formula_and_keeps_the_gelu_parameter_count():
    d = 24
    mlp = make_mlp("swiglu", d, 4.0).double()
    h = swiglu_hidden(d, 4.0)
    assert h == 64 and mlp.fc1.weight.shape == (2 * h, d) and mlp.fc2.weight.shape == (d, h)
    x = torch.randn(2, 7, d, dtype=torch.float64)
    w1, b1 = mlp.fc1.weight, mlp.fc1.bias
    gate, value = x @ w1[:h].T + b1[:h], x @ w1[h:].T + b1[h:]  # gate rows first
    expected = (gate / (1 + torch.exp(-gate)) * value) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    assert swiglu_hidden(1152, 4.0) == 3072  # LightningDiT-XL's width
    gelu = make_mlp("gelu", 1152, 4.0)
    ratio = sum(p.numel() for p in make_mlp("swiglu", 1152, 4.0).parameters()) / sum(p.numel() for p in gelu.parameters())
    assert abs(ratio - 1) < 1e-3


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_qk_norm_attention_matches_its_formula(norm):
    d, heads, n_tok = 32, 2, 9
    attn = make_attention(d, heads, norm=norm, qk_norm=True, rope=False).double().eval()
    with torch.no_grad():  # non-trivial affine weights, so that they are seen to act
        for p in (*attn.q_norm.parameters(), *attn.k_norm.parameters()):
            p.copy_(1 + 0.5 * torch.randn_like(p))
    x = 3 * torch.randn(2, n_tok, d, dtype=torch.float64)
    q, k, v = (z.reshape(2, n_tok, heads, d // heads).transpose(1, 2) for z in (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, -1))

    def normed(z, layer):
        if norm == "rmsnorm":
            return ref_rmsnorm(z) * layer.weight
        return ref_affine_layernorm(z, layer.weight, layer.bias)

    q, k = normed(q, attn.q_norm), normed(k, attn.k_norm)
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
    expected = o.transpose(1, 2).reshape(2, n_tok, d) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)
    assert len(list(attn.q_norm.parameters())) == (2 if norm == "layernorm" else 1)


def test_rope_table_is_the_axial_pair_rotation():
    head_dim, grid = 16, 5
    table = rope_table(head_dim, grid)
    assert table.shape == (grid * grid, 2 * head_dim) and table.dtype == torch.float32
    x = torch.randn(3, grid * grid, head_dim, dtype=torch.float64)
    expected = ref_rotate(x, ref_rope_angles(head_dim, *grid_positions(grid)))
    torch.testing.assert_close(apply_rope(x, table.double()), expected, rtol=0, atol=1e-6)


def test_rope_scores_depend_only_on_relative_2d_position():
    head_dim, grid = 16, 9
    table = rope_table(head_dim, grid).double()
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(qpos, kpos):
        (qr, qc), (kr, kc) = qpos, kpos
        rq = apply_rope(q.expand(grid * grid, -1), table)[qr * grid + qc]
        rk = apply_rope(k.expand(grid * grid, -1), table)[kr * grid + kc]
        return float(rq @ rk)

    for (qpos, kpos) in [((1, 2), (3, 0)), ((0, 0), (2, 5)), ((4, 4), (4, 1))]:
        base = score(qpos, kpos)
        for shift in [(1, 0), (0, 3), (2, 1), (4, 3)]:
            moved = score((qpos[0] + shift[0], qpos[1] + shift[1]), (kpos[0] + shift[0], kpos[1] + shift[1]))
            assert moved == pytest.approx(base, abs=1e-5)  # the table is float32
    # ... and the relative position itself matters, along each axis.
    assert abs(score((1, 1), (1, 2)) - score((1, 1), (1, 1))) > 1e-3
    assert abs(score((1, 1), (2, 1)) - score((1, 1), (1, 1))) > 1e-3
    assert abs(score((1, 1), (2, 1)) - score((1, 1), (1, 2))) > 1e-3  # rows and columns differ


def test_rope_attention_runs_through_scaled_dot_product_attention(monkeypatch):
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    model = DiT(**(TINY_DIT | ALL_OPTIONS)).eval()
    with torch.no_grad():
        model(torch.randn(1, 4, 8, 8), torch.tensor([3.0]), torch.tensor([1]))
    assert len(calls) == TINY_DIT["depth"]


# --------------------------------------------------------------------------------------
# The whole model with options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_model_with_options_matches_the_float64_formulas(case):
    cfg = tiny_cfg(**OPTION_CASES[case])
    model = DiT(**cfg).eval()
    gen = torch.Generator().manual_seed(11)
    sd = random_weights(model, gen)
    model.load_state_dict(sd, strict=True)
    x, t, y = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0.0, 417.0, 999.0]), torch.tensor([0, 10, 3])
    with torch.no_grad():
        out = model(x, t, y)
    ref = ref_forward_options(sd, cfg, x, t, y)
    assert out.shape == (3, 8, 8, 8) and ref.abs().max() > 0.1
    assert max_rel_err(out, ref) <= 1e-5
    # The option is not a no-op: where the official layout can read the same weights (SwiGLU and
    # shift-free modulation change shapes), its formulas give something else.
    if "mlp" not in OPTION_CASES[case] and "modulation" not in OPTION_CASES[case]:
        official = {k: v for k, v in cfg.items() if k not in ALL_OPTIONS}
        assert max_rel_err(ref_forward_options(sd, official, x, t, y), ref) > 1e-3


def test_shift_free_modulation_has_four_vectors_per_block_and_keeps_the_final_shift():
    model = DiT(**(TINY_DIT | {"modulation": "scale_gate"}))
    d = TINY_DIT["hidden_size"]
    assert model.blocks[0].adaLN_modulation[1].weight.shape == (4 * d, d)
    assert model.final_layer.adaLN_modulation[1].weight.shape == (2 * d, d)


def test_gradient_checkpointing_with_options_gives_same_gradients():
    model = DiT(**(TINY_DIT | ALL_OPTIONS | {"class_dropout_prob": 0.0}))
    model.load_state_dict(random_weights(model, torch.Generator().manual_seed(2)))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.tensor([2, 3])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", [c for c in OPTION_CASES if c != "qk_norm-rmsnorm"])
def test_each_option_trains_the_hybrid_loss_down(case):
    torch.manual_seed(0)
    model = DiT(**(TINY_DIT | OPTION_CASES[case] | {"class_dropout_prob": 0.0})).train()
    diffusion = create_diffusion("")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 5
    x0 = torch.randn(5, 4, 8, 8, generator=gen)[y]  # one fixed image per class
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn(8, 4, 8, 8, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0)
    losses = []
    for _ in range(20):
        loss = diffusion.training_losses(model, x0, t, {"y": y}, noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------------------
# Checkpoints and the parameter count
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_type", ["torch", "safetensors"])
def test_checkpoint_round_trip_rebuilds_the_options(tmp_path, file_type):
    model = DiT(**(TINY_DIT | ALL_OPTIONS)).eval()
    model.load_state_dict(random_weights(model, torch.Generator().manual_seed(4)))
    if file_type == "torch":
        path = tmp_path / "ckpt.pt"
        save_atomic(with_checksum({"model": model.state_dict(), "ema": model.state_dict(), "step": 7,
                                   "model_config": model.config.to_dict()}), path)
    else:
        path = tmp_path / "w.safetensors"
        save_weights_safetensors(model.state_dict(), path, metadata={"model_config": model.config.to_dict()})
    loaded, meta = load_dit_checkpoint(path)
    assert loaded.config == model.config and loaded.config.options() == ALL_OPTIONS
    assert meta["model_config"] == model.config.to_dict()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.tensor([2, 5])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_describe_names_the_model_its_options_and_its_parameter_count():
    with torch.device("meta"):
        official = DiT()
        light = DiT(**ALL_OPTIONS)
    assert describe(official) == "DiT-XL/2: 675,129,632 parameters (674,834,720 trainable)"
    total, trainable = param_counts(light)
    assert total - trainable == 256 * 1152  # only the fixed position table is frozen
    assert describe(light) == (f"DiT-XL/2 + norm=rmsnorm, mlp=swiglu, rope, qk_norm, modulation=scale_gate: "
                               f"{total:,} parameters ({trainable:,} trainable)")
    d, layers = 1152, 28
    # SwiGLU: 3 * 3072 * d weights + 2 * 3072 + d biases vs GELU's 8 d^2 + 4 d + d; shift-free
    # adaLN: 2 d (d + 1) fewer per block; qk-norm: two RMSNorm weights of head_dim 72 per block.
    per_block = (3 * 3072 * d + 2 * 3072 + d) - (8 * d * d + 5 * d) - 2 * d * (d + 1) + 2 * 72
    assert total == 675_129_632 + layers * per_block


@pytest.mark.parametrize("option", [{"rope": True}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}])
def test_diffusers_export_refuses_a_model_with_options(option):
    from dit.io.export import diffusers_config

    assert diffusers_config(DiTConfig(**TINY_DIT))["num_layers"] == 2
    with pytest.raises(ValueError, match="architecture options.*save_pretrained still works"):
        diffusers_config(DiTConfig(**TINY_DIT, **option))


def test_qk_rmsnorm_under_bf16_autocast_normalises_in_float32_without_warning():
    import warnings

    from dit.models.layers import qk_norm_layer

    layer = qk_norm_layer("rmsnorm")(16)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.5 * torch.randn(16))
    q = (5 * torch.randn(2, 3, 16)).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it cannot fuse a bf16 input with a float32 weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(q)
    assert out.dtype == torch.bfloat16
    expected = ref_rmsnorm(q.double()) * layer.weight.detach().double()
    torch.testing.assert_close(out.double(), expected, rtol=8e-3, atol=0)  # one bf16 rounding
