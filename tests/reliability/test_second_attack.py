"""The second reliability attack (issue 21), the cases fixed here: each test reproduces the
attack as the issue describes it and shows it refused before anything is run or overwritten.

- item 1: a REPA encoder named by a torch.hub id ran a planted `hubconf.py` from the hub cache;
- item 2: `eval_fid.py ... bulk.out=<the reference>` overwrote the reference with the samples;
- item 4: `python -m dit.export ... --overwrite` into a live run's folder deleted the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_RUN, bulk_sample_with, run_program, tiny_dit

# ------------------------------------------------------------------------------ item 1

# A hubconf.py as an attacker plants it: importing it runs code (here: it writes a marker file);
# its entry returns something that passes for an encoder, so a run that imports it goes on.
PLANTED_HUBCONF = '''
from pathlib import Path
Path({marker!r}).write_text("hubconf.py ran")

import torch


class _Net(torch.nn.Module):
    patch_size, embed_dim = 14, 8

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 8, 14, 14)

    def forward_features(self, x):
        return {{"x_norm_patchtokens": self.proj(x).flatten(2).transpose(1, 2)}}


def {entry}(*args, **kwargs):
    return _Net()
'''


def _plant_hubconf(hub_dir: Path, repo: str, entry: str, marker: Path) -> None:
    """`hub_dir/<owner>_<repo>_main/hubconf.py`: where torch.hub finds a cached `owner/repo`
    offline (the default branch is taken from the cache when GitHub cannot be reached)."""
    folder = hub_dir / f"{repo.replace('/', '_')}_main"
    folder.mkdir(parents=True)
    (folder / "hubconf.py").write_text(PLANTED_HUBCONF.format(marker=str(marker), entry=entry))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A temporary torch.hub cache (TORCH_HOME/hub), offline: no download can replace what is planted."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() follows TORCH_HOME
    monkeypatch.setattr(torch.hub, "urlopen", _offline)
    hub = Path(torch.hub.get_dir())
    assert hub == tmp_path / "torch" / "hub"
    return hub


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("offline (test)")


@pytest.mark.parametrize("repo,entry", [("attacker/encoders", "vit_b"),  # any repository
                                        ("facebookresearch/dinov2", "dinov2_vitb14")])  # REPA's own, planted over
def test_a_torch_hub_encoder_never_runs_its_hubconf_without_the_opt_in(repo, entry, hub_cache, tmp_path, capsys,
                                                                       monkeypatch):
    """Item 1: a hubconf.py planted in the hub cache under the id's folder; train.py with
    repa.encoder=<owner>/<repo>:<entry> used to import it (trust_repo=True, no prompt) and exit 0.
    Now the run is refused in one line naming repa.trust_hub_repo, before any code of the cache
    runs; so is the library call and cache_latents. With the opt-in, the known repository loads
    (the planted code then runs: that is what trusting a repository means); an unknown one never."""
    from dit.models.repa import EncoderUnavailable, load_encoder

    marker = tmp_path / "hubconf-ran"
    _plant_hubconf(hub_cache, repo, entry, marker)
    monkeypatch.chdir(tmp_path)
    source = f"{repo}:{entry}"

    code, _, err = run_program("train.py", [*TINY_RUN, "max_steps=1", "repa.depth=1", f"repa.encoder={source}",
                                            f"hydra.run.dir={tmp_path / 'run'}"], capsys, monkeypatch)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert source in err and ("repa.trust_hub_repo=true" in err if repo.startswith("facebookresearch")
                              else "not one of the known" in err), err
    assert not marker.exists(), "the planted hubconf.py ran"
    assert not (tmp_path / "run" / "checkpoints").exists()

    with pytest.raises(EncoderUnavailable, match="trust_hub_repo|known"):
        load_encoder(source)
    images = tmp_path / "images" / "class0"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    code, _, err = run_program("cache_latents", [f"data_root={images.parent}", f"out_dir={tmp_path / 'cache'}",
                                                 "vae=pixel", "image_size=8", f"repa_encoder={source}"],
                               capsys, monkeypatch)
    assert code == 1 and err.startswith("error: ") and source in err, err
    assert ("repa_trust_hub_repo=true" in err if repo.startswith("facebookresearch")
            else "not one of the known" in err), err
    assert not marker.exists(), "the planted hubconf.py ran"

    if repo.startswith("facebookresearch"):
        encoder = load_encoder(source, resolution=28, trust_hub_repo=True)  # the opt-in: the cache's code runs
        assert marker.exists() and encoder(torch.zeros(1, 3, 28, 28)).shape == (1, 4, 8)
    else:
        with pytest.raises(EncoderUnavailable, match="not one of the known"):
            load_encoder(source, trust_hub_repo=True)
        assert not marker.exists()


# ------------------------------------------------------------------------------ item 2


def _pixel_checkpoint(path: Path) -> Path:
    """A tiny pixel-space DiT in our checkpoint format: what eval_fid.py samples from."""
    from dit.io.checkpoint import save_atomic

    model = tiny_dit(in_channels=3, num_classes=5, input_size=8)
    return save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 11, "model_name": None,
                        "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                        "format_version": 1}, path)


def test_eval_fid_never_writes_its_samples_over_the_reference_the_samples_or_the_checkpoint(tmp_path, capsys,
                                                                                            monkeypatch):
    """Item 2: `eval_fid.py checkpoint=C reference=R.npz bulk.out=R.npz` sampled into R.npz,
    scored the samples against themselves (FID 0.0), exited 0 and wrote a results row. Now
    bulk.out is refused in one line before any sampling when it is the reference, the samples or
    the checkpoint, also through a symlink, a hard link or another spelling of the path, and
    when it is an existing .npz without our settings file beside it; every file stays as it was."""
    from dit.io.npz import write_samples_npz

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    reference = write_samples_npz(tmp_path / "ref.npz", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    checkpoint = _pixel_checkpoint(tmp_path / "pix.pt")
    samples = write_samples_npz(tmp_path / "theirs.npz", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "ref-link.npz").symlink_to(reference)
    os.link(reference, tmp_path / "ref-hard.npz")
    os.link(checkpoint, tmp_path / "ckpt-hard.npz")
    (tmp_path / "sub").mkdir()
    before = {p: p.read_bytes() for p in (reference, checkpoint, samples)}

    common = [f"checkpoint={checkpoint}", f"reference={reference}", "bulk.num_samples=4", "bulk.batch_size=4",
              "sampler=ddim", "sampler.num_steps=2", "device=cpu", "feature_extractor=toy_judge",
              f"cache_dir={tmp_path / 'cache'}", f"results_table={tmp_path / 'results.md'}"]
    cases = {  # bulk.out=..., extra arguments, what the line names
        "the reference": (str(reference), [], "reference="),
        "the reference, another spelling": ("sub/../ref.npz", [], "reference="),
        "a symlink to the reference": ("ref-link.npz", [], "reference="),
        "a hard link to the reference": ("ref-hard.npz", [], "reference="),
        "a hard link to the checkpoint": ("ckpt-hard.npz", [], "checkpoint="),
        "the samples": (str(samples), [f"samples={samples}"], "samples="),
        "a foreign .npz (no settings of ours beside it)": (str(samples), [], "not a bulk file of ours"),
    }
    for case, (out, extra, names) in cases.items():
        code, _, err = run_program("eval_fid.py", [*common, *extra, f"bulk.out={out}"], capsys, monkeypatch)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (case, err)
        assert "bulk.out=" in err and names in err, (case, err)
        assert {p: p.read_bytes() for p in before} == before, f"{case}: a file was overwritten"
        assert not list(tmp_path.glob("*.parts")) and not (tmp_path / "results.md").exists(), case
        assert not list(tmp_path.glob("*.metrics.json")), case

    # sample.py: bulk.out a hard link to the checkpoint, or an existing file not of ours
    for out in ("ckpt-hard.npz", "ref.npz"):
        with torch.enable_grad():  # sample.py turns gradients off for its process: not for the tests after this one
            code, _, err = run_program("sample.py", [f"checkpoint={checkpoint}", "mode=bulk", "bulk.num_samples=4",
                                                     "sampler=ddim", "sampler.num_steps=2", "device=cpu",
                                                     f"bulk.out={out}"], capsys, monkeypatch)
        assert code == 1 and err.startswith("error: ") and out in err, err
        assert {p: p.read_bytes() for p in before} == before


def test_bulk_sample_replaces_no_foreign_npz_and_still_resumes_its_own(tmp_path):
    """Item 2, the library: `bulk_sample` refuses to replace an existing .npz without our settings
    file beside it; its own outputs behave as before: a finished file (settings beside it) is
    returned as it is, and an interrupted run resumes from `<out>.parts/`, also one killed after
    the assembly and before the settings file was written."""
    from dit.autoencoder import build_autoencoder
    from dit.sampling.settings import SamplerSettings

    model, pixels = tiny_dit(in_channels=3), build_autoencoder("pixel")

    def bulk(out, **kw):
        return bulk_sample_with(model, None, pixels, out, SamplerSettings(sampler="ddim", num_steps=2),
                                num_samples=4, seed=0, batch_size=2, progress=False, **kw)

    foreign = tmp_path / "foreign.npz"
    foreign.write_bytes(b"someone's reference batch")
    with pytest.raises(ValueError, match="not a bulk file of ours"):
        bulk(foreign)
    assert foreign.read_bytes() == b"someone's reference batch" and not (tmp_path / "foreign.npz.parts").exists()

    out = bulk(tmp_path / "ours.npz", keep_shards=True)  # finished, shards kept
    first = out.read_bytes()
    assert bulk(out) == out and out.read_bytes() == first  # complete: returned as it is
    settings = out.with_suffix(".json")
    settings.unlink()  # killed after the assembly, before the settings file: the shards' settings say it is ours
    out.write_bytes(b"half")
    assert bulk(out) == out and out.read_bytes() == first and settings.is_file()


# ------------------------------------------------------------------------------ item 4


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones included) with its bytes (None: a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_export_overwrite_never_replaces_a_run_folder_or_anything_but_a_previous_export(tmp_path, capsys,
                                                                                        monkeypatch):
    """Item 4: `python -m dit.export pretrained|diffusers CKPT <a live run's folder> --overwrite`
    replaced the folder: its checkpoints, .hydra/, train.log and lock were gone, and both
    processes exited 0. Now a folder holding a run (its lock, checkpoints/, .hydra/) or anything
    that is not a previous export is refused in one line before anything is written; a previous
    export (of either kind) is still replaced."""
    import fcntl

    from dit.cli.export import main

    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_program("train.py", [*TINY_RUN, "max_steps=1", f"hydra.run.dir={run}"], capsys, monkeypatch)
    assert code == 0, err
    checkpoint = sorted((run / "checkpoints").glob("*.pt"))[-1]
    assert (run / ".hydra").is_dir() and (run / "train.log").is_file()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)  # the run is live: its lock is held
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        before = _tree(run)
        for command in ("pretrained", "diffusers"):
            capsys.readouterr()
            assert main([command, str(checkpoint), str(run), "--overwrite"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and str(run) in err, err
            assert "training run" in err and ".lock" in err and "checkpoints" in err, err
            assert _tree(run) == before, f"{command} --overwrite changed the run's folder"
            assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")) == []  # no temp folder
    finally:
        os.close(fd)

    # Without the lock (a finished or killed run) the folder still holds a run: refused the same way.
    (run / ".lock").unlink()
    assert main(["pretrained", str(checkpoint), str(run), "--overwrite"]) == 2
    assert "training run" in capsys.readouterr().err and (run / "checkpoints").is_dir()

    # A folder that is neither a run nor an export: refused, naming what it holds.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("months of work")
    assert main(["pretrained", str(checkpoint), str(other), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not a previous export" in err and "thesis.tex" in err, err
    assert (other / "thesis.tex").read_text() == "months of work"

    # A previous export is replaced, by either kind; one with a file added to it is not. (The run is
    # pixel-space, which the diffusers export refuses (issue 23, item 5): a latent model's checkpoint.)
    from dit.io.checkpoint import save_atomic

    out = tmp_path / "export"
    latent = tmp_path / "latent.pt"
    model = tiny_dit()
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 1,
                 "model_config": model.config.to_dict()}, latent)
    assert main(["pretrained", str(checkpoint), str(out)]) == 0
    assert main(["diffusers", str(latent), str(out), "--overwrite"]) == 0
    assert (out / "model_index.json").is_file() and not (out / "model.safetensors").exists()
    assert main(["pretrained", str(checkpoint), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "model_index.json").exists()
    (out / "eval-notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["pretrained", str(checkpoint), str(out), "--overwrite"]) == 2
    assert "eval-notes.txt" in capsys.readouterr().err and (out / "eval-notes.txt").is_file()
