"""Export: a diffusers folder that computes what our DiT computes, our own hub-style folder, the
upload command, and torch.hub entry points (docs/export.md)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, tiny_dit

from dit.io.checkpoint import load_dit_checkpoint, save_atomic
from dit.diffusion import create_diffusion, named_betas
from dit.cli.export import main
from dit.io.export import (export_diffusers, load_diffusers_pipeline, load_diffusers_transformer, load_pretrained,
                           save_pretrained)
from dit.models import DIT_SIZES, DiT_models

# Two configurations: learned sigma with patch 2 and label dropout; no sigma, patch 4, no null row
# (the export adds an untrained one), trained on another chain.
CONFIGS = {
    "sigma_p2": dict(model=dict(), diffusion={"noise_schedule": "linear", "diffusion_steps": 1000}),
    "eps_p4_nodrop": dict(model=dict(learn_sigma=False, patch_size=4, class_dropout_prob=0.0),
                          diffusion={"noise_schedule": "cosine", "diffusion_steps": 500}),
}



def write_run_checkpoint(path, model_config: dict, diffusion: dict, step: int = 1234):
    """One of our checkpoints whose EMA and raw weights differ; returns (ema model, raw model)."""
    ema, raw = tiny_dit(seed=0, **model_config), tiny_dit(seed=1, **model_config)
    save_atomic({"model": raw.state_dict(), "ema": ema.state_dict(), "step": step,
                 "model_config": ema.config.to_dict(), "config": {"diffusion": diffusion},
                 "autoencoder": {"name": "sd-ema", "scale_factor": 0.18215}}, path)
    return ema, raw


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """(path, model): a bare EMA state dict as the release ships, of DiT-S/8 on 8x8 latents, 10 classes."""
    torch.manual_seed(3)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=10).eval()
    path = tmp_path_factory.mktemp("release") / "DiT-S-8-64x64.pt"
    torch.save(model.state_dict(), path)
    return path, model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_diffusers_model_gives_our_outputs(tmp_path, no_network, name):
    from diffusers import DiTTransformer2DModel

    case = CONFIGS[name]
    ema, raw = write_run_checkpoint(tmp_path / "run.pt", case["model"], case["diffusion"])
    assert main(["diffusers", str(tmp_path / "run.pt"), str(tmp_path / "out")]) == 0

    x = torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 17, 250, 600, 999])
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    with torch.no_grad():
        ours = ema(x, t, y)
        # A plain from_pretrained of the folder (offline); diffusers' timestep shift is 1 there.
        plain = DiTTransformer2DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer")
        shipped = plain(x, t, y).sample
        fixed = load_diffusers_transformer(tmp_path / "out")(x, t, y).sample
    assert fixed.shape == ours.shape == (6, 8 if ema.learn_sigma else 4, 8, 8)
    assert relative_error(ours, fixed) <= 1e-5
    assert relative_error(ours, shipped) > 1e-3  # why the loaders set the shift (docs/export.md)
    assert relative_error(raw(x, t, y).detach(), fixed) > 1e-2  # the EMA weights were exported

    # The scheduler walks the chain the run was trained with.
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    steps = case["diffusion"]["diffusion_steps"]
    assert scheduler["num_train_timesteps"] == steps and scheduler["clip_sample"] is False
    expected = torch.tensor(named_betas(case["diffusion"]["noise_schedule"], steps), dtype=torch.float32)
    assert torch.equal(torch.tensor(scheduler["trained_betas"], dtype=torch.float32), expected)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "training steps: 1234" in card and "license: other" in card


def test_pipeline_ddim_without_guidance_reproduces_our_ddim_sampler(tmp_path, tiny_vae_dir, no_network):
    from diffusers import AutoencoderKL

    ema, _ = write_run_checkpoint(tmp_path / "run.pt", {}, CONFIGS["sigma_p2"]["diffusion"])
    export_diffusers(tmp_path / "run.pt", tmp_path / "out", vae=str(tiny_vae_dir), id2label={1: "disc", 3: "ring, hoop"})
    pipe = load_diffusers_pipeline(tmp_path / "out")
    assert pipe.get_label_ids(["hoop", "disc"]) == [3, 1]
    labels = [1, 3]
    images = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=4, output_type="pt",
                  generator=torch.Generator().manual_seed(5)).images

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # the pipeline's draw
    latents = create_diffusion("ddim4").ddim_sample_loop(ema, noise.shape, noise=noise,
                                                         model_kwargs={"y": torch.tensor(labels)})
    vae = AutoencoderKL.from_pretrained(str(tiny_vae_dir)).eval()
    with torch.no_grad():
        ours = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert (images - ours).abs().max().item() < 1e-4


def test_pipeline_without_vae_says_which_to_pass(tmp_path):
    write_run_checkpoint(tmp_path / "run.pt", {}, CONFIGS["sigma_p2"]["diffusion"])
    export_diffusers(tmp_path / "run.pt", tmp_path / "out")
    assert not (tmp_path / "out" / "vae").exists()
    with pytest.raises(ValueError, match="exported without its VAE.*sd-ema"):
        load_diffusers_pipeline(tmp_path / "out")


def test_save_pretrained_round_trip_and_release_license(tmp_path, release_file):
    ema, raw = write_run_checkpoint(tmp_path / "run.pt", {"learn_sigma": False}, CONFIGS["sigma_p2"]["diffusion"])
    save_pretrained(tmp_path / "run.pt", tmp_path / "mine", use_ema=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model, meta = load_pretrained(tmp_path / "mine")
    assert model.config == raw.config and meta["step"] == 1234 and meta["weights"] == "model"
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in model.state_dict().items())
    again, _ = load_dit_checkpoint(tmp_path / "mine" / "model.safetensors")  # the weights file alone
    assert again.config == raw.config

    # A folder is a source too; a release file (a bare state dict) keeps the release's license.
    export_diffusers(tmp_path / "mine", tmp_path / "mine-diffusers", license="mit")
    record = json.loads((tmp_path / "mine-diffusers" / "dit_export.json").read_text())
    assert record["step"] == 1234 and record["weights"] == "model" and record["license"] == "mit"
    save_pretrained(release_file[0], tmp_path / "rel")
    assert "license: cc-by-nc-4.0" in (tmp_path / "rel" / "README.md").read_text()
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["model_name"] == "DiT-S/8"


def test_exports_are_atomic_and_refuse_what_diffusers_cannot_hold(tmp_path, monkeypatch, capsys):
    import dit.io.export as export

    write_run_checkpoint(tmp_path / "run.pt", {}, CONFIGS["sigma_p2"]["diffusion"])
    save_pretrained(tmp_path / "run.pt", tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(tmp_path / "run.pt", tmp_path / "out")

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(export, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk trouble"):
        export_diffusers(tmp_path / "run.pt", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run.pt"]  # no temp folder left

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["pretrained", str(tmp_path / "junk.pt"), str(tmp_path / "junk")]) == 2  # one-line error
    assert "junk.pt" in capsys.readouterr().err and not (tmp_path / "junk").exists()
    (tmp_path / "junk.pt").unlink()

    write_run_checkpoint(tmp_path / "wide.pt", {"mlp_ratio": 2.0}, CONFIGS["sigma_p2"]["diffusion"])
    with pytest.raises(ValueError, match="MLP ratio of 4"):
        export_diffusers(tmp_path / "wide.pt", tmp_path / "wide")
    assert not (tmp_path / "wide").exists()


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records the calls push_to_hub makes."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "commit-url"


def test_push_command_builds_the_upload_call(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    write_run_checkpoint(tmp_path / "run.pt", {}, CONFIGS["sigma_p2"]["diffusion"])
    save_pretrained(tmp_path / "run.pt", tmp_path / "out")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    RecordingHub.calls = []
    assert main(["push", "--folder", str(tmp_path / "out"), "--repo-id", "me/dit-tiny", "--private"]) == 0
    assert RecordingHub.calls == [
        ("init", {"token": None}),
        ("create_repo", {"repo_id": "me/dit-tiny", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/dit-tiny", "repo_type": "model", "folder_path": str(tmp_path / "out"),
                           "commit_message": "Upload DiT weights"}),
    ]
    RecordingHub.calls = []
    assert main(["push", "--folder", str(tmp_path), "--repo-id", "me/dit-tiny"]) == 2  # not an export folder
    assert main(["push", "--folder", str(tmp_path / "out"), "--repo-id", "dit-tiny"]) == 2
    assert RecordingHub.calls == [] and "not an export folder" in capsys.readouterr().err


def test_torch_hub_entry_points_from_a_local_checkout(release_file):
    # Every official name, built on the meta device (shapes only): DiT-XL/2 at 256 px is 675M parameters.
    for name, build in DiT_models.items():
        entry = name.replace("-", "_").replace("/", "_")
        model = torch.hub.load(str(REPO), entry, source="local", pretrained=False, device="meta")
        depth, width, heads = DIT_SIZES[name[4:].split("/")[0]]
        c = model.config
        assert (c.depth, c.hidden_size, c.num_heads, c.patch_size, c.input_size) == (depth, width, heads,
                                                                                      int(name[-1]), 32)
        if name == "DiT-XL/2":
            assert sum(p.numel() for p in model.parameters()) == 675_129_632

    # A real build from a local checkpoint: DiT-S/8 on 64 px images (8x8 latents).
    path, source = release_file
    loaded = torch.hub.load(str(REPO), "DiT_S_8", source="local", pretrained=str(path), image_size=64, num_classes=10)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="only for DiT-XL/2"):
        torch.hub.load(str(REPO), "DiT_B_4", source="local", pretrained=True)


def test_hubconf_imports_only_the_model_and_checkpoint_modules():
    import ast

    tree = ast.parse((REPO / "hubconf.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"dit.io.checkpoint", "dit.models", "torch"}
    dependencies = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "dependencies")
    assert {"torch", "timm"} <= set(ast.literal_eval(dependencies))
