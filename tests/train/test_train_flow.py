"""Training with `objective=flow` and the architecture options (issue 14): the default diffusion
step is the one it always was, the flow step draws its times from the step's own stream, flow
runs and every architecture option lower the loss, and a flow run with all options resumes
bitwise after kill -9. Tiny DiT, toy images in pixel space, CPU."""

import json
from pathlib import Path

import pytest
import torch
from dit.config import ConfigError, check_static
from dit.data import item_seed
from dit.diffusion import GaussianDiffusion
from dit.flow import FlowMatching
from dit.sampling.flow import sample_ode
from dit.flow.config import OBJECTIVE_KEYS, flow_from_config
from dit.models import DiT
from dit.train import run_training
from dit.train.randomness import STEP_STREAM, RandomnessSpec, step_randomness
from dit.train.report import flow_grid_images
from dit.train.step import StepInputs, StepSetup, drop_labels, train_step
from dit.train.trainer import build_model, build_objective, official_name

from conftest import (TINY_DIT, TOY_RUN_STEPS as STEPS, assert_kill9_resumes_bitwise, single_thread, tiny_dit,
                      toy_run_config as config, train_config, train_on_two_gloo_ranks)

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons: one thread everywhere

FLOW = ["objective=flow"]
ALL_OPTIONS = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.rope=true", "model.qk_norm=true",
               "model.modulation=scale_gate"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# 100 steps of batch 16 at lr 3e-3: about 1 s. Measured: linear flow 1.23 -> 0.73, GVP + cosine
# term 2.17 -> 1.79 (the direction term falls slowest), each option about 0.84 -> 0.45.
TRAIN = ["max_steps=100", "optim.lr=3e-3", "global_batch_size=16", "ckpt.every=1000"]


def assert_loss_falls(run_dir: Path, factor: float = 0.9) -> None:
    """The mean loss of the last 20 steps is below `factor` x the mean of the first 20."""
    values = losses(run_dir)
    first, last = sum(values[:20]) / 20, sum(values[-20:]) / 20
    assert last < factor * first, (first, last)


def tiny_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    c, s = TINY_DIT["in_channels"], TINY_DIT["input_size"]
    return torch.randn(n, c, s, s, generator=g), torch.randint(0, TINY_DIT["num_classes"], (n,), generator=g)


# ------------------------------------------------------------------ the default is unchanged


def test_default_objective_is_diffusion_and_its_step_is_a_direct_gaussian_diffusion_call():
    """objective=diffusion (the default): the step's times and noise are the generator's first
    draws (randint, then randn) as before, and the step's loss is GaussianDiffusion's own loss
    on them, bitwise."""
    cfg = config()
    assert cfg.objective.kind == "diffusion"
    diffusion = build_objective(cfg)
    assert isinstance(diffusion, GaussianDiffusion) and diffusion.num_timesteps == 1000
    x, y = tiny_batch()
    shape, seed, step = tuple(x.shape[1:]), 3, 5
    spec = RandomnessSpec(seed, len(x), shape, diffusion.num_timesteps, 0.1)
    r = step_randomness(spec, step, 0, 1, torch.device("cpu"))
    g = torch.Generator().manual_seed(item_seed(seed, step, STEP_STREAM))  # the old draws, written out
    t = torch.randint(0, 1000, (len(x),), generator=g)
    noise = torch.randn((len(x), *shape), generator=g)
    drop = torch.rand((len(x),), generator=g) < 0.1
    assert torch.equal(r.t, t) and torch.equal(r.noise, noise) and torch.equal(r.drop, drop)

    model = tiny_dit()
    expected = diffusion.training_losses(model, x, t, model_kwargs={"y": drop_labels(y, drop, 5)},
                                         noise=noise)["loss"].mean()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = train_step(StepSetup(model, diffusion, opt, None, num_classes=5, params=list(model.parameters())),
                         StepInputs(x, y, r))
    assert torch.equal(loss, expected.detach().float())


def test_flow_step_draws_times_first_from_the_step_generator_and_ranks_slice_the_global_batch():
    cfg = config(*FLOW, "objective.time_sampling=logit_normal", "objective.logit_mean=0.5", "objective.logit_std=0.8")
    flow = build_objective(cfg)
    assert isinstance(flow, FlowMatching) and flow.timesteps == "logit_normal"
    shape, seed, step, b = (4, 8, 8), 1, 9, 8
    spec = RandomnessSpec(seed=seed, global_batch=b, shape=shape, num_timesteps=None, drop_prob=0.1,
                          sample_t=flow.sample_t)
    kw = dict(step=step, device=torch.device("cpu"))
    whole = step_randomness(spec, rank=0, world_size=1, **kw)
    g = torch.Generator().manual_seed(item_seed(seed, step, STEP_STREAM))
    t = torch.sigmoid(0.5 + 0.8 * torch.randn(b, generator=g))  # logit-normal, written out
    noise = torch.randn((b, *shape), generator=g)
    assert whole.t.dtype == torch.float32 and torch.allclose(whole.t, t, atol=1e-7, rtol=0)
    assert torch.equal(whole.noise, noise)
    parts = [step_randomness(spec, rank=r, world_size=2, **kw) for r in range(2)]
    for r, part in enumerate(parts):  # rank r holds global rows r, r + 2, ...
        assert torch.equal(part.t, whole.t[r::2]) and torch.equal(part.noise, whole.noise[r::2])

    x, y = tiny_batch(n=b)
    model = tiny_dit()
    expected = flow.training_losses(model, x, whole.t, model_kwargs={"y": drop_labels(y, whole.drop, 5)},
                                    noise=whole.noise)["loss"].mean()
    setup = StepSetup(model, flow, torch.optim.AdamW(model.parameters()), None, num_classes=5,
                      params=list(model.parameters()))
    loss, _ = train_step(setup, StepInputs(x, y, whole))
    assert torch.equal(loss, expected.detach().float())


# ------------------------------------------------------------------ the config


def test_checkpoint_records_the_objective_and_the_options_and_never_an_official_name(tmp_path):
    cfg = config(*FLOW, *ALL_OPTIONS, "objective.path=gvp", "objective.network_time_scale=1000", "max_steps=2",
                 "log.samples.every=2", "log.samples.num_steps=3", "log.samples.num_images=4")
    with single_thread():
        result = run_training(cfg, tmp_path)
    state = torch.load(result["checkpoint"], weights_only=True)
    objective = state["config"]["objective"]
    assert tuple(objective) == OBJECTIVE_KEYS  # the keys sampling reads (contract 7), in this order
    assert objective == {"kind": "flow", "path": "gvp", "prediction": "velocity", "time_sampling": "uniform",
                         "logit_mean": 0.0, "logit_std": 1.0, "cosine_weight": 0.0, "network_time_scale": 1000.0}
    assert flow_from_config(objective).network_time.scale == 1000.0
    assert {k: state["model_config"][k] for k in ("norm", "mlp", "rope", "qk_norm", "modulation")} == {
        "norm": "rmsnorm", "mlp": "swiglu", "rope": True, "qk_norm": True, "modulation": "scale_gate"}
    assert state["model_name"] is None
    assert (tmp_path / "samples" / "0000002.png").is_file()  # the flow grid ran

    official = ["data=toy", "vae=pixel", "model=DiT-S/8", "name=o"]
    assert official_name(build_model(train_config(official), 16, 3, 10)) == "DiT-S/8"
    assert official_name(build_model(train_config([*official, "model.mlp=swiglu"]), 16, 3, 10)) is None


@pytest.mark.parametrize("override, key", [
    ("objective.kind=sde", "objective.kind"), ("objective.path=cosh", "objective.path"),
    ("objective.prediction=x0", "objective.prediction"), ("objective.time_sampling=beta", "objective.time_sampling"),
    ("objective.logit_std=0", "objective.logit_std"), ("objective.cosine_weight=-1", "objective.cosine_weight"),
    ("objective.network_time_scale=0", "objective.network_time_scale"), ("model.norm=batchnorm", "model.norm"),
    ("model.mlp=relu", "model.mlp"), ("model.modulation=film", "model.modulation"),
])
def test_bad_objective_and_option_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_static(config(*FLOW, override))


def test_cosine_loss_needs_velocity_and_rope_needs_a_head_dim_divisible_by_4():
    with pytest.raises(ConfigError, match="prediction=velocity"):
        check_static(config(*FLOW, "objective.prediction=noise", "objective.cosine_weight=1"))
    with pytest.raises(ConfigError, match="model.rope"):
        check_static(config("model.rope=true", "model.hidden_size=36", "model.num_heads=6"))  # head dim 6


def test_noise_and_score_predictions_train_away_from_the_singular_ends():
    for prediction in ("noise", "score"):
        flow = build_objective(config(*FLOW, f"objective.prediction={prediction}"))
        assert (flow.t_min, flow.t_max) == (1e-3, 1 - 1e-3)
    assert (build_objective(config(*FLOW)).t_min, build_objective(config(*FLOW)).t_max) == (0.0, 1.0)


# ------------------------------------------------------------------ the grid


def test_flow_grid_is_the_heun_ode_of_the_model_velocity():
    model = tiny_dit(in_channels=3)
    flow = FlowMatching("linear")
    labels, noise = torch.tensor([0, 1, 2]), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    class Identity:  # decode(latents) -> the latents themselves
        name = "pixel"

        @staticmethod
        def decode(x):
            return x.clamp(-1, 1)

    settings = config("log.samples.cfg_scale=1", "log.samples.num_steps=4").log.samples
    images = flow_grid_images(model, flow, Identity, labels, settings, noise=noise)
    with torch.no_grad():
        x, nfe = sample_ode(flow.velocity(lambda x, t: model(x, t, labels)), noise, num_steps=4, method="heun")
    expected = torch.clamp(127.5 * x.clamp(-1, 1) + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert nfe == 8 and images.shape == (3, 8, 8, 3) and (images == expected).all()


def test_a_flow_grid_runs_the_configured_flow_sampler_with_its_shift():
    """log.samples.sampler=euler with a shift is what the grid runs (`auto`, or a diffusion name,
    falls back to Heun, as above)."""
    model = tiny_dit(in_channels=3)
    flow = FlowMatching("linear")
    labels, noise = torch.tensor([0, 1, 2]), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    class Identity:
        name = "pixel"

        @staticmethod
        def decode(x):
            return x.clamp(-1, 1)

    settings = config("log.samples.cfg_scale=1", "log.samples.num_steps=3", "log.samples.sampler=euler",
                      "log.samples.shift=3").log.samples
    images = flow_grid_images(model, flow, Identity, labels, settings, noise=noise)
    with torch.no_grad():
        x, nfe = sample_ode(flow.velocity(lambda x, t: model(x, t, labels)), noise, num_steps=3, method="euler",
                            shift=3.0)
        plain, _ = sample_ode(flow.velocity(lambda x, t: model(x, t, labels)), noise, num_steps=3, method="euler")
    expected = torch.clamp(127.5 * x.clamp(-1, 1) + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert nfe == 3 and (images == expected).all()
    assert not torch.equal(x, plain)  # the shift matters, so the grid honoured it


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("objective", [
    ["objective.path=linear", "objective.time_sampling=logit_normal"],
    ["objective.path=gvp", "objective.time_sampling=logit_normal", "objective.cosine_weight=1"],
], ids=["linear", "gvp+cosine"])
def test_flow_training_lowers_the_loss(tmp_path, objective):
    with single_thread():
        run_training(config(*FLOW, *objective, *TRAIN), tmp_path)
    assert_loss_falls(tmp_path)


@pytest.mark.parametrize("option", [*ALL_OPTIONS, "all"])
def test_each_architecture_option_trains(tmp_path, option):
    options = ALL_OPTIONS if option == "all" else [option]
    with single_thread():
        run_training(config(*options, *TRAIN), tmp_path)
    assert_loss_falls(tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "0000100.pt", weights_only=True)
    model = DiT(**state["model_config"])
    assert model.config.options()  # rebuilt from the checkpoint with its options
    model.load_state_dict(state["ema"])


@pytest.mark.slow
def test_flow_with_every_option_resumes_bitwise_after_kill9(tmp_path):
    common = [*FLOW, *ALL_OPTIONS, "objective.time_sampling=logit_normal", "objective.cosine_weight=1",
              f"max_steps={STEPS}", "ckpt.every=3", "ckpt.keep_last=1"]
    assert_kill9_resumes_bitwise(config, common, tmp_path)


@pytest.mark.slow
def test_two_gloo_ranks_train_flow_as_one_process(tmp_path):
    common = [*FLOW, "objective.time_sampling=logit_normal", "max_steps=3", "ckpt.every=1000"]
    with single_thread():
        single = torch.load(run_training(config(*common), tmp_path / "one")["checkpoint"], weights_only=True)
    two = train_on_two_gloo_ranks(config(*common), tmp_path / "two", step=3)
    for part in ("model", "ema"):
        for key, ref in single[part].items():
            rel = (two[part][key] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert rel <= 1e-6, f"{part}.{key}: {rel:.2e}"
    assert single["model"]["final_layer.linear.weight"].abs().max() > 0
