"""Issue 23, item 5: the diffusers export's caveats, each made to work or refused in one line
before anything is written (docs/export.md, "What the diffusers export cannot do").

- Guidance on a model of other than 1000 classes raised `IndexError` inside diffusers:
  `DiTPipeline.__call__` passes class id 1000 (hard-coded) for the unconditional half. Now the
  exported label table holds the model's null embedding at row 1000, so guidance samples as
  `sample.py` does; a model of more than 1000 classes (1000 is one of its classes) and an
  `--id2label` naming a class the model does not have are refused.
- A pixel-space model (vae=pixel) was exported although `DiTPipeline` always decodes with an
  AutoencoderKL, and its model card said it "denoises latents". Now the diffusers export refuses
  it, and the `pretrained` export's card says pixel space.
- An export prints only its own lines: the folder it wrote (no "self.vae=None ... cannot be
  saved", no diffusers notice to install accelerate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script, tiny_dit

from dit.cli.export import main
from dit.io.checkpoint import save_atomic
from dit.io.export import DiffusersExportError, export_diffusers, load_diffusers_pipeline
from dit.sampling.images import sample_latents
from dit.sampling.settings import SamplerSettings

CHAIN = {"noise_schedule": "linear", "diffusion_steps": 1000}



def run_checkpoint(path: Path, autoencoder: dict | None = None, **model_config):
    """One of our checkpoints of a tiny DiT (`model_config` changed) trained on the linear
    1000-step chain; returns the model."""
    model = tiny_dit(**model_config)
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 9,
                 "model_config": model.config.to_dict(), "config": {"diffusion": dict(CHAIN)},
                 "autoencoder": autoencoder or {"name": "sd-ema", "scale_factor": 0.18215}}, path)
    return model


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_in_one_line(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])


def pipeline_latents(pipe, labels: list[int], guidance_scale: float, steps: int, seed: int) -> torch.Tensor:
    """The latents `pipe` hands its VAE to decode (scaled back), for `labels`."""
    seen = []
    decode = pipe.vae.decode

    def recording(latents, *args, **kwargs):
        seen.append(latents * pipe.vae.config.scaling_factor)
        return decode(latents, *args, **kwargs)

    pipe.vae.decode = recording
    try:
        pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps, output_type="pt",
             generator=torch.Generator().manual_seed(seed))
    finally:
        pipe.vae.decode = decode
    return seen[0]


@pytest.mark.parametrize("steps", [2, 4])
def test_guidance_on_a_10_class_model_samples_as_our_sampler(tmp_path, tiny_vae_dir, no_network, steps):
    """`pipe(..., guidance_scale=4)` on a 10-class model raised IndexError (the null class 1000 is
    past its 11-row label table). Now it draws what our DDIM sampler draws from the same noise with
    cfg 4 on all channels (DiT's ddimN timesteps: 2 and 4 guided denoiser calls), to 1e-5 of the
    largest value; labels and id2label are the model's."""
    model = run_checkpoint(tmp_path / "run.pt", num_classes=10)
    names = {i: f"class {i}" for i in range(10)}
    export_diffusers(tmp_path / "run.pt", tmp_path / "out", vae=str(tiny_vae_dir), id2label=names)
    pipe = load_diffusers_pipeline(tmp_path / "out")
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    ours = model.y_embedder.embedding_table.weight
    assert torch.equal(table[:10], ours[:10]) and torch.equal(table[1000], ours[10])  # null at 1000
    labels = pipe.get_label_ids(["class 7", "class 0", "class 9"])
    assert labels == [7, 0, 9]
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["id2label"]["7"] == "class 7"

    guided = pipeline_latents(pipe, labels, 4.0, steps, seed=3)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))  # the pipeline's draw
    settings = SamplerSettings(sampler="ddim", num_steps=steps, cfg_scale=4.0, guided_channels="all", spacing="ddim")
    with torch.no_grad():
        expected = sample_latents(model, None, torch.tensor(labels), settings, noise=noise)
    assert ((guided - expected).abs().max() / expected.abs().max()).item() < 1e-5  # latents reach ~30
    unguided = pipeline_latents(pipe, labels, 1.0, steps, seed=3)
    assert (guided - unguided).abs().max().item() > 1e-2  # guidance did something

    card = (tmp_path / "out" / "README.md").read_text()
    assert "ids 0..9" in card and "guidance needs 1000 classes" not in card


def test_what_guidance_cannot_serve_is_refused_before_anything_is_written(tmp_path, capsys):
    """A model of more than 1000 classes (class 1000 is one of its own) and an id2label naming a
    class the model does not have: one error line, exit 2, no output folder."""
    run_checkpoint(tmp_path / "big.pt", num_classes=1001)
    code = main(["diffusers", str(tmp_path / "big.pt"), str(tmp_path / "out")])
    assert_refused_in_one_line(code, capsys.readouterr().err, "1001 classes", "class id 1000", "null class",
                               "sample.py", "pretrained")
    with pytest.raises(DiffusersExportError, match="1001 classes"):
        export_diffusers(tmp_path / "big.pt", tmp_path / "out")

    run_checkpoint(tmp_path / "run.pt", num_classes=10)
    (tmp_path / "labels.json").write_text(json.dumps({"3": "tench", "12": "goldfish"}))
    code = main(["diffusers", str(tmp_path / "run.pt"), str(tmp_path / "out"), "--id2label",
                 str(tmp_path / "labels.json")])
    assert_refused_in_one_line(code, capsys.readouterr().err, "class id 12", "10 classes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pt", "labels.json", "run.pt"]


def test_a_pixel_space_model_is_refused_by_the_diffusers_export_and_its_card_says_pixels(tmp_path, tiny_vae_dir,
                                                                                         capsys):
    """A vae=pixel run was exported as a DiTPipeline, which cannot sample it (it always decodes
    with an AutoencoderKL), with a card saying it "denoises latents". Now it is refused in one line
    (with or without --vae, onto a previous export with --overwrite: left as it was); the
    pretrained export, which keeps it, says pixel space; that folder is refused too."""
    pixel = tmp_path / "pixel.pt"
    run_checkpoint(pixel, autoencoder={"name": "pixel", "scale_factor": 1.0}, in_channels=3)
    why = ("pixel-space model", "vae=pixel", "DiTPipeline", "AutoencoderKL", "nothing was written", "sample.py",
           "pretrained")
    for extra in ([], ["--vae", str(tiny_vae_dir)]):
        code = main(["diffusers", str(pixel), str(tmp_path / "out"), *extra])
        assert_refused_in_one_line(code, capsys.readouterr().err, str(pixel), *why)
    assert not (tmp_path / "out").exists()

    run_checkpoint(tmp_path / "latent.pt")
    assert main(["diffusers", str(tmp_path / "latent.pt"), str(tmp_path / "out")]) == 0
    before = tree(tmp_path / "out")
    capsys.readouterr()
    code = main(["diffusers", str(pixel), str(tmp_path / "out"), "--overwrite"])
    assert_refused_in_one_line(code, capsys.readouterr().err, *why)
    assert tree(tmp_path / "out") == before

    assert main(["pretrained", str(pixel), str(tmp_path / "pre")]) == 0
    card = (tmp_path / "pre" / "README.md").read_text()
    assert "latent" not in card.lower() and "pixel space" in card, card
    capsys.readouterr()
    for source in (tmp_path / "pre", tmp_path / "pre" / "model.safetensors"):
        code = main(["diffusers", str(source), str(tmp_path / "d")])
        assert_refused_in_one_line(code, capsys.readouterr().err, *why)
    assert not (tmp_path / "d").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latent.pt", "out", "pixel.pt", "pre"]


@pytest.mark.slow
@pytest.mark.parametrize("with_vae", [False, True], ids=["no-vae", "vae"])
def test_an_export_prints_only_the_folder_it_wrote(tmp_path, tiny_vae_dir, with_vae):
    """`python -m dit.export diffusers` in a process of its own: stdout is the output folder, stderr
    is empty. Without --vae diffusers warned "self.vae=None ... cannot be saved"; with one, it
    advised installing accelerate."""
    run_checkpoint(tmp_path / "run.pt")
    out = tmp_path / "out"
    args = ["diffusers", str(tmp_path / "run.pt"), str(out)] + (["--vae", str(tiny_vae_dir)] if with_vae else [])
    proc = run_script("dit.export", args, cwd=REPO, env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == (f"{out}\n", "")
    assert (out / "vae").is_dir() == with_vae and (out / "transformer").is_dir()
