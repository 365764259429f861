"""Issue 22, item 2: a flow-matching model (a run trained with objective=flow, SiT's release file)
given to the exporter. diffusers' `DiTPipeline` feeds its scheduler's integer timesteps 0..999
to the transformer and steps a DDPM noise-prediction chain, so the diffusers export refuses such
a model in one line before anything is written; `pretrained` exports it with its objective
recorded, and `sample.py` samples the exported weights file as it samples the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, tiny_dit

from dit.cli.export import main
from dit.io.checkpoint import save_atomic
from dit.io.export import FlowExportError, export_diffusers, load_pretrained, save_pretrained
from dit.models import DiT_models
from dit.sampling.images import sample_latents
from dit.sampling.loading import load_for_sampling, settings_path_for
from dit.sampling.settings import SamplerSettings
from dit.sampling.trained import RELEASE_OBJECTIVES, trained_objective

FLOW = {"kind": "flow", "path": "linear", "prediction": "velocity", "time_sampling": "uniform",
        "network_time_scale": 1.0}
REASON = "flow-matching model.*DiTPipeline's DDPM noise-prediction chain and integer timesteps.*cannot sample it"


def flow_checkpoint(path: Path) -> Path:
    """A tiny pixel-space DiT in our checkpoint format whose training config records a flow objective."""
    model = tiny_dit(in_channels=3, num_classes=5, input_size=8)
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 11, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "config": {"objective": dict(FLOW), "diffusion": {"noise_schedule": "linear",
                                                                   "diffusion_steps": 1000}},
                 "format_version": 1}, path)
    return path


def release_state_dict(path: Path) -> Path:
    """A bare state dict as the releases ship (DiT-S/8 on 8x8 latents, 10 classes: an official
    size, so the shapes give the heads), saved under `path`'s name."""
    torch.manual_seed(3)
    torch.save(DiT_models["DiT-S/8"](input_size=8, num_classes=10).eval().state_dict(), path)
    return path


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_refused_in_one_line(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in ("flow-matching model", "DiTPipeline", "integer timesteps", "sample.py", "pretrained", *names):
        assert name in lines[0], (name, lines[0])


def test_our_flow_checkpoint_is_refused_by_the_diffusers_export_before_anything_is_written(tmp_path, capsys):
    ckpt = flow_checkpoint(tmp_path / "flow.pt")
    with pytest.raises(FlowExportError, match=REASON):
        export_diffusers(ckpt, tmp_path / "out")
    assert isinstance(FlowExportError("x"), ValueError)
    code = main(["diffusers", str(ckpt), str(tmp_path / "out"), "--scheduler", "dpm"])
    assert_refused_in_one_line(code, capsys.readouterr().err, "flow.pt")
    assert entries(tmp_path) == ["flow.pt"]  # no output folder, no staging folder

    # onto a previous export with --overwrite: refused before it is touched
    diffusion = tmp_path / "run.pt"
    model = tiny_dit()
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 1,
                 "model_config": model.config.to_dict()}, diffusion)
    assert main(["diffusers", str(diffusion), str(tmp_path / "out")]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    code = main(["diffusers", str(ckpt), str(tmp_path / "out"), "--overwrite"])
    assert_refused_in_one_line(code, capsys.readouterr().err)
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert entries(tmp_path) == ["flow.pt", "out", "run.pt"]


def test_a_sit_release_file_is_refused_by_its_name_or_by_release_format(tmp_path, capsys):
    sit = release_state_dict(tmp_path / "SiT-S-8-64.pt")
    code = main(["diffusers", str(sit), str(tmp_path / "out")])
    assert_refused_in_one_line(code, capsys.readouterr().err, "SiT-S-8-64.pt", "SiT-*", "--release-format dit")
    assert not (tmp_path / "out").exists()

    # the same weights under a name that says nothing are DiT's unless said otherwise
    renamed = release_state_dict(tmp_path / "weights.pt")
    code = main(["diffusers", str(renamed), str(tmp_path / "out"), "--release-format", "sit"])
    assert_refused_in_one_line(code, capsys.readouterr().err, "weights.pt")
    assert not (tmp_path / "out").exists()
    assert main(["diffusers", str(renamed), str(tmp_path / "out")]) == 0
    # and a SiT-* name read as DiT's on request (the user says so)
    assert main(["diffusers", str(sit), str(tmp_path / "out2"), "--release-format", "dit"]) == 0


def test_pretrained_export_of_a_flow_checkpoint_samples_what_the_checkpoint_samples(tmp_path, capsys):
    from dit.sampling.generate import generate_grid

    ckpt = flow_checkpoint(tmp_path / "flow.pt")
    assert main(["pretrained", str(ckpt), str(tmp_path / "pre")]) == 0
    record = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert record["objective"] == FLOW and record["diffusion"] is None
    assert "flow-matching" in (tmp_path / "pre" / "README.md").read_text()
    _, meta = load_pretrained(tmp_path / "pre")
    assert meta["objective"] == FLOW

    # sample.py on the weights file alone: the same objective, autoencoder, step, and images
    weights = tmp_path / "pre" / "model.safetensors"
    _, _, exported = load_for_sampling(weights)
    _, _, source = load_for_sampling(ckpt)
    assert exported["objective"] == source["objective"] == FLOW and "diffusion" not in exported
    assert (exported["vae"], exported["step"]) == ("pixel", 11)
    grids = []
    for name, path in (("source", ckpt), ("exported", weights)):
        grids.append(generate_grid(compose_config("sample", [
            f"checkpoint={path}", "device=cpu", "sampler.num_steps=3", "grid.labels=[0,1,4]",
            f"grid.out={tmp_path / name}.png"])))
    settings = [json.loads(settings_path_for(g).read_text()) for g in grids]
    assert settings[0]["objective"] == settings[1]["objective"] == FLOW and settings[1]["sampler"] == "sde"
    assert grids[0].read_bytes() == grids[1].read_bytes()

    # the exported folder (or its weights file) is refused by the diffusers export too
    capsys.readouterr()  # the grids' progress bars
    for source_path in (tmp_path / "pre", weights):
        code = main(["diffusers", str(source_path), str(tmp_path / "d")])
        assert_refused_in_one_line(code, capsys.readouterr().err)
    assert not (tmp_path / "d").exists()


def test_pretrained_export_of_a_sit_release_file_keeps_sits_objective(tmp_path, tiny_vae_dir):
    sit = release_state_dict(tmp_path / "SiT-S-8-64.pt")
    save_pretrained(sit, tmp_path / "pre")
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["objective"] == RELEASE_OBJECTIVES["sit"]
    weights = tmp_path / "pre" / "model.safetensors"  # a name that no longer says SiT
    model, _, exported = load_for_sampling(weights, vae=str(tiny_vae_dir))
    original, _, source = load_for_sampling(sit, vae=str(tiny_vae_dir))
    assert exported["objective"] == source["objective"] == RELEASE_OBJECTIVES["sit"]

    labels, noise = torch.tensor([1, 7]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = SamplerSettings(sampler="euler", num_steps=4, cfg_scale=1.5)
    ours = [sample_latents(m, trained_objective(p, m.config.learn_sigma), labels, settings, noise=noise)
            for m, p in ((original, source), (model, exported))]
    torch.testing.assert_close(ours[1], ours[0], rtol=0, atol=0)
    assert ours[0].std() > 0.1

    # a DiT release file exported the same way records DiT's chain, and samples as the diffusion model it is
    dit = release_state_dict(tmp_path / "DiT-S-8-64.pt")
    save_pretrained(dit, tmp_path / "dit-pre")
    assert "objective" not in json.loads((tmp_path / "dit-pre" / "config.json").read_text())
    _, _, chain = load_for_sampling(tmp_path / "dit-pre" / "model.safetensors", vae=str(tiny_vae_dir))
    assert chain["diffusion"] == {"noise_schedule": "linear", "diffusion_steps": 1000} and "objective" not in chain


def test_pretrained_weights_file_records_the_diffusion_chain_the_run_was_trained_on(tmp_path):
    """A cosine/500-step run's exported weights file sampled with sample.py walks that chain, not
    the linear 1000-step default of a file that records none."""
    model = tiny_dit(in_channels=3)
    chain = {"noise_schedule": "cosine", "diffusion_steps": 500}
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 7,
                 "model_config": model.config.to_dict(), "config": {"diffusion": chain},
                 "autoencoder": {"name": "pixel", "scale_factor": 1.0}}, tmp_path / "run.pt")
    save_pretrained(tmp_path / "run.pt", tmp_path / "pre")
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["diffusion"] == chain
    _, _, provenance = load_for_sampling(tmp_path / "pre" / "model.safetensors")
    assert provenance["diffusion"] == chain and "objective" not in provenance
    assert (provenance["vae"], provenance["step"]) == ("pixel", 7)
