"""The second reliability attack (issue 21), the cases fixed here: each test reproduces the
attack as the issue describes it and shows it refused before anything is run or overwritten.

- item 1: a REPA encoder named by a torch.hub id ran a planted `hubconf.py` from the hub cache;
- item 2: `eval_fid.py ... bulk.out=<the reference>` overwrote the reference with the samples;
- item 4: `python -m dit.export ... --overwrite` into a live run's folder deleted the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_RUN, run_program

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
