"""Sampling flow models through the sampling stack (issue 14): the sampler family follows the
trained objective (`auto`; the other family refused in one line), guidance intervals in flow
time, NFE counted and recorded, bulk `.npz` identical for any number of ranks and after an
interruption, `eval.every` and `eval_fid.py` on a flow run, and SiT's release layout sampled in
SiT's reversed time. The diffusion path is pinned to the values it gave before flow sampling.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.sampling.guidance import GuidedDenoiser
from dit.sampling.images import sample_latents
from dit.sampling.loading import default_output_name, load_for_sampling, settings_path_for
from dit.sampling.order import initial_noise, sample_generators
from dit.sampling.samplers import build_sampler
from dit.sampling.settings import SamplerMismatchError, SamplerSettings
from dit.sampling.trained import RELEASE_CHAIN, RELEASE_OBJECTIVES, trained_objective
from dit.config import ConfigError, to_sample_config
from dit.flow import SIT_TIME, FlowMatching, NetworkTime
from dit.io.release import release_family

from conftest import (TINY_MODEL, bulk_sample_with, compose_config, single_thread, threads_as_ranks, tiny_dit,
                      torchrun_bulk_sample)


def flow_sample(denoiser, flow, noise, settings, generator=None):
    """(x, nfe) of the flow sampler `settings` name, through the one sampler interface."""
    return build_sampler(settings, flow).sample(denoiser, noise, generator=generator)

FLOW_RECORD = {"kind": "flow", "path": "linear", "prediction": "velocity", "time_sampling": "uniform",
               "logit_mean": 0.0, "logit_std": 1.0, "cosine_weight": 0.0, "network_time_scale": 1.0}


class SquashAE(torch.nn.Module):
    """An elementwise stand-in decoder for 4 latent channels (cannot couple samples)."""

    name, latent_channels, downsample_factor, scale_factor = "squash", 4, 1, 1.0

    def decode(self, z):
        return torch.tanh(z[:, :3]) + 0.05 * torch.tanh(z[:, 3:4])

    def to_dict(self):
        return {"name": self.name}


# ------------------------------------------------------------------------------ diffusion unchanged

# sample_latents of tiny_dit(learn_sigma=True), labels [0, 3, 4], per-sample generators of seed 7,
# computed with the code of commit 25839c4 (before flow sampling; one CPU thread): the first six
# values, and every value in tests/sampling/legacy/before_flow_latents.npz (recomputed on another
# CPU: equal to the recorded six to 4.4e-7 relative). Different CPUs run float32 kernels in
# different orders (AVX2 vs AVX-512 blocking), so across machines the comparison has a tolerance:
# float32 rounding (1.2e-7) grown through 10 steps of the chain measured 4.4e-7 of the largest
# value; 1e-5 of it bounds that 20x, while any change to a sampler's arithmetic (a step, a
# coefficient, the guidance mix) moves values by far more than 1e-3 of it.
BEFORE_FLOW = {
    "ddpm": [-63.05643844604492, 278.13885498046875, -274.6177978515625, -296.81085205078125, -3.479745864868164,
             -170.76156616210938],
    "ddim": [-25.03042984008789, 241.52297973632812, -250.61219787597656, -314.62481689453125, 48.95417022705078,
             -184.0247344970703],
}
BEFORE_FLOW_VALUES = Path(__file__).resolve().parent / "legacy" / "before_flow_latents.npz"
CROSS_CPU_TOLERANCE = 1e-5  # of the largest |value|: see above


def assert_close_across_cpus(x: torch.Tensor, reference) -> None:
    reference = torch.as_tensor(np.asarray(reference, dtype=np.float32))
    scale = float(reference.abs().max())
    torch.testing.assert_close(x, reference.reshape(x.shape), rtol=0, atol=CROSS_CPU_TOLERANCE * scale)


BEFORE_FLOW_SETTINGS = {"ddpm": dict(sampler="ddpm", num_steps=10, cfg_scale=1.5, guidance_interval=[200, 800]),
                        "ddim": dict(sampler="ddim", num_steps=10, cfg_scale=2.0, eta=0.5)}


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_diffusion_samples_are_the_values_from_before_flow_sampling_on_any_cpu(name, one_thread):
    model = tiny_dit(learn_sigma=True)
    gens = sample_generators(7, [0, 1, 2])
    noise = initial_noise(gens, (4, 8, 8))
    x = sample_latents(model, None, torch.tensor([0, 3, 4]), SamplerSettings(**BEFORE_FLOW_SETTINGS[name]),
                         noise=noise, generator=gens)
    assert_close_across_cpus(x.flatten()[:6], BEFORE_FLOW[name])
    assert_close_across_cpus(x, np.load(BEFORE_FLOW_VALUES)[name])
    # `auto` on a diffusion model is DDPM itself, bit for bit
    if name == "ddpm":
        auto = dict(BEFORE_FLOW_SETTINGS[name], sampler="auto")
        gens = sample_generators(7, [0, 1, 2])
        noise = initial_noise(gens, (4, 8, 8))
        y = sample_latents(model, None, torch.tensor([0, 3, 4]), SamplerSettings(**auto), noise=noise,
                             generator=gens)
        assert torch.equal(x, y)


def test_auto_is_the_objectives_default_and_the_other_family_is_refused_naming_the_right_samplers():
    assert SamplerSettings().for_objective("diffusion").sampler == "ddpm"
    assert SamplerSettings().for_objective("flow").sampler == "sde"
    heun = SamplerSettings(sampler="heun")
    assert heun.for_objective("flow") is heun
    with pytest.raises(SamplerMismatchError, match=r"objective=flow.*use sampler=euler\|heun\|sde\|dopri5"):
        SamplerSettings(sampler="ddpm").for_objective("flow")
    with pytest.raises(SamplerMismatchError, match=r"objective=diffusion.*use sampler=ddpm\|ddim\|dpm\+\+"):
        heun.for_objective("diffusion")
    model, noise = tiny_dit(), torch.randn(2, 4, 8, 8)
    with pytest.raises(SamplerMismatchError, match="flow"):
        sample_latents(model, FlowMatching(), torch.tensor([0, 1]), SamplerSettings(sampler="ddim"), noise=noise)
    # flow-only knobs are refused on diffusion samplers, diffusion time on flow samplers
    with pytest.raises(ValueError, match="shift=3.0 is a flow sampler's timestep shift"):
        SamplerSettings(sampler="ddpm", shift=3.0).check()
    with pytest.raises(ValueError, match="flow time with 0 <= lo <= hi <= 1"):
        SamplerSettings(sampler="euler", guidance_interval=[100, 700]).check()
    with pytest.raises(ValueError, match="no x0 to clip"):
        SamplerSettings(sampler="heun", clip_denoised=True).check()
    # a diffusion record holds no flow knobs (as before); a flow record holds them and its NFE
    assert "shift" not in SamplerSettings(sampler="ddpm").to_dict()
    assert SamplerSettings(sampler="heun", num_steps=7).to_dict()["nfe"] == 14


# ------------------------------------------------------------------------------ time conventions

MU, STD = 0.7, 0.3  # Gaussian data N(MU, STD^2) in every dimension


def optimal_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The optimal linear-path velocity in our time (t = 1 noise) for N(MU, STD^2) data. With
    x_t = (1 - t) x0 + t eps, x_t ~ N(m, v): m = (1 - t) MU, v = (1 - t)^2 STD^2 + t^2, and the flow
    is the affine map x_t = m + sqrt(v) z, so v(x, t) = m' + (d sqrt(v) / dt) / sqrt(v) (x - m)
    = -MU + (t - (1 - t) STD^2) / v (x - m)."""
    t = t.double().reshape(-1, *([1] * (x.ndim - 1)))
    var = (1 - t) ** 2 * STD**2 + t**2
    return (-MU + (t - (1 - t) * STD**2) / var * (x.double() - (1 - t) * MU)).to(x.dtype)


def sit_network(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The same field as a network trained in SiT's convention: its time s = 1 - t (s = 1 data)
    and its velocity d x / ds = x0 - eps, the negative of ours."""
    return -optimal_velocity(x, 1 - s)


def _standard_noise(n: int, d: int = 4) -> torch.Tensor:
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)  # exactly mean 0, std 1: the sampler's error is all that is left


def test_a_sit_convention_network_samples_the_right_distribution_and_a_wrong_conversion_does_not():
    noise = _standard_noise(4000)
    heun = SamplerSettings(sampler="heun", num_steps=50)
    x, nfe = flow_sample(sit_network, FlowMatching("linear", network_time=SIT_TIME), noise, heun)
    assert nfe == heun.nfe == 100
    assert abs(x.mean().item() - MU) < 1e-3 and abs(x.std(0).mean().item() - STD) < 1e-3
    # SiT's record (dit.sampling.trained.RELEASE_OBJECTIVES) builds the same conversion
    sit = trained_objective({"objective": RELEASE_OBJECTIVES["sit"]}, learn_sigma=True)
    assert sit.network_time == SIT_TIME
    assert torch.equal(flow_sample(sit_network, sit, noise, heun)[0], x)
    # the SDE reaches it too (per-sample noise), and the time shift only moves the grid
    sde = SamplerSettings(sampler="sde", num_steps=250)
    xs, nfe = flow_sample(sit_network, sit, noise, sde, generator=torch.Generator().manual_seed(1))
    assert nfe == sde.nfe == 250
    assert abs(xs.mean().item() - MU) < 2e-2 and abs(xs.std(0).mean().item() - STD) < 2e-2
    shifted = flow_sample(sit_network, sit, noise, SamplerSettings(sampler="heun", num_steps=50, shift=3.0))[0]
    assert abs(shifted.mean().item() - MU) < 1e-3
    # read as our convention (no 1 - t, no sign flip), or with only one of the two, it misses by far
    for wrong in (NetworkTime(), NetworkTime(scale=1000.0, data_at_one=True)):
        bad = flow_sample(sit_network, FlowMatching("linear", network_time=wrong), noise, heun)[0]
        assert abs(bad.mean().item() - MU) > 0.3 or abs(bad.std(0).mean().item() - STD) > 0.3

    def time_only(x, s):  # 1 - t applied, but the velocity not negated
        return optimal_velocity(x, 1 - s)

    bad = flow_sample(time_only, sit, noise, heun)[0]
    assert abs(bad.mean().item() - MU) > 0.3 or abs(bad.std(0).mean().item() - STD) > 0.3


@pytest.mark.parametrize("network_time", [NetworkTime(), SIT_TIME, NetworkTime(scale=1000.0)])
def test_guidance_interval_is_in_flow_time_whatever_the_network_receives(network_time):
    """Euler, 5 steps: the network is called at t = 1, .8, .6, .4, .2; interval [0.3, 0.7] guides
    t = .6 and .4 only (the old int(t) reading saw t = 0 for every step and never guided)."""
    model, labels, noise = tiny_dit(), torch.tensor([0, 1, 2]), torch.randn(3, 4, 8, 8)
    flow = FlowMatching("linear", network_time=network_time)
    out = []
    sample_latents(model, flow, labels, SamplerSettings(sampler="euler", num_steps=5, cfg_scale=2.0,
                                                            guidance_interval=[0.3, 0.7]),
                     noise=noise, denoiser_out=out)
    assert out[0].calls == 5 and out[0].rows == 2 * 2 * 3 + 3 * 3
    seen = []
    denoiser = GuidedDenoiser(model, labels, SamplerSettings(sampler="euler", cfg_scale=2.0), network_time)
    for t in (1.0, 0.25):
        seen.append(denoiser.step_time(network_time(torch.full((3,), t))))
    assert seen == pytest.approx([1.0, 0.25])


def test_flow_nfe_is_counted_per_sampler_and_guidance_matches_mixing_the_velocities():
    model, labels, noise = tiny_dit(), torch.tensor([0, 4]), torch.randn(2, 4, 8, 8)
    flow = FlowMatching("linear")
    for settings in (SamplerSettings(sampler="euler", num_steps=4), SamplerSettings(sampler="heun", num_steps=3),
                     SamplerSettings(sampler="sde", num_steps=5), SamplerSettings(sampler="sde", num_steps=5,
                                                                                     last_step=None)):
        out = []
        sample_latents(model, flow, labels, settings, noise=noise, denoiser_out=out,
                         generator=torch.Generator().manual_seed(0))
        assert out[0].calls == settings.nfe, settings.sampler
    out = []
    sample_latents(model, flow, labels, SamplerSettings(sampler="dopri5", cfg_scale=1.0), noise=noise,
                     denoiser_out=out)
    assert out[0].calls >= 6 and SamplerSettings(sampler="dopri5").to_dict()["nfe"] is None
    # one guided Euler step = the Euler step of uncond + s (cond - uncond) on the guided channels
    s = 2.5
    x = sample_latents(model, flow, labels, SamplerSettings(sampler="euler", num_steps=1, cfg_scale=s,
                                                                guided_channels="all"), noise=noise)
    t = torch.ones(2)
    with torch.no_grad():
        cond = model(noise, t, labels)[:, :4]
        uncond = model(noise, t, torch.full_like(labels, 5))[:, :4]
    torch.testing.assert_close(x, noise - (uncond + s * (cond - uncond)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ bulk files


def _flow_bulk(model, out, **kw):
    settings = SamplerSettings(sampler="sde", num_steps=4, cfg_scale=1.5)
    args = dict(num_samples=7, seed=3, progress=False, provenance={"checkpoint": "tiny", "objective": FLOW_RECORD})
    args.update(kw)
    return bulk_sample_with(model, FlowMatching("linear"), SquashAE(), out, settings, **args)


def test_flow_bulk_npz_is_byte_identical_for_any_rank_count_and_after_an_interruption(tmp_path):
    model = tiny_dit()
    a = _flow_bulk(model, tmp_path / "a.npz", batch_size=3)
    threads_as_ranks(2, lambda r, w, sync: _flow_bulk(model, tmp_path / "b.npz", batch_size=3, rank=r,
                                                       world_size=w, barrier=sync))

    class Killed(Exception):
        pass

    def kill(n):
        raise Killed

    with pytest.raises(Killed):
        _flow_bulk(model, tmp_path / "c.npz", batch_size=3, on_shard_written=kill)
    written = []
    threads_as_ranks(2, lambda r, w, sync: _flow_bulk(model, tmp_path / "c.npz", batch_size=3, rank=r,
                                                       world_size=w, barrier=sync, on_shard_written=written.append))
    assert sum(written) == 7 - 3
    b, c = tmp_path / "b.npz", tmp_path / "c.npz"
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert len(np.unique(np.load(a)["arr_0"])) > 50
    settings = json.loads(settings_path_for(a).read_text())
    assert settings["sampler"] == "sde" and settings["nfe"] == 4 and settings["objective"] == FLOW_RECORD
    assert settings["diffusion_form"] == "sigma" and settings["last_step_size"] == 0.04


def _flow_checkpoint(tmp_path: Path, objective=FLOW_RECORD, name: str = "flow.pt") -> Path:
    """A tiny pixel-space DiT in our checkpoint format whose training config records a flow objective."""
    from dit.io.checkpoint import save_atomic

    model = tiny_dit(in_channels=3, num_classes=5, input_size=8)
    path = tmp_path / name
    save_atomic({"model": model.state_dict(), "ema": model.state_dict(), "step": 11, "model_name": None,
                 "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
                 "config": {"objective": dict(objective)}, "format_version": 1}, path)
    return path


def test_sample_py_on_a_flow_checkpoint_defaults_to_the_sde_and_refuses_diffusion_samplers(tmp_path):
    from dit.sampling.generate import generate_bulk, generate_grid

    ckpt = _flow_checkpoint(tmp_path)
    common = [f"checkpoint={ckpt}", "device=cpu", "sampler.num_steps=3"]
    grid = generate_grid(compose_config("sample", [*common, "grid.labels=[0,1]", f"grid.out={tmp_path / 'g.png'}"]))
    settings = json.loads(settings_path_for(grid).read_text())
    assert (settings["sampler"], settings["nfe"], settings["objective"]) == ("sde", 3, FLOW_RECORD)
    assert "diffusion" not in settings
    dopri = generate_grid(compose_config("sample", [*common, "sampler=dopri5", "grid.labels=[0,1]",
                                                    f"grid.out={tmp_path / 'd.png'}"]))
    assert json.loads(settings_path_for(dopri).read_text())["nfe"] >= 6  # counted, not a formula
    provenance = {"checkpoint": str(ckpt), "step": 11, "which": "ema"}
    assert "-dopri5-rtol0.001-cfg" in default_output_name(provenance, SamplerSettings(sampler="dopri5"), seed=0)
    assert "-euler20-cfg1.5-g3-shift3-gi0.1-0.7-" in default_output_name(
        provenance, SamplerSettings(sampler="euler", num_steps=20, shift=3.0, guidance_interval=[0.1, 0.7]), seed=0)
    with pytest.raises(ConfigError, match=r"flow\.pt: unknown sampler 'ddim'.*use sampler=euler\|heun\|sde\|dopri5"):
        generate_bulk(compose_config("sample", [*common, "sampler=ddim", "mode=bulk", "bulk.num_samples=2",
                                                f"bulk.out={tmp_path / 'x.npz'}"]))
    assert not (tmp_path / "x.npz.parts").exists()
    out = generate_bulk(compose_config("sample", [*common, "sampler=heun", "mode=bulk", "bulk.num_samples=3",
                                                  "bulk.batch_size=2"]))
    assert out.name.startswith("flow-ema-step11-heun3-cfg1.5-g3-seed0-n3")
    out.unlink()
    settings_path_for(out).unlink()


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_flow_npz_as_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 sample.py` (gloo, CPU) on a flow checkpoint, SDE sampler
    (per-step noise), against one process."""
    from dit.sampling.generate import generate_bulk

    ckpt = _flow_checkpoint(tmp_path)
    common = [f"checkpoint={ckpt}", "mode=bulk", "bulk.num_samples=5", "bulk.batch_size=2", "sampler=sde",
              "sampler.num_steps=3", "seed=5", "device=cpu"]
    two = torchrun_bulk_sample(common, tmp_path / "two.npz")
    with single_thread():
        one = generate_bulk(compose_config("sample", [*common, f"bulk.out={tmp_path / 'one.npz'}"]))
    assert one.read_bytes() == two.read_bytes()


# ------------------------------------------------------------------------------ SiT's release layout


def test_sit_release_layout_loads_as_a_flow_model_whose_network_receives_one_minus_t(tmp_path, tiny_vae_dir):
    model = tiny_dit(learn_sigma=True)  # SiT's release: DiT's layout, 2C output channels
    sit = tmp_path / "SiT-XL-2-256.pt"
    torch.save(model.state_dict(), sit)  # a bare state dict, as released
    dit_file = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(model.state_dict(), dit_file)
    assert (release_family(sit), release_family(dit_file), release_family("sit-xl-2-256x256.pt")) == (
        "sit", "dit", "sit")

    loaded, _, provenance = load_for_sampling(sit, vae=str(tiny_vae_dir), num_heads=2)
    assert provenance["objective"] == RELEASE_OBJECTIVES["sit"] and "diffusion" not in provenance
    objective = trained_objective(provenance, loaded.config.learn_sigma)
    assert isinstance(objective, FlowMatching) and objective.network_time == SIT_TIME
    _, _, dit_provenance = load_for_sampling(dit_file, vae=str(tiny_vae_dir), num_heads=2)
    assert "objective" not in dit_provenance and dit_provenance["diffusion"] == RELEASE_CHAIN

    # Euler by hand in SiT's own terms: its time s = 1 - t goes in, x0 - eps comes out (first C channels)
    labels, noise = torch.tensor([1, 3]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample_latents(loaded, objective, labels, SamplerSettings(sampler="euler", num_steps=4,
                                                                         cfg_scale=1.0), noise=noise)
    x = noise.clone()
    with torch.no_grad():
        for s in (0.0, 0.25, 0.5, 0.75):  # SiT integrates s from 0 (noise) to 1 (data)
            x = x + 0.25 * model(x, torch.full((2,), s), labels)[:, :4]
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    with pytest.raises(SamplerMismatchError, match="objective=flow"):
        sample_latents(loaded, objective, labels, SamplerSettings(sampler="ddpm"), noise=noise)


def test_release_format_reads_a_renamed_sit_file_as_sit_and_a_bad_value_is_refused(tmp_path, tiny_vae_dir, compose):
    renamed = tmp_path / "my_flow_model.pt"  # SiT's weights under a name that says nothing
    torch.save(tiny_dit(learn_sigma=True).state_dict(), renamed)
    _, _, by_name = load_for_sampling(renamed, vae=str(tiny_vae_dir), num_heads=2)
    _, _, said = load_for_sampling(renamed, vae=str(tiny_vae_dir), num_heads=2, release_format="sit")
    assert "objective" not in by_name and said["objective"] == RELEASE_OBJECTIVES["sit"]
    assert release_family(tmp_path / "SiT-XL-2-256.pt", "dit") == "dit"  # said wins over the name
    assert to_sample_config(compose("sample", [f"checkpoint={renamed}", "release_format=sit"])).release_format == "sit"
    with pytest.raises(ConfigError, match="release_format='sitt'"):
        to_sample_config(compose("sample", [f"checkpoint={renamed}", "release_format=sitt"]))


# ------------------------------------------------------------------------------ scoring flow runs

# A 2-block flow DiT on 16 px toy images in pixel space, evaluated every 2 steps by the toy judge.
TRAIN = [*TINY_MODEL, "data=toy", "data.num_per_class=4", "data.image_size=16", "global_batch_size=8", "log.every=1",
         "log.samples.every=0", "optim.lr=3e-3", "ema.decay=0.5", "ckpt.every=2", "ckpt.keep_last=null", "name=f",
         "objective=flow"]
SAMPLING = {"sampler": "euler", "num_steps": 4, "cfg_scale": 2.0}


@pytest.mark.slow
def test_eval_every_on_a_flow_run_equals_eval_fid_on_its_checkpoint(tmp_path):
    from dit.cli.eval_fid import generate_and_evaluate
    from dit.io.npz import write_samples_npz
    from dit.data.toy import make_toy_arrays
    from dit.train import run_training

    from conftest import train_config

    images, _ = make_toy_arrays(10, image_size=16, seed=1)
    ref = write_samples_npz(tmp_path / "real16.npz", images)
    cache = tmp_path / "cache"
    keys = ["eval.every=2", "eval.num_samples=20", "eval.batch_size=10", "eval.labels=balanced",
            "eval.feature_extractor=toy_judge", f"eval.reference={ref}", f"eval.cache_dir={cache}", "eval.metrics=[fid]",
            *(f"eval.{k}={v}" for k, v in SAMPLING.items())]
    run = tmp_path / "run"
    with single_thread():
        run_training(train_config([*TRAIN, "max_steps=2", *keys]), run)
        line = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/fid" in x][0]
        cfg = compose_config("eval", [
            f"checkpoint={run / 'checkpoints' / '0000002.pt'}", f"reference={ref}", "feature_extractor=toy_judge",
            "metrics=[fid]", f"cache_dir={cache}", "device=cpu", "results_table=null", "sampler=euler",
            "sampler.num_steps=4", "bulk.cfg_scale=2.0", "bulk.num_samples=20", "bulk.batch_size=10",
            "bulk.labels=balanced", f"bulk.out={tmp_path / 's.npz'}"])
        record = generate_and_evaluate(cfg)
    assert line["step"] == 2 and line["eval/fid"] > 0
    assert line["eval/fid"] == pytest.approx(record["metrics"]["fid"], rel=1e-6)
    assert record["sampling"]["sampler"] == "euler" and record["sampling"]["objective"]["kind"] == "flow"
    with pytest.raises(ConfigError, match="eval.sampler: unknown sampler 'ddpm'.*objective=flow"):
        run_training(train_config([*TRAIN, "max_steps=2", *keys, "eval.sampler=ddpm"]), tmp_path / "bad")
