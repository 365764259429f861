"""Issue 21, items 17 and 18 (export, REPA folder): the attacks on the export's output folder and
on a REPA encoder folder, each reproduced as the issue describes it.

- item 17: `python -m dit.export ... OUT --overwrite` with OUT a symlink to a folder holding a
  previous export replaced the link itself by a real folder beside it (the export the link points
  to was never updated) and left the link behind, renamed `.OUT.<hex>.old`. A dangling link as OUT
  was replaced by a folder too. Now the export is written into the link's target, the link stays
  a link, and nothing named `.old` (or `.tmp`) is left anywhere.
- item 18, full disk: an export onto a full disk ended in a raw traceback (safetensors' Rust
  writer raises `SafetensorError`, not an OSError). Now it ends in one `error:` line naming the
  file being written and the fix (free space, or another output folder), and a previous export
  being overwritten is left intact.
- item 18, REPA folder holding a pickle: a `save_for_hf` folder whose `pytorch_model.bin` is a
  payload (or a pickle of something other than weights) ended in a raw traceback from timm (whose
  message even advised retrying with `weights_only=False`). Now the run ends in one line naming the
  file and the fix, and the payload never runs.
"""

from __future__ import annotations

import errno
import os
import pathlib
import pickle

import pytest
import torch
from conftest import TINY_RUN, assert_one_line, run_program, tiny_dit

from dit.cli.export import main
from dit.io.checkpoint import save_atomic


@pytest.fixture
def checkpoint(tmp_path):
    """One of our checkpoints of the tiny DiT: what `python -m dit.export` reads."""
    model = tiny_dit()
    path = tmp_path / "run.pt"
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 7,
                 "model_config": model.config.to_dict(), "config": {}}, path)
    return path


def _tree(folder):
    """Every path under `folder` with its bytes (None: a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _leftovers(*folders):
    """Anything named like the export's temporary or replaced folders (`.NAME.<hex>.tmp|.old`)."""
    return [str(p) for folder in folders for p in folder.rglob("*") if p.name.endswith((".old", ".tmp"))]


# ------------------------------------------------------------------------------ item 17


def test_overwrite_through_a_symlinked_folder_replaces_the_export_it_points_to(tmp_path, checkpoint, capsys):
    """Item 17: `OUT` is a link to a folder (on a bigger disk) holding a previous export; `python -m
    dit.export pretrained CKPT OUT --overwrite` replaced the link by a new folder and left the link
    as `.OUT.<hex>.old`. Now the export the link points to is replaced, the link stays as it was."""
    disk = tmp_path / "bigger_disk"
    disk.mkdir()
    target = disk / "dit-export"
    assert main(["diffusers", str(checkpoint), str(target)]) == 0  # the previous export, of the other kind
    link = tmp_path / "export"
    os.symlink(target, link)

    capsys.readouterr()
    assert main(["pretrained", str(checkpoint), str(link), "--overwrite"]) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(target), "the link was replaced"
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger_disk", "export", "run.pt"]
    assert sorted(p.name for p in disk.iterdir()) == ["dit-export"]
    assert _leftovers(tmp_path) == []

    # Back to a diffusers folder through the same link: the same, the other way round.
    assert main(["diffusers", str(checkpoint), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and (target / "model_index.json").is_file() and not (target / "config.json").exists()
    assert _leftovers(tmp_path) == []

    # A link to a folder that is not an export is still refused, naming the link and its target.
    notes = disk / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("months of work")
    os.symlink(notes, tmp_path / "notes")
    capsys.readouterr()
    assert main(["pretrained", str(checkpoint), str(tmp_path / "notes"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a previous export" in err, err
    assert str(tmp_path / "notes") in err and str(notes) in err, err
    assert (tmp_path / "notes").is_symlink() and _tree(notes) == {"thesis.tex": b"months of work"}


def test_an_export_through_a_dangling_link_creates_the_folder_it_points_to(tmp_path, checkpoint):
    """A link made before its target (`ln -s /bigger/disk/export OUT`): the export was written as a
    real folder in place of the link. Now it is written where the link points; the link stays."""
    disk = tmp_path / "bigger_disk"
    disk.mkdir()
    link = tmp_path / "export"
    os.symlink(disk / "dit-export", link)
    assert main(["pretrained", str(checkpoint), str(link)]) == 0
    assert link.is_symlink() and (disk / "dit-export" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger_disk", "export", "run.pt"]
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ item 18: a full disk

# What safetensors' Rust writer raises when the disk fills up (measured on a full 64 KiB tmpfs):
# an exception of its own, not an OSError, with the OS error in its text.
SAFETENSORS_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


def _safetensors_on_a_full_disk(monkeypatch, room: int = 100):
    """Every safetensors file written from now on (ours and diffusers') gets `room` bytes, then fails
    as the Rust writer does on a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def serialize_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * room)
        raise SafetensorError(SAFETENSORS_FULL_DISK)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)


def _text_files_on_a_full_disk(monkeypatch, name: str):
    """Writing a text file called `name` fails as a full disk does: the write, not the open."""
    write_text = pathlib.Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name == name:
            self.write_bytes(b"")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)


@pytest.mark.parametrize("command,fault,written", [
    ("pretrained", "safetensors", "model.safetensors"),
    ("diffusers", "safetensors", os.path.join("transformer", "diffusion_pytorch_model.safetensors")),
    ("diffusers", "card", "README.md"),
])
def test_an_export_onto_a_full_disk_ends_in_one_line_and_keeps_the_previous_export(
        tmp_path, checkpoint, capsys, monkeypatch, command, fault, written):
    """Item 18: `python -m dit.export pretrained|diffusers CKPT OUT --overwrite` onto a full disk
    ended in a raw traceback (safetensors' SafetensorError). Now: one `error:` line naming the file
    being written and the fix, the previous export under OUT unchanged, no temporary folder left."""
    out = tmp_path / "export"
    assert main(["pretrained" if command == "diffusers" else "diffusers", str(checkpoint), str(out)]) == 0
    before = _tree(out)
    if fault == "safetensors":
        _safetensors_on_a_full_disk(monkeypatch)
    else:
        _text_files_on_a_full_disk(monkeypatch, "README.md")

    capsys.readouterr()
    assert main([command, str(checkpoint), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"could not write {out / written}" in err and "No space left on device" in err, err
    assert "free space" in err and "another output folder" in err and "unchanged" in err, err
    assert _tree(out) == before, "the previous export changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run.pt"]  # no temporary folder


def test_a_first_export_onto_a_full_disk_leaves_nothing(tmp_path, checkpoint, capsys, monkeypatch):
    """The same without a previous export: one line, and no OUT nor temporary folder afterwards."""
    _safetensors_on_a_full_disk(monkeypatch)
    out = tmp_path / "export"
    assert main(["pretrained", str(checkpoint), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"could not write {out / 'model.safetensors'}" in err
    assert "was not created" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


# ------------------------------------------------------------------------------ item 18: a REPA folder

# A tiny timm ViT as the tiny DiT's REPA encoder: 4 x 4 tokens of a 16 px image, as the DiT's.
ENCODER_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


class _WritesMarker:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _encoder_folder_holding(path, marker, kind: str):
    """A REPA encoder folder as `timm.models.save_for_hf(..., safe_serialization=False)` writes it
    (config.json + pytorch_model.bin), its pytorch_model.bin replaced by a pickle of `kind`."""
    import timm
    from timm.models import save_for_hf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **ENCODER_ARGS)
    save_for_hf(net, path, model_args=ENCODER_ARGS, safe_serialization=False)
    weights = path / "pytorch_model.bin"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "pytorch_model.bin"]
    if kind == "torch.save payload":  # torch's zip format, a payload among the tensors
        torch.save({**net.state_dict(), "pos_embed": _WritesMarker(marker)}, weights)
    elif kind == "plain pickle payload":  # a bare pickle, torch's legacy format
        weights.write_bytes(pickle.dumps({"pos_embed": _WritesMarker(marker)}, protocol=2))
    else:  # a pickle that runs nothing but holds no weights (a list of strings)
        torch.save(["not", "weights"], weights)
    return weights


@pytest.mark.parametrize("kind", ["torch.save payload", "plain pickle payload", "not weights"])
def test_a_repa_folder_holding_a_pickle_ends_in_one_line_and_runs_nothing(tmp_path, capsys, monkeypatch, kind):
    """Item 18: `train.py ... repa.encoder=DIR` with DIR a save_for_hf folder whose weights are a
    pickle (a payload, or not weights) ended in timm's raw traceback. Now: one `error:` line naming
    the file and the fix (safetensors), exit 1, and the payload never runs."""
    from dit.models.repa import EncoderUnavailable, load_encoder

    marker = tmp_path / "payload-ran"
    weights = _encoder_folder_holding(tmp_path / "encoder", marker, kind)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_program("train.py", [*TINY_RUN, "max_steps=1", "repa.depth=1", "repa.resolution=16",
                                            f"repa.encoder={weights.parent}", f"hydra.run.dir={tmp_path / 'run'}"],
                               capsys, monkeypatch)
    assert_one_line(code, err, str(weights), "safe_serialization=True")
    assert "weights_only=False" not in err, err  # never the advice to load it unsafely
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "run" / "checkpoints").exists()

    with pytest.raises(EncoderUnavailable, match="pytorch_model.bin"):
        load_encoder(str(weights.parent), resolution=16)
    assert not marker.exists(), "the pickle's payload ran"
    with pytest.raises(EncoderUnavailable, match="pytorch_model.bin"):  # a timm id with weights=FILE: the same
        load_encoder("vit_tiny_patch16_224", resolution=16, weights=str(weights))
    assert not marker.exists(), "the pickle's payload ran"


def test_a_repa_folder_of_plain_pickled_weights_still_loads(tmp_path):
    """A save_for_hf folder with plain (weights-only) pytorch_model.bin, timm's default format, loads
    as before: the checks refuse pickled objects, not pickled tensors."""
    import timm
    from timm.models import save_for_hf

    from dit.models.repa import load_encoder

    torch.manual_seed(1)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **ENCODER_ARGS).eval()
    save_for_hf(net, tmp_path / "encoder", model_args=ENCODER_ARGS, safe_serialization=False)
    encoder = load_encoder(str(tmp_path / "encoder"), resolution=16)
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(encoder.net.state_dict()[name], tensor)
