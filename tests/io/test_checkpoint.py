"""Checkpoint files: atomic writes, refusing unsafe pickles, loading ours and the release format."""

from __future__ import annotations

import os

import pytest
import torch

from dit.io.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_dit_checkpoint,
    load_state,
    read_safetensors_metadata,
    save_atomic,
    save_weights_safetensors,
)
from dit.models import DiT
from dit.io.release import infer_dit_config, strip_wrapper_prefixes

from conftest import tiny_dit

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
            mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)


def tiny_model(**kw) -> DiT:
    """A tiny DiT with every weight random (adaLN and output layers too), so loads are visible."""
    return tiny_dit(seed=None, noise=0.1, **(TINY | kw))


def inputs(model: DiT, n: int = 2):
    c = model.config
    return (torch.randn(n, c.in_channels, c.input_size, c.input_size),
            torch.tensor([1.0, 800.0])[:n], torch.tensor([3, c.num_classes - 1])[:n])


def assert_same_weights(a: DiT, b: DiT):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def ours_checkpoint(model: DiT, ema: DiT, step: int = 123, model_name=None) -> dict:
    """A file in contract 2's layout, as the training loop writes it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "model_name": model_name,
        "model_config": model.config.to_dict(),
        "autoencoder": {"name": "pixel", "scale_factor": 1.0},
        "config": {"train": {"lr": 1e-4, "steps": [1, 2]}, "seed": 0},
        "rng": {"torch": torch.get_rng_state()},
        "data_state": {"epoch": 0, "position": 17},
        "wandb_run_id": None,
        "format_version": 1,
    }


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


def test_ours_round_trip_ema_and_model(tmp_path):
    raw, ema = tiny_model(), tiny_model()
    path = tmp_path / "ckpt.pt"
    save_atomic(ours_checkpoint(raw, ema), path)

    loaded, meta = load_dit_checkpoint(path)
    assert_same_weights(loaded, ema)
    assert meta["format"] == "ours" and meta["file_type"] == "torch"
    assert meta["step"] == 123
    assert meta["model_config"] == ema.config.to_dict()
    assert meta["model_name"] is None  # custom size, not one of the twelve
    assert meta["autoencoder"] == {"name": "pixel", "scale_factor": 1.0}
    assert meta["config"]["train"]["steps"] == [1, 2]
    assert not loaded.training
    assert not loaded.pos_embed.requires_grad
    assert all(p.device.type == "cpu" for p in loaded.state_dict().values())  # nothing left on meta
    x, t, y = inputs(ema)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), ema(x, t, y), rtol=0, atol=0)

    loaded_raw, _ = load_dit_checkpoint(path, which="model")
    assert_same_weights(loaded_raw, raw)


def test_our_stored_config_is_trusted_over_shape_inference(tmp_path):
    """No null row and 11 classes would be inferred as 10 classes + null; the stored config says otherwise."""
    model = tiny_model(num_classes=11, class_dropout_prob=0.0)
    path = tmp_path / "ckpt.pt"
    save_atomic(ours_checkpoint(model, model), path)
    loaded, meta = load_dit_checkpoint(path)
    assert meta["model_config"]["num_classes"] == 11
    assert meta["model_config"]["class_dropout_prob"] == 0.0
    assert_same_weights(loaded, model)
    assert infer_dit_config(model.state_dict(), num_heads=2)["num_classes"] == 10  # the ambiguity the rule resolves


def test_official_format_round_trip_and_inferred_config(tmp_path):
    model = tiny_model(num_heads=4)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)  # the release format: a plain state dict
    loaded, meta = load_dit_checkpoint(path, num_heads=4)
    assert meta["format"] == "official"
    assert meta["step"] is None and meta["config"] is None and meta["autoencoder"] is None
    assert meta["model_config"] == model.config.to_dict()
    x, t, y = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


@pytest.mark.slow  # writes and reads a DiT-S-sized (33M parameter) file three times
def test_official_size_is_named_and_heads_come_from_the_table(tmp_path):
    with torch.device("meta"):
        big = DiT(input_size=16, patch_size=4, hidden_size=384, depth=12, num_heads=6, num_classes=1000)
    sd = {k: torch.zeros(v.shape) for k, v in big.state_dict().items()}  # DiT-S/4 shapes, 128x128 image
    path = tmp_path / "s4.pt"
    torch.save(sd, path)
    model, meta = load_dit_checkpoint(path)
    assert meta["model_name"] == "DiT-S/4"
    assert meta["model_config"] == {
        "input_size": 16, "patch_size": 4, "in_channels": 4, "hidden_size": 384, "depth": 12, "num_heads": 6,
        "mlp_ratio": 4.0, "class_dropout_prob": 0.1, "num_classes": 1000, "learn_sigma": True}
    same, _ = load_dit_checkpoint(path, model_name="DiT-S-4")
    assert same.config == model.config
    with pytest.raises(CheckpointMismatchError, match=r"(?s)does not fit DiT-S/2.*file looks like DiT-S/4"):
        load_dit_checkpoint(path, model_name="DiT-S/2")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_removed(tmp_path, prefix):
    model = tiny_model()
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    save_atomic(ours_checkpoint(model, model) | {"ema": sd}, path)
    loaded, _ = load_dit_checkpoint(path, num_heads=2)
    assert_same_weights(loaded, model)


def test_compiled_submodule_prefix_is_removed():
    sd = {"blocks.0._orig_mod.attn.qkv.weight": torch.zeros(1), "module.pos_embed": torch.zeros(1)}
    assert set(strip_wrapper_prefixes(sd)) == {"blocks.0.attn.qkv.weight", "pos_embed"}


def test_safetensors_round_trip(tmp_path):
    model = tiny_model(learn_sigma=False, class_dropout_prob=0.0, num_classes=7)
    path = tmp_path / "w.safetensors"
    metadata = {"model_name": None, "model_config": model.config.to_dict(), "step": 5}
    save_weights_safetensors(model.state_dict(), path, metadata=metadata)
    assert read_safetensors_metadata(path)["model_config"]["num_classes"] == 7
    state = load_state(path)
    assert state.keys() == model.state_dict().keys()
    loaded, meta = load_dit_checkpoint(path)
    assert (meta["format"], meta["file_type"]) == ("ours", "safetensors")
    assert meta["model_config"] == model.config.to_dict()
    assert_same_weights(loaded, model)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left

    plain = tmp_path / "plain.safetensors"  # no metadata: shapes are inferred like a release file
    save_weights_safetensors(tiny_model().state_dict(), plain)
    _, meta = load_dit_checkpoint(plain, num_heads=2)
    assert (meta["format"], meta["model_config"]["num_classes"]) == ("official", 10)


# --------------------------------------------------------------------------------------
# Inference rules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {},
    dict(patch_size=4, input_size=16, in_channels=3, learn_sigma=False),
    dict(depth=3, mlp_ratio=2.5, class_dropout_prob=0.0, num_classes=9),
])
def test_infer_config_recovers_constructor_arguments(kw):
    with torch.device("meta"):
        model = DiT(**(TINY | kw))
    cfg = model.config.to_dict()
    hints = {} if cfg["class_dropout_prob"] > 0 else {"class_dropout_prob": 0.0}
    assert infer_dit_config(model.state_dict(), num_heads=2, **hints) == cfg
    # Knowing the class count resolves the null-row ambiguity as well.
    assert infer_dit_config(model.state_dict(), num_heads=2, num_classes=cfg["num_classes"]) == cfg


def test_infer_needs_num_heads_for_custom_sizes():
    with torch.device("meta"):
        sd = DiT(**TINY).state_dict()
    with pytest.raises(CheckpointError, match=r"num_heads.*depth=2, hidden_size=32"):
        infer_dit_config(sd)
    with pytest.raises(CheckpointError, match="does not divide"):
        infer_dit_config(sd, num_heads=3)


def test_infer_rejects_non_dit_state_dicts():
    with pytest.raises(CheckpointError, match="x_embedder.proj.weight"):
        infer_dit_config({"encoder.weight": torch.zeros(2, 2)})
    with torch.device("meta"):
        sd = DiT(**TINY).state_dict()
    with pytest.raises(CheckpointError, match="12 rows"):
        bad = dict(sd) | {"y_embedder.embedding_table.weight": torch.zeros(12, 32)}
        infer_dit_config(bad, num_heads=2, num_classes=10)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_model_name_mismatch_names_model_keys_and_shapes(tmp_path):
    model = tiny_model(depth=2)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_dit_checkpoint(path, model_name="DiT-S/4")
    msg = str(e.value)
    assert "DiT-S/4" in msg
    assert "missing keys (100)" in msg and "blocks.2.attn.qkv.weight (1152, 384)" in msg  # S has 12 blocks
    assert "x_embedder.proj.weight: file (32, 4, 2, 2) vs model (384, 4, 4, 4)" in msg
    assert "the file looks like a custom DiT" in msg and "'depth': 2" in msg
    assert "Fix:" in msg


def test_override_that_contradicts_stored_weights_is_reported(tmp_path):
    model = tiny_model()
    path = tmp_path / "ckpt.pt"
    save_atomic(ours_checkpoint(model, model), path)
    depth_error = r"unexpected keys \(10\).*blocks\.1\.attn\.qkv\.weight \(96, 32\)"  # block 1's ten tensors
    with pytest.raises(CheckpointMismatchError, match=depth_error):
        load_dit_checkpoint(path, depth=1)
    with pytest.raises(TypeError, match="unknown DiT config override.*depht"):
        load_dit_checkpoint(path, depht=1)
    with pytest.raises(ValueError, match="which must be"):
        load_dit_checkpoint(path, which="best")


def test_missing_ema_suggests_which_model(tmp_path):
    model = tiny_model()
    path = tmp_path / "ckpt.pt"
    save_atomic(ours_checkpoint(model, model) | {"ema": None}, path)
    with pytest.raises(CheckpointError, match="no 'ema' weights.*which='model'"):
        load_dit_checkpoint(path)
    load_dit_checkpoint(path, which="model")


def test_missing_and_garbage_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(10)}, good)
    for content in (b"definitely not a checkpoint", b"hello", good.read_bytes()[:200]):  # last: truncated
        junk.write_bytes(content)
        with pytest.raises(CheckpointError, match="not a (readable )?PyTorch checkpoint") as e:
            load_state(junk)
        assert not isinstance(e.value, UnsafeCheckpointError)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state(bad_st)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, other)
    with pytest.raises(CheckpointError, match="not a DiT checkpoint.*state_dict"):
        load_dit_checkpoint(other)


class _RunsCodeOnLoad:
    """Unpickling this creates the marker file: a stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    model = tiny_model()
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "payload": _RunsCodeOnLoad(marker)}, path)

    with pytest.raises(UnsafeCheckpointError, match="arbitrary Python objects and is refused") as e:
        load_dit_checkpoint(path)
    assert "open" in str(e.value)  # names the offending global
    with pytest.raises(UnsafeCheckpointError):
        load_state(path)
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def test_save_atomic_writes_only_the_final_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    save_atomic({"step": 1, "w": torch.arange(3)}, path)
    save_atomic({"step": 2, "w": torch.arange(4)}, path)  # overwrite
    assert os.listdir(path.parent) == ["ckpt.pt"]
    state = load_state(path)
    assert state["step"] == 2 and torch.equal(state["w"], torch.arange(4))


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(len(before) // 2)
        f.truncate()  # half a file on disk, then the "crash"
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temp file is gone
    assert path.read_bytes() == before
    assert load_state(path)["step"] == 1
