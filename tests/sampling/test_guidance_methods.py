"""Issue 24: autoguidance and APG as guidance methods beside classifier-free guidance
(`guidance=cfg|autoguidance|apg`, dit/sampling/guidance.py; docs/sampling.md, "Guidance methods").

- Equations: autoguidance with the guide = the main model is the unguided sampler (cfg 1) for a
  diffusion (DDIM), a flow (Heun) and a MeanFlow (2 jumps) model; at one denoiser call it is
  D_guide + w (D - D_guide) on the guided channels, the main model's output elsewhere and outside
  the guidance interval; APG with eta 1, no clamp and no momentum is CFG (diffusion and flow).
- APG's own behaviour: with eta 0 the guided x0 moves orthogonally to the conditional x0 (per
  sample, in x0 space, through each objective's x0 conversion), the clamp caps the difference's
  norm, and the momentum is the paper's recursion across calls.
- sample.py end to end: guidance=autoguidance guide_checkpoint=<a smaller checkpoint> and
  guidance=apg are recorded in the settings JSON and the results table row, and named in the
  output file; a guide of another objective, class count or latent shape, autoguidance without a
  guide, a guide without autoguidance and APG knobs out of range are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.config import ConfigError
from dit.diffusion import create_diffusion
from dit.flow import FlowMatching, MeanFlow, NetworkTime
from dit.io.checkpoint import save_atomic, with_checksum
from dit.sampling.guidance import GuidedDenoiser, ProjectedGuidance
from dit.sampling.images import sample_latents
from dit.sampling.loading import settings_path_for
from dit.sampling.settings import SamplerSettings

from conftest import assert_one_line, run_program, single_thread, tiny_dit, toy_run_config

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


LABELS = torch.tensor([0, 3, 4])


def _noise(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# (objective, the model's config changes, the sampler's settings): one tiny model of each objective
CASES = {
    "diffusion-ddim": (lambda: create_diffusion(""), {}, dict(sampler="ddim", num_steps=4)),
    "flow-heun": (lambda: FlowMatching(), {"learn_sigma": False}, dict(sampler="heun", num_steps=3)),
    "meanflow-2": (lambda: MeanFlow(), {"learn_sigma": False, "time_inputs": 2}, dict(sampler="meanflow", num_steps=2)),
}


# ------------------------------------------------------------------------------ autoguidance


@pytest.mark.parametrize("case", list(CASES))
def test_autoguidance_with_the_main_model_as_guide_is_the_unguided_sampler(case):
    make_objective, config, sampler = CASES[case]
    model = tiny_dit(**config)
    objective, noise = make_objective(), _noise()
    plain = sample_latents(model, objective, LABELS, SamplerSettings(**sampler, cfg_scale=1.0), noise=noise)
    seen = []
    auto = sample_latents(model, objective, LABELS, SamplerSettings(**sampler, cfg_scale=2.5, guidance="autoguidance",
                                                                    guided_channels="all"),
                          noise=noise, guide=model, denoiser_out=seen)
    torch.testing.assert_close(auto, plain, rtol=0, atol=1e-6)
    (denoiser,) = seen
    assert denoiser.rows == 2 * len(LABELS) * denoiser.calls  # the guide ran at every step
    # and a weaker guide does guide: the samples move
    guide = tiny_dit(seed=7, depth=1, hidden_size=16, **config)
    other = sample_latents(model, objective, LABELS, SamplerSettings(**sampler, cfg_scale=2.5, guidance="autoguidance"),
                           noise=noise, guide=guide)
    assert (other - plain).abs().max() > 1e-3


AT_ONE_CALL = {  # (model config, network time (None: DDPM timesteps), interval, a time inside, a time outside)
    "diffusion": ({}, None, [200, 600], torch.tensor([400] * 3), torch.tensor([800] * 3)),
    "flow": ({"learn_sigma": False}, NetworkTime(scale=1000.0), [0.3, 0.7],
             torch.full((3,), 500.0), torch.full((3,), 900.0)),
    "meanflow": ({"learn_sigma": False, "time_inputs": 2}, NetworkTime(), [0.3, 0.7],
                 torch.tensor([[0.5, 0.2]] * 3), torch.tensor([[0.9, 0.2]] * 3)),
}


@pytest.mark.parametrize("kind", list(AT_ONE_CALL))
def test_autoguidance_at_one_call_is_the_guide_plus_w_times_the_difference_inside_the_interval(kind):
    config, network_time, interval, inside, outside = AT_ONE_CALL[kind]
    model, guide = tiny_dit(**config), tiny_dit(seed=3, depth=1, hidden_size=16, **config)
    x, w = _noise(), 2.5
    with torch.no_grad():
        main_in, weak_in = model(x, inside, LABELS), guide(x, inside, LABELS)
        main_out = model(x, outside, LABELS)
        for interval_ in (None, interval):
            settings = SamplerSettings(cfg_scale=w, guidance="autoguidance", guided_channels="3",
                                       guidance_interval=interval_)
            denoiser = GuidedDenoiser(model, LABELS, settings, network_time, guide=guide)
            got = denoiser(x, inside)
            expected = main_in.clone()
            expected[:, :3] = weak_in[:, :3] + w * (main_in[:, :3] - weak_in[:, :3])  # the 4th channel: the model's
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            assert denoiser.rows == 2 * len(x)
            if interval_ is not None:  # outside the interval: the model alone, one pass of B rows
                torch.testing.assert_close(denoiser(x, outside), main_out, rtol=0, atol=0)
                assert denoiser.rows == 3 * len(x)
    assert not torch.allclose(main_in[:, :3], weak_in[:, :3])  # two different models


def test_autoguidance_needs_no_null_class_and_a_guide_of_the_same_classes_and_shape():
    model = tiny_dit(class_dropout_prob=0.0)  # no null-class row: cfg cannot guide it, autoguidance can
    with pytest.raises(ValueError, match="null-class"):
        GuidedDenoiser(model, LABELS, SamplerSettings(cfg_scale=2.0))
    GuidedDenoiser(model, LABELS, SamplerSettings(cfg_scale=2.0, guidance="autoguidance"), guide=tiny_dit(seed=2))
    with pytest.raises(ValueError, match="needs a guide model"):
        GuidedDenoiser(model, LABELS, SamplerSettings(cfg_scale=2.0, guidance="autoguidance"))
    with pytest.raises(ValueError, match="it has 3 classes, the main model 5"):
        GuidedDenoiser(model, LABELS[:1], SamplerSettings(guidance="autoguidance"), guide=tiny_dit(num_classes=3))
    with pytest.raises(ValueError, match="only used by guidance=autoguidance"):
        GuidedDenoiser(tiny_dit(), LABELS, SamplerSettings(), guide=tiny_dit(seed=2))


# ------------------------------------------------------------------------------ APG


@pytest.mark.parametrize("case", ["diffusion-ddim", "flow-heun"])
@pytest.mark.parametrize("channels", ["3", "all"])
def test_apg_with_eta_1_no_clamp_and_no_momentum_is_cfg(case, channels):
    make_objective, config, sampler = CASES[case]
    model, objective, noise = tiny_dit(**config), make_objective(), _noise()
    cfg = sample_latents(model, objective, LABELS, SamplerSettings(**sampler, cfg_scale=4.0, guided_channels=channels),
                         noise=noise)
    for r in (None, float("inf")):
        apg = sample_latents(model, objective, LABELS, SamplerSettings(
            **sampler, cfg_scale=4.0, guided_channels=channels, guidance="apg", apg_eta=1.0, apg_norm_threshold=r,
            apg_momentum=0.0), noise=noise)
        torch.testing.assert_close(apg, cfg, rtol=1e-6, atol=1e-6)
    projected = sample_latents(model, objective, LABELS, SamplerSettings(
        **sampler, cfg_scale=4.0, guided_channels=channels, guidance="apg"), noise=noise)  # the default: eta 0
    assert (projected - cfg).abs().max() > 1e-3


def test_apg_update_drops_the_parallel_part_clamps_the_norm_and_runs_reverse_momentum_by_hand():
    # Two samples of shape (2, 1, 1): D_cond = (3, 4) and (0, 2); dD = (1, 1) and (2, 1).
    d_cond = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=F64).reshape(2, 2, 1, 1)
    delta = torch.tensor([[1.0, 1.0], [2.0, 1.0]], dtype=F64).reshape(2, 2, 1, 1)
    # parallel parts: (7/25)(3, 4) = (0.84, 1.12) and (2/4)(0, 2) = (0, 1)
    parallel = torch.tensor([[0.84, 1.12], [0.0, 1.0]], dtype=F64).reshape(2, 2, 1, 1)
    perp = ProjectedGuidance(eta=0.0)(d_cond, delta)
    torch.testing.assert_close(perp, delta - parallel)
    assert torch.allclose((perp * d_cond).flatten(1).sum(1), torch.zeros(2, dtype=F64), atol=1e-12)
    half = ProjectedGuidance(eta=0.5)(d_cond, delta)
    torch.testing.assert_close(half, delta - 0.5 * parallel)
    torch.testing.assert_close(ProjectedGuidance(eta=1.0)(d_cond, delta), delta)

    # the clamp: norms sqrt(2) and sqrt(5) against r = 2: only the second is scaled, to norm 2
    clamped = ProjectedGuidance(eta=1.0, norm_threshold=2.0)(d_cond, delta)
    torch.testing.assert_close(clamped[0], delta[0])
    torch.testing.assert_close(clamped[1], delta[1] * 2 / 5 ** 0.5)
    assert clamped.flatten(1).norm(dim=1).max() <= 2 + 1e-12

    # reverse momentum beta = -0.5: running_1 = d1, running_2 = d2 - 0.5 running_1, running_3 = d3 - 0.5 running_2
    apg = ProjectedGuidance(eta=1.0, momentum=-0.5)
    steps = [delta, 2 * delta + 1, -delta]
    running = None
    for d in steps:
        running = d if running is None else d + -0.5 * running
        torch.testing.assert_close(apg(d_cond, d), running)
    torch.testing.assert_close(running, -delta - 0.5 * (2 * delta + 1 - 0.5 * delta))
    # and the momentum comes before the clamp and the projection
    both = ProjectedGuidance(eta=0.0, norm_threshold=1.0, momentum=-0.5)
    both(d_cond, delta)
    run2 = 2 * delta + 1 - 0.5 * delta
    run2 = run2 * torch.clamp(1.0 / run2.flatten(1).norm(dim=1), max=1.0).reshape(2, 1, 1, 1)
    coef = (run2 * d_cond).flatten(1).sum(1) / (d_cond * d_cond).flatten(1).sum(1)
    torch.testing.assert_close(both(d_cond, 2 * delta + 1), run2 - coef.reshape(2, 1, 1, 1) * d_cond)


def _x0_diffusion(x, t, eps):
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) on DiT's linear 1000-step chain, written here."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)[t].reshape(-1, 1, 1, 1)
    return (x.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()


def _x0_flow(x, t, v):
    """x0 = x_t - t v on the linear path (t our flow time)."""
    return x.double() - t.double().reshape(-1, 1, 1, 1) * v.double()


X0_CASES = {  # (model config, objective, network time, the network's time input, its x0 written here)
    "diffusion": ({}, create_diffusion(""), None, torch.tensor([700] * 3), lambda x, t, out: _x0_diffusion(x, t, out)),
    "flow": ({"learn_sigma": False}, FlowMatching(network_time=NetworkTime(scale=1000.0)), NetworkTime(scale=1000.0),
             torch.full((3,), 600.0), lambda x, t, out: _x0_flow(x, t / 1000.0, out)),
    "sit-reversed": ({"learn_sigma": False}, FlowMatching(network_time=NetworkTime(data_at_one=True)),
                     NetworkTime(data_at_one=True), torch.full((3,), 0.25),
                     lambda x, t, out: _x0_flow(x, 1 - t, -out)),  # t_net = 1 - t, its velocity points the other way
}


@pytest.mark.parametrize("kind", list(X0_CASES))
def test_apg_with_eta_0_moves_the_guided_x0_orthogonally_to_the_conditional_x0(kind):
    config, objective, network_time, t, x0_of = X0_CASES[kind]
    model, x, w = tiny_dit(**config), _noise(), 4.0
    null = torch.full_like(LABELS, 5)
    with torch.no_grad():
        cond, uncond = model(x, t, LABELS)[:, :4], model(x, t, null)[:, :4]
        settings = SamplerSettings(cfg_scale=w, guidance="apg", apg_eta=0.0, guided_channels="all")
        guided = GuidedDenoiser(model, LABELS, settings, network_time, objective=objective)(x, t)[:, :4]
    d_cond, d_guided, d_uncond = x0_of(x, t, cond), x0_of(x, t, guided), x0_of(x, t, uncond)
    step = (d_guided - d_cond).flatten(1)
    dot = (step * d_cond.flatten(1)).sum(1)
    assert dot.abs().max() < 1e-6 * step.norm(dim=1).max() * d_cond.flatten(1).norm(dim=1).max()
    # it is CFG's x0 step with its parallel part removed
    cfg_step = ((w - 1) * (d_cond - d_uncond)).flatten(1)
    unit = d_cond.flatten(1) / d_cond.flatten(1).norm(dim=1, keepdim=True)
    expected = cfg_step - (cfg_step * unit).sum(1, keepdim=True) * unit
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert step.norm() > 1e-3


def test_apg_momentum_runs_across_the_denoiser_calls_of_one_draw():
    """The second guided call uses dD_2 + beta dD_1 (in x0 space); a new denoiser starts afresh."""
    model, objective, nt = tiny_dit(learn_sigma=False), FlowMatching(), NetworkTime()
    x, null, w, beta = _noise(), torch.full_like(LABELS, 5), 3.0, -0.5
    t1, t2 = torch.full((3,), 0.8), torch.full((3,), 0.4)
    settings = SamplerSettings(cfg_scale=w, guidance="apg", apg_eta=1.0, apg_momentum=beta, guided_channels="all")
    with torch.no_grad():
        denoiser = GuidedDenoiser(model, LABELS, settings, nt, objective=objective)
        first, second = denoiser(x, t1), denoiser(x, t2)
        fresh = GuidedDenoiser(model, LABELS, settings, nt, objective=objective)(x, t2)
        outs = {t: (model(x, t_, LABELS), model(x, t_, null)) for t, t_ in ((0.8, t1), (0.4, t2))}
    d1 = -0.8 * (outs[0.8][0] - outs[0.8][1]).double()  # dD = -t (v_cond - v_uncond) on the linear path
    d2 = -0.4 * (outs[0.4][0] - outs[0.4][1]).double()
    torch.testing.assert_close(first, (outs[0.8][0] + (w - 1) * (outs[0.8][0] - outs[0.8][1])), rtol=1e-5, atol=1e-5)
    expected = outs[0.4][0].double() + (w - 1) * (d2 + beta * d1) / -0.4
    torch.testing.assert_close(second.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh, outs[0.4][0] + (w - 1) * (outs[0.4][0] - outs[0.4][1]), rtol=1e-5, atol=1e-5)


def test_apg_knobs_are_checked_and_recorded_only_with_apg():
    for bad, match in ((dict(guidance="apg", apg_eta=1.5), "apg_eta must be in"),
                       (dict(guidance="apg", apg_eta=float("nan")), "apg_eta must be in"),
                       (dict(guidance="apg", apg_norm_threshold=0.0), "apg_norm_threshold must be > 0"),
                       (dict(guidance="apg", apg_momentum=1.0), "apg_momentum must be in"),
                       (dict(apg_eta=0.5), "APG's knobs"), (dict(guidance="pag"), "unknown guidance")):
        with pytest.raises(ValueError, match=match):
            SamplerSettings(**bad).check()
    plain = SamplerSettings().to_dict()
    assert not {"guidance", "apg_eta", "apg_norm_threshold", "apg_momentum"} & set(plain)
    record = SamplerSettings(guidance="apg", apg_norm_threshold=float("inf"), apg_momentum=-0.5).check().to_dict()
    assert (record["guidance"], record["apg_eta"], record["apg_norm_threshold"], record["apg_momentum"]) == (
        "apg", 0.0, None, -0.5)
    assert SamplerSettings(guidance="autoguidance").to_dict()["guidance"] == "autoguidance"
    assert "apg_eta" not in SamplerSettings(guidance="autoguidance").to_dict()


# ------------------------------------------------------------------------------ sample.py


def _checkpoint(path: Path, step: int = 11, seed: int = 0, objective: dict | None = None, **config) -> Path:
    """A tiny pixel-space DiT (8x8 images, 5 classes) in our checkpoint format; `objective`: the
    training config's objective record (None: diffusion)."""
    model = tiny_dit(seed=seed, **({"in_channels": 3, "num_classes": 5, "input_size": 8} | config))
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "ema": model.state_dict(), "step": step, "model_name": None,
             "model_config": model.config.to_dict(), "autoencoder": {"name": "pixel", "scale_factor": 1.0},
             "format_version": 1}
    if objective is not None:
        state["config"] = {"objective": dict(objective)}
    save_atomic(with_checksum(state), path)
    return path


FAST = ["sampler=ddim", "sampler.num_steps=3", "device=cpu", "grid.labels=[0,1,2,3]", "grid.cfg_scale=3"]


def _grid(tmp_path, capsys, monkeypatch, args) -> tuple[dict, Path, np.ndarray]:
    """sample.py's grid under its default name (outputs/samples/ of the working directory, tmp_path):
    (its settings record, the PNG, its pixels)."""
    from PIL import Image

    before = set((tmp_path / "outputs" / "samples").glob("*.png"))
    code, _, err = run_program("sample.py", [*FAST, *args], capsys, monkeypatch)
    assert code == 0, err
    (png,) = set((tmp_path / "outputs" / "samples").glob("*.png")) - before
    return json.loads(settings_path_for(png).read_text()), png, np.asarray(Image.open(png))


def test_sample_py_records_and_names_autoguidance_and_apg(tmp_path, capsys, monkeypatch):
    from dit.scoring.table import RESULTS_COLUMNS, append_results_row, results_row

    monkeypatch.chdir(tmp_path)
    main = _checkpoint(tmp_path / "main.pt")
    guide = _checkpoint(tmp_path / "small" / "checkpoints" / "0000004.pt", step=4, seed=5, depth=1, hidden_size=16)
    plain, plain_png, plain_img = _grid(tmp_path, capsys, monkeypatch, [f"checkpoint={main}"])
    auto, auto_png, auto_img = _grid(tmp_path, capsys, monkeypatch, [
        f"checkpoint={main}", "guidance=autoguidance", f"guide_checkpoint={tmp_path / 'small'}"])
    apg, apg_png, apg_img = _grid(tmp_path, capsys, monkeypatch, [
        f"checkpoint={main}", "guidance=apg", "apg_norm_threshold=5", "apg_momentum=-0.5"])

    assert not {"guidance", "guide", "apg_eta"} & set(plain)  # a cfg record is what it was
    assert plain_png.name == "main-ema-step11-ddim3-cfg3-g3-seed0.png"
    assert auto["guidance"] == "autoguidance" and "apg_eta" not in auto
    assert auto["guide"]["checkpoint"] == str(guide.resolve()) and auto["guide"]["step"] == 4
    assert (auto["guide"]["model_config"]["depth"], auto["guide"]["model_config"]["hidden_size"]) == (1, 16)
    assert auto_png.name == "main-ema-step11-ddim3-cfg3-g3-autog-small-0000004-seed0.png"
    assert (apg["guidance"], apg["apg_eta"], apg["apg_norm_threshold"], apg["apg_momentum"]) == ("apg", 0.0, 5.0, -0.5)
    assert apg_png.name == "main-ema-step11-ddim3-cfg3-g3-apg-eta0-r5-mom-0.5-seed0.png"
    assert not np.array_equal(plain_img, auto_img) and not np.array_equal(plain_img, apg_img)

    table = tmp_path / "results.csv"
    for record in (plain, auto, apg):
        append_results_row(table, results_row({"sampling": record, "scoring": {"feature_precision": "fp32",
                                                                               "pr_arithmetic": "fp32"},
                                               "metrics": {"fid": 1.0}, "time": "t", "samples": "s",
                                               "reference": "r", "feature_extractor": "inception"}))
    import csv

    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(RESULTS_COLUMNS)
    assert [r["guidance"] for r in rows] == ["cfg", "autoguidance", "apg"]
    assert [r["guide_checkpoint"] for r in rows] == ["", str(guide.resolve()), ""]
    assert [r["apg_norm_threshold"] for r in rows] == ["", "", "5"] and rows[2]["apg_momentum"] == "-0.5"

    # a bulk file records its guide, and resuming it with another guide is refused
    bulk = [f"checkpoint={main}", "mode=bulk", "bulk.num_samples=3", "bulk.batch_size=2",
            f"bulk.out={tmp_path / 'b.npz'}", "guidance=autoguidance"]
    code, _, err = run_program("sample.py", [*FAST, *bulk, f"guide_checkpoint={guide}", "bulk.keep_shards=true"],
                               capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["guide"]["checkpoint"] == str(guide.resolve())
    other = _checkpoint(tmp_path / "other.pt", seed=6, depth=1, hidden_size=16)
    code, _, err = run_program("sample.py", [*FAST, *bulk, f"guide_checkpoint={other}"], capsys, monkeypatch)
    assert_one_line(code, err, "different settings (guide)")


def test_sample_py_refuses_a_guide_that_cannot_guide_in_one_line(tmp_path, capsys, monkeypatch):
    main = _checkpoint(tmp_path / "main.pt")
    common = [*FAST, f"checkpoint={main}", f"grid.out={tmp_path / 'g.png'}"]
    guides = {
        "objective=flow": _checkpoint(tmp_path / "flow.pt", objective={"kind": "flow"}),
        "3 classes": _checkpoint(tmp_path / "three.pt", num_classes=3),
        "3x16x16": _checkpoint(tmp_path / "big.pt", input_size=16),
    }
    for says, guide in guides.items():
        code, _, err = run_program("sample.py", [*common, "guidance=autoguidance", f"guide_checkpoint={guide}"],
                                   capsys, monkeypatch)
        assert_one_line(code, err, f"guide_checkpoint={guide}", "cannot guide", says, "same data and objective")
    code, _, err = run_program("sample.py", [*common, "guidance=autoguidance"], capsys, monkeypatch)
    assert_one_line(code, err, "guidance=autoguidance needs guide_checkpoint=")
    code, _, err = run_program("sample.py", [*common, f"guide_checkpoint={main}"], capsys, monkeypatch)
    assert_one_line(code, err, "guide_checkpoint=", "set guidance=autoguidance")
    missing = tmp_path / "no.pt"
    code, _, err = run_program("sample.py", [*common, "guidance=autoguidance", f"guide_checkpoint={missing}"],
                               capsys, monkeypatch)
    assert_one_line(code, err, "guide_checkpoint=", "does not exist")
    for knob, says in (("apg_eta=2", "apg_eta must be in [0, 1]"), ("apg_norm_threshold=-1", "apg_norm_threshold"),
                       ("apg_momentum=-1", "apg_momentum must be in (-1, 1)")):
        code, _, err = run_program("sample.py", [*common, "guidance=apg", knob], capsys, monkeypatch)
        assert_one_line(code, err, says)
    code, _, err = run_program("sample.py", [*common, "apg_eta=0.5"], capsys, monkeypatch)
    assert_one_line(code, err, "apg_eta=0.5", "guidance=apg")
    assert not (tmp_path / "g.png").exists()


def test_training_refuses_autoguidance_in_its_grids_and_evaluation(tmp_path):
    from dit.config.checks import check_static
    from dit.train.evaluation import check_eval_config

    with pytest.raises(ConfigError, match="log.samples.guidance=autoguidance needs a guide model"):
        check_static(toy_run_config("log.samples.guidance=autoguidance"))
    cfg = toy_run_config("eval.every=10", "eval.guidance=autoguidance")
    with pytest.raises(ConfigError, match="eval.guidance=autoguidance needs a guide model"):
        check_eval_config(cfg.eval, "ddp", 1)
    apg = toy_run_config("log.samples.guidance=apg", "eval.guidance=apg")
    check_static(apg)
    assert apg.eval.guidance == "apg"
