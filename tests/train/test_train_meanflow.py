"""Training with `objective=meanflow` (issue 24): the config builds a two-time DiT and the MeanFlow
objective with the paper's options and refuses what MeanFlow is not defined for; the step draws
its (t, r) pairs from the step's generator (ranks and micro-batches slice them); the loss falls;
a run resumes bitwise after kill -9 and matches on 1 process and 2 gloo ranks (and with gradient
accumulation) to 1e-5. Tiny DiT, toy images in pixel space, CPU."""

import json
from pathlib import Path

import pytest
import torch

from dit.config import ConfigError, check_static
from dit.flow import MeanFlow
from dit.flow.config import OBJECTIVE_KEYS, flow_from_config
from dit.train import run_training
from dit.train.evaluation import eval_settings
from dit.train.randomness import RandomnessSpec, step_randomness
from dit.train.step import StepInputs, StepSetup, drop_labels, micro_batches, take_over_label_dropout, train_step
from dit.train.trainer import build_model, build_objective

from conftest import (TOY_RUN_STEPS as STEPS, assert_kill9_resumes_bitwise, assert_same_parameters, single_thread,
                      tiny_dit, toy_run_config as config, train_on_two_gloo_ranks)

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise comparisons: one thread everywhere

MEANFLOW = ["objective=meanflow"]
# 100 steps of batch 16 at lr 3e-3 (test_train_flow.py's run): about 8 s on one CPU thread.
TRAIN = ["max_steps=100", "optim.lr=3e-3", "global_batch_size=16", "ckpt.every=50"]


def metric(run_dir: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if key in line]


# ------------------------------------------------------------------ the config


def test_meanflow_builds_a_two_time_dit_and_the_papers_objective():
    cfg = config(*MEANFLOW)
    check_static(cfg)
    mf = build_objective(cfg)
    assert isinstance(mf, MeanFlow)
    assert (mf.timesteps, mf.logit_mean, mf.logit_std) == ("logit_normal", -0.4, 1.0)
    o = mf.options
    assert (o.fraction_r_equals_t, o.omega, o.kappa, o.guidance_interval, o.norm_p, o.norm_eps) == (
        0.75, 1.0, 0.5, (0.0, 1.0), 1.0, 0.01)  # the official code's defaults: MF-B/4's README row
    model = build_model(cfg, 16, 3, 10)
    assert model.config.time_inputs == 2 and model.h_embedder is not None
    assert build_model(config(), 16, 3, 10).config.time_inputs == 1  # diffusion and flow: one time input
    assert build_model(config("objective=flow"), 16, 3, 10).config.time_inputs == 1
    changed = build_objective(config(*MEANFLOW, "meanflow.omega=2", "meanflow.kappa=0", "meanflow.norm_p=0.5",
                                     "meanflow.guidance_interval=[0.1,0.7]", "meanflow.fraction_r_equals_t=0.5",
                                     "objective.time_sampling=uniform"))
    assert changed.options.guidance_interval == (0.1, 0.7) and changed.options.norm_p == 0.5
    assert changed.timesteps == "uniform" and changed.options.effective_scale == 2.0
    settings = eval_settings(cfg.eval, "meanflow")  # eval.sampler=auto on a MeanFlow run
    assert (settings.sampler, settings.num_steps) == ("meanflow", 1)


@pytest.mark.parametrize("override, key", [
    ("objective.path=gvp", "objective.path"), ("objective.prediction=noise", "objective.prediction"),
    ("objective.cosine_weight=1", "objective.cosine_weight"), ("objective.logit_std=0", "objective.logit_std"),
    ("meanflow.fraction_r_equals_t=1.5", "meanflow.fraction_r_equals_t"), ("meanflow.kappa=1", "meanflow.kappa"),
    ("meanflow.norm_eps=0", "meanflow.norm_eps"), ("meanflow.guidance_interval=[0.9,0.1]", "meanflow.guidance_interval"),
    ("model.class_dropout_prob=0", "model.class_dropout_prob"),
])
def test_what_meanflow_is_not_defined_for_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_static(config(*MEANFLOW, override))
    check_static(config(*MEANFLOW, "model.class_dropout_prob=0", "meanflow.kappa=0"))  # no guidance: no null class


def test_the_checkpoint_records_the_objective_its_options_and_the_two_time_model(tmp_path):
    with single_thread():
        result = run_training(config(*MEANFLOW, "max_steps=2", "log.samples.every=2", "log.samples.num_images=4"),
                              tmp_path)
    state = torch.load(result["checkpoint"], weights_only=True)
    objective = state["config"]["objective"]
    assert tuple(objective) == OBJECTIVE_KEYS and objective["kind"] == "meanflow"
    assert state["config"]["meanflow"]["kappa"] == 0.5
    assert isinstance(flow_from_config(objective, state["config"]["meanflow"]), MeanFlow)
    assert state["model_config"]["time_inputs"] == 2 and state["model_name"] is None
    assert (tmp_path / "samples" / "0000002.png").is_file()  # the grid: one MeanFlow step


# ------------------------------------------------------------------ the step


def test_the_step_draws_time_pairs_first_from_its_generator_and_ranks_and_micro_batches_slice_them():
    mf = build_objective(config(*MEANFLOW))
    b = 8
    spec = RandomnessSpec(seed=1, global_batch=b, shape=(4, 8, 8), num_timesteps=None, drop_prob=0.1,
                          sample_t=mf.sample_t)
    kw = dict(step=9, device=torch.device("cpu"))
    whole = step_randomness(spec, rank=0, world_size=1, **kw)
    assert whole.t.shape == (b, 2) and int((whole.t[:, 0] == whole.t[:, 1]).sum()) == 6
    for r in range(2):  # rank r holds global rows r, r + 2, ...
        part = step_randomness(spec, rank=r, world_size=2, **kw)
        assert torch.equal(part.t, whole.t[r::2]) and torch.equal(part.noise, whole.noise[r::2])
    parts = list(micro_batches(torch.zeros(b, 4, 8, 8), torch.zeros(b), whole, 2))
    assert torch.equal(torch.cat([p[2].t for p in parts]), whole.t)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)
    model = tiny_dit(time_inputs=2)
    take_over_label_dropout(model)
    expected = mf.training_losses(model, x, whole.t, model_kwargs={"y": drop_labels(y, whole.drop, 5)},
                                  noise=whole.noise)["loss"].mean()
    setup = StepSetup(model, mf, torch.optim.AdamW(model.parameters()), None, num_classes=5,
                      params=list(model.parameters()))
    loss, _ = train_step(setup, StepInputs(x, y, whole))
    assert torch.equal(loss, expected.detach().float())


# ------------------------------------------------------------------ training


def test_meanflow_training_lowers_the_loss(tmp_path):
    """The logged loss is the adaptively weighted L / (L + c) (p = 1), just below 1 by design; the
    summed squared error it implies, L = c loss / (1 - loss), falls (measured: from about 1000 to
    about 520 over the 100 steps, 768 dimensions), and the EMA-free model's unweighted MeanFlow
    error on a fixed batch falls between its step-50 and step-100 checkpoints."""
    with single_thread():
        run_training(config(*MEANFLOW, *TRAIN), tmp_path)
    loss = torch.tensor(metric(tmp_path, "train/loss"), dtype=torch.float64)
    implied = 0.01 * loss / (1 - loss)
    first, last = float(implied[:20].mean()), float(implied[-20:].mean())
    print(f"MeanFlow tiny run: implied summed squared error {first:.0f} (steps 1-20) -> {last:.0f} (steps 81-100); "
          f"train/loss {float(loss[:20].mean()):.7f} -> {float(loss[-20:].mean()):.7f}")
    assert last < 0.8 * first, (first, last)
    # loss/mse: the unweighted error, a mean over the 768 dimensions, logged beside it. Per step its
    # row mean times 768 is the arithmetic mean of the rows' L, the implied figure their harmonic
    # mean (1 - loss = c mean(1/L)): never above it (to the 1 % that a float32 loss this close to 1
    # resolves of 1 - loss), and it falls the same way.
    mse = torch.tensor(metric(tmp_path, "loss/mse"), dtype=torch.float64)
    assert mse.shape == loss.shape, (mse.shape, loss.shape)
    assert bool((768 * mse >= 0.99 * implied).all()), (768 * mse / implied).min()
    assert float(mse[-20:].mean()) < 0.8 * float(mse[:20].mean())

    cfg = config(*MEANFLOW, *TRAIN)
    mf = build_objective(cfg)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(32, 3, 16, 16, generator=g) * 2 - 1
    tr = mf.sample_t(32, generator=g)
    noise, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    errors = []
    for step in (50, 100):
        state = torch.load(tmp_path / "checkpoints" / f"{step:07d}.pt", weights_only=True)
        model = build_model(cfg, 16, 3, 10)
        model.load_state_dict(state["model"])
        model.eval()
        errors.append(float(mf.training_losses(model, x0, tr, {"y": y}, noise=noise)["mse"].detach().mean()))
    assert errors[1] < errors[0], errors


@pytest.mark.slow
def test_meanflow_resumes_bitwise_after_kill9(tmp_path):
    common = [*MEANFLOW, f"max_steps={STEPS}", "ckpt.every=3", "ckpt.keep_last=1"]
    assert_kill9_resumes_bitwise(config, common, tmp_path)


@pytest.mark.slow
def test_two_gloo_ranks_and_gradient_accumulation_train_meanflow_as_one_process(tmp_path):
    common = [*MEANFLOW, "max_steps=3", "ckpt.every=1000"]
    with single_thread():
        single = torch.load(run_training(config(*common), tmp_path / "one")["checkpoint"], weights_only=True)
        accumulated = torch.load(run_training(config(*common, "optim.grad_accum_steps=2"), tmp_path / "acc")[
            "checkpoint"], weights_only=True)
    two = train_on_two_gloo_ranks(config(*common), tmp_path / "two", step=3)
    worst = {}
    for name, other in (("2 gloo ranks", two), ("2 micro-batches", accumulated)):
        assert_same_parameters(single, other)  # every tensor within 1e-5 of its norm
        worst[name] = max(float((other[p][k] - ref).norm() / ref.norm().clamp_min(1e-12))
                          for p in ("model", "ema") for k, ref in single[p].items())
    print(f"MeanFlow, largest relative parameter difference to one process after 3 steps: {worst}")


@pytest.mark.slow
def test_torchrun_fsdp2_trains_meanflow_as_one_process(tmp_path):
    """parallel=fsdp: the JVP and the guidance passes run on the sharded module itself (no
    wrapper to unwrap), the gradient-carrying forward too; 2 gloo ranks under torchrun."""
    from conftest import TINY_RUN, torchrun_train, train_single_process

    args = [*TINY_RUN, *MEANFLOW, "name=mf"]
    single = train_single_process(args, tmp_path / "one")
    torchrun_train([*args, "parallel=fsdp", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_same_parameters(single, torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True))


def test_repa_trains_with_meanflow_on_the_gradient_carrying_forward(tmp_path):
    """REPA's hook captures every forward's tokens; the MeanFlow step's last forward is the one
    with gradients (after the guidance passes and the JVP), so REPA's term aligns and trains."""
    import timm
    from timm.models import save_for_hf

    encoder = tmp_path / "encoder"
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    save_for_hf(net, encoder, model_args=args, safe_serialization=True)
    repa = ["model.hidden_size=64", f"repa.encoder={encoder}", "repa.resolution=16", "repa.depth=1",
            "repa.projector_dim=32", "repa.coeff=0.5"]
    with single_thread():
        run_training(config(*MEANFLOW, *repa, "max_steps=40", "optim.lr=3e-3", "global_batch_size=16",
                            "ckpt.every=1000"), tmp_path / "run")
    values = metric(tmp_path / "run", "loss/repa")
    print("REPA with MeanFlow, loss/repa:", [round(v, 3) for v in values[::5]], len(values))
    assert sum(values[-10:]) / 10 < sum(values[:10]) / 10 - 0.1, (values[:10], values[-10:])


def test_eval_every_on_a_meanflow_run_is_one_meanflow_step_and_equals_eval_fid_on_its_checkpoint(tmp_path):
    """eval.sampler=auto on a MeanFlow run samples one MeanFlow step; its score is eval_fid.py's on
    the checkpoint of the same step with sampler=meanflow."""
    from dit.cli.eval_fid import generate_and_evaluate
    from dit.data.toy import make_toy_arrays
    from dit.io.npz import write_samples_npz

    from conftest import compose_config

    images, _ = make_toy_arrays(10, image_size=16, seed=1)
    ref = write_samples_npz(tmp_path / "real16.npz", images)
    cache = tmp_path / "cache"
    keys = ["eval.every=2", "eval.num_samples=20", "eval.batch_size=10", "eval.labels=balanced",
            "eval.feature_extractor=toy_judge", f"eval.reference={ref}", f"eval.cache_dir={cache}", "eval.metrics=[fid]"]
    run = tmp_path / "run"
    with single_thread():
        run_training(config(*MEANFLOW, "max_steps=2", *keys), run)
        line = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/fid" in x][0]
        cfg = compose_config("eval", [
            f"checkpoint={run / 'checkpoints' / '0000002.pt'}", f"reference={ref}", "feature_extractor=toy_judge",
            "metrics=[fid]", f"cache_dir={cache}", "device=cpu", "results_table=null", "sampler=meanflow",
            "bulk.cfg_scale=1", "bulk.num_samples=20", "bulk.batch_size=10", "bulk.labels=balanced",
            f"bulk.out={tmp_path / 's.npz'}"])
        record = generate_and_evaluate(cfg)
    assert line["step"] == 2 and line["eval/fid"] > 0
    assert line["eval/fid"] == pytest.approx(record["metrics"]["fid"], rel=1e-6)
    assert record["sampling"]["sampler"] == "meanflow" and record["sampling"]["num_steps"] == 1
    assert record["sampling"]["objective"]["kind"] == "meanflow"
