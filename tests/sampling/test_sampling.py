"""Sampling: the pixel conversion, per-sample determinism, classifier-free guidance (scale 1,
guided channels, guidance interval), the DPM-Solver++ wiring, bulk .npz files that do not depend
on batch size, rank count or interruptions, and the sample.py entry point.

Models are tiny DiTs with perturbed (non-zero) output layers so that every channel matters."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.sampling.diffusion import sampling_chain
from dit.io.images import to_uint8
from dit.sampling.guidance import GuidedDenoiser
from dit.sampling.images import sample_latents
from dit.sampling.loading import settings_path_for
from dit.sampling.order import (initial_noise, rank_indices, sample_blocks, sample_generators, sample_labels,
                                sample_seed)
from dit.sampling.settings import SamplerSettings
from dit.diffusion import create_diffusion

from conftest import REPO, bulk_sample_with, run_script, single_thread, threads_as_ranks, tiny_dit, torchrun_bulk_sample



class SquashAE(torch.nn.Module):
    """A stand-in autoencoder for 4 latent channels: elementwise, so it cannot couple samples,
    and squashing (tanh) so the uint8 images are not all saturated."""

    name, latent_channels, downsample_factor, scale_factor = "squash", 4, 1, 1.0

    def decode(self, z):
        return torch.tanh(z[:, :3] / 20.0) + 0.05 * torch.tanh(z[:, 3:4])

    def to_dict(self):
        return {"name": self.name}


def latents(model, labels, indices, seed=0, **kw):
    gens = sample_generators(seed, indices)
    cfg = model.config
    noise = initial_noise(gens, (cfg.in_channels, cfg.input_size, cfg.input_size))
    kw.setdefault("cfg_scale", 2.0)
    return sample_latents(model, None, torch.tensor(labels), SamplerSettings(**kw), noise=noise, generator=gens)


# ------------------------------------------------------------------------------ basics


def test_to_uint8_is_the_reference_conversion_to_nhwc():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 8).expand(1, 3, 2, 8)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 8, 3)
    expected = np.clip(127.5 * x.numpy() + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255, 255]  # truncation, clamping
    with pytest.raises(ValueError, match="N, 3, H, W"):
        to_uint8(torch.zeros(2, 4, 8, 8))


def test_seeds_and_labels_depend_only_on_the_run_seed_and_the_sample_index():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    seeds = {sample_seed(s, i, stream) for s in (0, 1) for i in range(50) for stream in (0, 1)}
    assert len(seeds) == 200  # all distinct
    full = sample_labels(3, range(40), 7, "uniform")
    np.testing.assert_array_equal(sample_labels(3, [10, 11, 39], 7, "uniform"), full[[10, 11, 39]])
    assert 0 <= full.min() and full.max() < 7 and len(set(full.tolist())) > 3
    assert sample_labels(3, range(12), 5, "balanced").tolist() == [i % 5 for i in range(12)]
    with pytest.raises(ValueError, match="label mode"):
        sample_labels(0, [0], 5, "sorted")


def test_a_samples_noise_does_not_depend_on_its_batch():
    gens_all, gens_part = sample_generators(4, range(6)), sample_generators(4, [2, 3])
    assert torch.equal(initial_noise(gens_all, (4, 8, 8))[2:4], initial_noise(gens_part, (4, 8, 8)))
    # Per-step noise (DDPM, DDIM with eta > 0) continues each sample's own generator.
    chain = create_diffusion("")
    step_all = chain._randn((6, 4, 8, 8), gens_all, "cpu")
    assert torch.equal(step_all[2:4], chain._randn((2, 4, 8, 8), gens_part, "cpu"))
    assert not torch.equal(step_all[0], step_all[1])


def test_blocks_fix_which_samples_share_a_batch_on_any_rank():
    assert [b.tolist() for b in sample_blocks(range(10), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in sample_blocks([8, 9, 0, 1, 2], 4)] == [[8, 9], [0, 1, 2]]
    one = rank_indices(10, 4, 0, 1)
    two = [rank_indices(10, 4, r, 2) for r in range(2)]
    assert one.tolist() == list(range(10))
    assert two[0].tolist() == [0, 1, 2, 3, 8, 9] and two[1].tolist() == [4, 5, 6, 7]
    assert rank_indices(10, 4, 1, 2, skip_blocks={0}).tolist() == [8, 9]


@pytest.mark.parametrize("sampler,steps", [("ddpm", 8), ("ddim", 6), ("dpm++", 5)])
def test_same_block_gives_bitwise_same_samples_other_batches_agree_to_rounding(sampler, steps):
    model = tiny_dit()
    labels = [0, 1, 2, 3, 4, 0]
    big = latents(model, labels, range(6), sampler=sampler, num_steps=steps)
    again = latents(model, labels, range(6), sampler=sampler, num_steps=steps)
    part = latents(model, labels[2:4], [2, 3], sampler=sampler, num_steps=steps)
    assert torch.equal(big, again)
    # Another batch composition changes only float rounding (GEMM kernels depend on the batch shape).
    torch.testing.assert_close(part, big[2:4], rtol=1e-4, atol=1e-4 * big.abs().max().item())
    assert not torch.equal(big[0], big[1])


def test_cfg_scale_one_is_the_conditional_model_with_no_null_pass():
    model = tiny_dit()
    rows = []  # rows of every network pass (the patch embedder sees them all, CFG passes included)
    hook = model.x_embedder.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    y = torch.tensor([1, 3, 4])
    gens = sample_generators(0, range(3))
    noise = initial_noise(gens, (4, 8, 8))
    ours = sample_latents(model, None, y, SamplerSettings(cfg_scale=1.0, sampler="ddim", num_steps=6), noise=noise)
    hook.remove()
    assert rows == [3] * 6  # one pass of B rows per step: no unconditional half
    # The lead's DDIM loop on the plain conditional network, same chain, same noise.
    chain = sampling_chain(create_diffusion(""), 6)
    with torch.no_grad():
        reference = chain.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs={"y": y})
    assert torch.equal(ours, reference)
    # DDPM (stochastic): one sample, one generator, equals the lead's p_sample_loop.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = sample_latents(model, None, y[:1], SamplerSettings(cfg_scale=1.0, sampler="ddpm", num_steps=5),
                            noise=noise[:1], generator=g1)
    with torch.no_grad():
        reference = sampling_chain(create_diffusion(""), 5).p_sample_loop(
            model, noise[:1].shape, noise=noise[:1], model_kwargs={"y": y[:1]}, generator=g2)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("guided_channels", [3, "all"])
def test_guidance_mixes_cond_and_uncond_only_on_the_guided_channels(guided_channels):
    model = tiny_dit(in_channels=4, learn_sigma=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2])
    scale = 3.0
    with torch.no_grad():
        out = GuidedDenoiser(model, y, SamplerSettings(cfg_scale=scale, guided_channels=guided_channels))(x, t)
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.config.num_classes))
    k = 4 if guided_channels == "all" else 3
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(out[:, :k], uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, k:], cond[:, k:], rtol=1e-5, atol=1e-5)  # unguided eps and variance
    assert (out[:, :k] - cond[:, :k]).abs().max() > 1e-2  # guidance did something


def test_guidance_interval_guides_only_inside_and_skips_the_null_pass_outside():
    model = tiny_dit()
    calls = []  # (timestep, rows) of every network pass
    hook = model.t_embedder.register_forward_pre_hook(lambda m, args: calls.append((int(args[0][0]), len(args[0]))))
    labels = [1, 2]
    inside = latents(model, labels, [0, 1], sampler="ddim", num_steps=10, guidance_interval=[300, 700])
    hook.remove()
    for t, rows in calls:
        assert rows == (4 if 300 <= t <= 700 else 2), (t, rows)
    assert {rows for _, rows in calls} == {2, 4}
    everywhere = latents(model, labels, [0, 1], sampler="ddim", num_steps=10, guidance_interval=[0, 999])
    nowhere = latents(model, labels, [0, 1], sampler="ddim", num_steps=10, guidance_interval=[1000, 1000])
    assert torch.equal(everywhere, latents(model, labels, [0, 1], sampler="ddim", num_steps=10))
    assert torch.equal(nowhere, latents(model, labels, [0, 1], sampler="ddim", num_steps=10, cfg_scale=1.0))
    assert not torch.equal(inside, everywhere) and not torch.equal(inside, nowhere)


def test_dpm_solver_reads_all_epsilon_channels_and_no_variance_channel():
    """diffusers' own learned-sigma option keeps a hard-coded 3 channels; with 4 latent channels
    the 4th epsilon channel must still drive the solver, and the variance channels must not."""
    base = latents(tiny_dit(), [1, 2], [0, 1], sampler="dpm++", num_steps=6)

    def perturbed(channel):
        model = tiny_dit()
        with torch.no_grad():  # final linear rows are (p, p, C_out) flattened: channel = row % C_out
            rows = torch.arange(model.final_layer.linear.out_features) % model.out_channels == channel
            model.final_layer.linear.weight[rows] += 0.5
        return latents(model, [1, 2], [0, 1], sampler="dpm++", num_steps=6)

    assert torch.equal(perturbed(4), base) and torch.equal(perturbed(7), base)  # variance channels: ignored
    assert not torch.equal(perturbed(3), base)  # the 4th epsilon channel counts


def test_dpm_solver_and_ddim_solve_the_same_ode():
    """Both are deterministic solvers of the probability-flow ODE: with enough steps they agree
    (this checks the schedule and timestep wiring of the diffusers solver)."""
    model = tiny_dit()
    a = latents(model, [1, 2], [0, 1], sampler="dpm++", num_steps=20, cfg_scale=1.0)
    b = latents(model, [1, 2], [0, 1], sampler="ddim", num_steps=100, cfg_scale=1.0)
    few = latents(model, [1, 2], [0, 1], sampler="ddim", num_steps=4, cfg_scale=1.0)
    err = ((a - b).norm() / b.norm()).item()
    assert err < 0.015, err  # measured 0.008; a wrong schedule or timestep map is off by > 0.05
    assert ((few - b).norm() / b.norm()).item() > 3 * err  # the tolerance is meaningful


def test_bad_sampling_inputs_fail_with_a_clear_message():
    model = tiny_dit()
    noise = torch.randn(2, 4, 8, 8)
    Settings = SamplerSettings
    with pytest.raises(ValueError, match="class label 5 is out of range"):
        sample_latents(model, None, torch.tensor([0, 5]), Settings(cfg_scale=1.5, num_steps=2), noise=noise)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        sample_latents(model, None, torch.tensor([0, 1]), Settings(cfg_scale=-1, num_steps=2), noise=noise)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_latents(model, None, torch.tensor([0, 1]), Settings(cfg_scale=1.5, sampler="euler"), noise=noise)
    for sampler in ("ddpm", "ddim"):  # one step used to crash deep in the chain with an IndexError
        with pytest.raises(ValueError, match=f"the {sampler} sampler needs num_steps >= 2"):
            sample_latents(model, None, torch.tensor([0, 1]), Settings(cfg_scale=1.5, sampler=sampler, num_steps=1),
                             noise=noise)
    with pytest.raises(ValueError, match="noise must be"):
        sample_latents(model, None, torch.tensor([0, 1]), Settings(cfg_scale=1.5, num_steps=2), noise=noise[:, :3])
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        sample_latents(tiny_dit(class_dropout_prob=0.0), None, torch.tensor([0, 1]), Settings(cfg_scale=1.5),
                         noise=noise)
    with pytest.raises(ValueError, match="already respaced"):
        sample_latents(model, create_diffusion("10"), torch.tensor([0, 1]), Settings(cfg_scale=1.5, num_steps=5),
                         noise=noise)
    with pytest.raises(ValueError, match="guided_channels must be 1..4 or 'all'"):
        sample_latents(model, None, torch.tensor([0, 1]), Settings(cfg_scale=1.0, guided_channels=5), noise=noise)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample_latents(model, None, torch.tensor([0, 1]), Settings(cfg_scale=2.0, guidance_interval=[700, 300]),
                         noise=noise)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        bulk_sample_with(model, None, SquashAE(), "x.npz", Settings(), num_samples=0, seed=0, batch_size=32)


# ------------------------------------------------------------------------------ bulk sampling


def _bulk(model, out, **kw):
    settings = dict(sampler="ddpm", num_steps=4, cfg_scale=kw.pop("cfg_scale", 1.5))
    args = dict(num_samples=7, seed=3, progress=False, provenance={"checkpoint": "tiny"})
    args.update(kw)
    return bulk_sample_with(model, None, SquashAE(), out, SamplerSettings(**settings), **args)


def test_bulk_npz_is_byte_identical_for_any_rank_count_and_after_an_interruption(tmp_path):
    model = tiny_dit()
    a = _bulk(model, tmp_path / "a.npz", batch_size=3)
    threads_as_ranks(2, lambda r, w, sync: _bulk(model, tmp_path / "b.npz", batch_size=3, rank=r, world_size=w,
                                                  barrier=sync))
    b = tmp_path / "b.npz"

    class Killed(Exception):
        pass

    def kill_after_first_shard(n):
        raise Killed

    with pytest.raises(Killed):  # one rank, killed after its first shard
        _bulk(model, tmp_path / "c.npz", batch_size=3, on_shard_written=kill_after_first_shard)
    parts = tmp_path / "c.npz.parts"
    assert len(list(parts.glob("shard-*.npz"))) == 1 and not (tmp_path / "c.npz").exists()
    (parts / ".shard-00000001.npz.tmp999").write_bytes(b"half a file")  # a write cut short by a kill
    with pytest.raises(ValueError, match="different settings.*batch_size"):  # regrouping would change bits
        _bulk(model, tmp_path / "c.npz", batch_size=4)
    written = []  # resumed on two ranks
    threads_as_ranks(2, lambda r, w, sync: _bulk(model, tmp_path / "c.npz", batch_size=3, rank=r, world_size=w,
                                                  barrier=sync, on_shard_written=written.append))
    c = tmp_path / "c.npz"
    assert sum(written) == 7 - 3  # only the missing blocks were sampled

    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    data = np.load(a)
    assert sorted(data.files) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(data["arr_1"], sample_labels(3, range(7), 5))
    assert len(np.unique(data["arr_0"])) > 50  # real pixel values, not saturated 0/255
    settings = json.loads(settings_path_for(a).read_text())
    assert settings["num_samples"] == 7 and settings["sampler"] == "ddpm" and settings["cfg_scale"] == 1.5
    assert settings["guided_channels"] == 3 and settings["checkpoint"] == "tiny" and settings["batch_size"] == 3
    assert not parts.exists()  # shards are removed once the file is complete

    # Same path, different settings: refused rather than mixed.
    with pytest.raises(ValueError, match="different settings.*cfg_scale"):
        _bulk(model, tmp_path / "a.npz", batch_size=3, cfg_scale=2.0)


def _pixel_checkpoint(tmp_path: Path, num_classes: int = 5, in_channels: int = 3, name: str = "pix.pt") -> Path:
    """A tiny DiT in our checkpoint format (contract 2) that records the pixel autoencoder (with
    in_channels=4 it needs another one: vae=...)."""
    from dit.io.checkpoint import save_atomic

    model = tiny_dit(in_channels=in_channels, num_classes=num_classes, input_size=8)
    path = tmp_path / name
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 11, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "format_version": 1}, path)
    return path


def _run_cli(script: str, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """`python <script> <args>` in `cwd`: one thread, the repository on PYTHONPATH, `env` set."""
    return run_script(script, args, cwd=cwd, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_npz_as_one_process(tmp_path, compose):
    """The real thing: `torchrun --nproc_per_node=2 sample.py` (gloo, CPU) against one process.
    (Pixel space and DDIM keep the subprocesses light; the thread test above covers decoded
    pixel values.)"""
    ckpt = _pixel_checkpoint(tmp_path)
    common = [f"checkpoint={ckpt}", "mode=bulk", "bulk.num_samples=7", "bulk.batch_size=2", "sampler=ddim",
              "sampler.num_steps=3", "seed=5", "device=cpu"]
    two = torchrun_bulk_sample(common, tmp_path / "two.npz")

    from dit.sampling.generate import generate_bulk  # one process, what sample.py runs

    one = generate_bulk(compose("sample", [*common, f"bulk.out={tmp_path / 'one.npz'}"]))
    assert one.read_bytes() == two.read_bytes()
    images = np.load(two)["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (7, 8, 8, 3)
    settings = json.loads(settings_path_for(two).read_text())
    assert settings["step"] == 11 and settings["sampler"] == "ddim" and settings["vae"] == "pixel"
    assert settings["checkpoint"] == str(ckpt.resolve()) and settings["batch_size"] == 2


def test_grid_mode_writes_a_png_and_its_settings(tmp_path, compose):
    from PIL import Image

    from dit.sampling.generate import generate_grid

    ckpt = _pixel_checkpoint(tmp_path, num_classes=10)
    out = generate_grid(compose("sample", [f"checkpoint={ckpt}", "grid.labels=[1,2,3,4,5]", "grid.nrow=3",
                                            "sampler.num_steps=3", f"grid.out={tmp_path / 'g.png'}", "device=cpu"]))
    with Image.open(out) as im:
        assert im.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2) and im.mode == "RGB"
    settings = json.loads(settings_path_for(out).read_text())
    assert settings["labels"] == [1, 2, 3, 4, 5] and settings["cfg_scale"] == 4.0 and settings["num_steps"] == 3
    assert settings["vae"] == "pixel" and settings["step"] == 11 and settings["mode"] == "grid"
    everything = generate_grid(compose("sample", [f"checkpoint={ckpt}", "grid.labels=all", "sampler.num_steps=2",
                                                   f"grid.out={tmp_path / 'all.png'}", "device=cpu"]))
    assert json.loads(settings_path_for(everything).read_text())["labels"] == list(range(10))


@pytest.mark.slow
def test_vae_directory_on_the_command_line_decodes_the_grid(tmp_path, tiny_vae_dir, compose):
    """`vae=DIR` (what the offline VAE message advises) and `vae=local vae.name=DIR` both load a
    saved AutoencoderKL and decode with it; the checkpoint's own (pixel) autoencoder is not used."""
    from PIL import Image

    from dit.sampling.generate import generate_grid

    ckpt = _pixel_checkpoint(tmp_path, in_channels=4)  # 4 latent channels: pixel cannot decode it
    common = [f"checkpoint={ckpt}", "grid.labels=[1,2,3]", "sampler=ddim", "sampler.num_steps=2", "device=cpu"]
    proc = _run_cli("sample.py", [*common, f"vae={tiny_vae_dir}", f"grid.out={tmp_path / 'dir.png'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with single_thread():  # as the subprocess (OMP_NUM_THREADS=1): the same float reductions, the same bytes
        local = generate_grid(compose("sample", [*common, "vae=local", f"vae.name={tiny_vae_dir}",
                                                 f"grid.out={tmp_path / 'local.png'}"]))
    with Image.open(tmp_path / "dir.png") as im:
        assert im.size == (3 * (16 + 2) + 2, 16 + 2 + 2)  # 8x8 latents, decoded x2 by the tiny VAE
    assert (tmp_path / "dir.png").read_bytes() == local.read_bytes()
    for png in (tmp_path / "dir.png", local):
        settings = json.loads(settings_path_for(png).read_text())
        assert settings["vae"] == str(tiny_vae_dir) and settings["autoencoder"]["downsample_factor"] == 2


@pytest.mark.slow
def test_vae_by_name_reaches_the_autoencoder_loader_in_sample_and_eval(tmp_path):
    """`vae=sd-mse` is a choice of conf/vae/, not a hydra override error: offline and with an empty
    hub cache, the loader itself reports the hub id it tried."""
    ckpt = _pixel_checkpoint(tmp_path, in_channels=4)
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    sample = _run_cli("sample.py", [f"checkpoint={ckpt}", "vae=sd-mse", "device=cpu"], tmp_path, **offline)
    from PIL import Image

    # eval_fid checks what scoring needs before sampling (dit/cli/eval_fid.py check_scoring_inputs): give it a
    # reference that exists and the toy judge (no Inception weights), so the autoencoder is what fails.
    reference = tmp_path / "reference"
    reference.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(reference / "0.png")
    evaluate = _run_cli("eval_fid.py", [f"checkpoint={ckpt}", "vae=sd-mse", f"reference={reference}",
                                        "feature_extractor=toy_judge", "bulk.num_samples=2", "device=cpu"],
                        tmp_path, **offline)
    for proc in (sample, evaluate):
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "Could not override" not in out
        assert "cannot load the autoencoder 'stabilityai/sd-vae-ft-mse'" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sample.py", "eval_fid.py"])
def test_a_wrong_type_fails_at_composition_naming_the_key_before_any_work(tmp_path, script):
    proc = _run_cli(script, ["checkpoint=does-not-exist.pt", "mode=bulk", "bulk.num_samples=abc", "reference=r.npz"],
                    tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "bulk.num_samples" in out and "abc" in out, out[-3000:]
    assert "does not exist" not in out  # the checkpoint was never opened


# ------------------------------------------------------------------------------ in-training evaluation


class PixelStatsExtractor:
    """A cheap deterministic feature extractor (per-channel means and a coarse 2x2 pooling)."""

    name = identity = "pixel-stats"

    def __init__(self):
        self.calls = 0

    def extract(self, images, progress=False):
        self.calls += 1
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).double().numpy()}


def test_fid_evaluator_computes_the_reference_once_and_is_deterministic(tmp_path):
    from dit.scoring.config import ScoringConfig
    from dit.scoring.evaluator import Evaluator, SamplePlan
    from dit.io.npz import write_samples_npz

    rng = np.random.default_rng(0)
    write_samples_npz(tmp_path / "ref.npz", rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    extractor = PixelStatsExtractor()
    plan = SamplePlan(SamplerSettings(sampler="ddim", num_steps=3), num_samples=6, batch_size=4)
    evaluator = Evaluator(ScoringConfig(tmp_path / "ref.npz", metrics=("fid", "prc")), extractor)
    model = tiny_dit()
    first = evaluator.evaluate(model, None, SquashAE(), plan)
    second = evaluator.evaluate(model, None, SquashAE(), plan)
    assert first == second and first["num_samples"] == 6 and first["fid"] > 0
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1
    assert extractor.calls == 3  # reference once, samples twice
