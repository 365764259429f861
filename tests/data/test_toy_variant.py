"""The shape-only toy set through the entry points: `data=toy_shapes` trains on dit.data.toy's shapes
images (and the colour set's data identity is what it was before variants, so its runs resume);
`judge_variant` / `eval.judge_variant` reach `ToyJudge.load_or_train(variant=...)`, defaulting to
the variant the model was trained on, and the metrics JSON names it; bad variants fail in one line.

The judge is never trained here: `load_or_train` is replaced by a recorder that returns an
untrained `JudgeNet` (its features are as good as any for checking which variant was asked for)."""

import json
from pathlib import Path

import pytest
import torch
from dit.io.checkpoint import save_atomic, with_checksum
from dit.config import ConfigError, check_static, to_eval_config
from dit.cli.eval_fid import evaluate_samples, resolve_judge_variant
from dit.io.npz import write_samples_npz
from dit.scoring.judge import JudgeNet, JudgeSettings, ToyJudge
from dit.sampling.loading import settings_path_for
from dit.data.toy import ToyShapesDataset, make_toy_arrays, to_model_range
from dit.train import run_training
from dit.train.evaluation import protocol
from dit.train.stream import build_data, data_identity

from conftest import TINY_RUN, compose_config, single_thread, train_config

TINY = [*TINY_RUN, "name=t"]
SHAPES_RUN = [*(a for a in TINY if a not in ("data=toy", "max_steps=3")), "data=toy_shapes", "max_steps=2"]


@pytest.fixture
def judge_calls(monkeypatch):
    """Every `ToyJudge.load_or_train` call's keyword arguments; each returns an untrained judge."""
    calls = []

    def fake(cls, cache_dir, image_size=32, seed=0, progress=True, **overrides):
        calls.append({"image_size": image_size, "seed": seed, **overrides})
        settings = JudgeSettings(image_size=image_size, seed=seed, width=4, variant=overrides.get("variant", "colours"))
        torch.manual_seed(0)
        return ToyJudge(JudgeNet(settings.width), settings)

    monkeypatch.setattr(ToyJudge, "load_or_train", classmethod(fake))
    return calls


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """2 steps of the tiny DiT on the shapes variant; its final checkpoint's path."""
    run = tmp_path_factory.mktemp("shapes") / "run"
    with single_thread():
        result = run_training(train_config(SHAPES_RUN), run)
    return run, Path(result["checkpoint"])


def test_default_toy_identity_is_the_one_from_before_variants():
    cfg = train_config(TINY)
    assert cfg.data.variant == "colours"
    d = cfg.data
    old = data_identity("toy", ToyShapesDataset(d.num_per_class, d.image_size, seed=d.seed, hflip=d.hflip),
                        num_per_class=d.num_per_class, image_size=d.image_size, seed=d.seed)  # the call before variants
    assert build_data(cfg).identity == old
    shapes = build_data(train_config(SHAPES_RUN)).identity
    assert shapes["fingerprint"] != old["fingerprint"] and shapes["classes"] != old["classes"]


def test_a_colour_run_from_before_variants_resumes(tmp_path):
    """A checkpoint whose config has no data.variant / eval.judge_variant (written before they
    existed) resumes."""
    run = tmp_path / "run"
    with single_thread():
        first = run_training(train_config([*TINY, "max_steps=2", "ckpt.every=2"]), run)
    state = torch.load(first["checkpoint"], weights_only=True)
    del state["config"]["data"]["variant"], state["config"]["eval"]["judge_variant"]  # the keys are new
    save_atomic(with_checksum({k: v for k, v in state.items() if k != "checksum"}), first["checkpoint"])
    with single_thread():
        second = run_training(train_config(TINY), run)  # max_steps=3
    assert torch.load(second["checkpoint"], weights_only=True)["step"] == 3
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == [1, 2, 3]  # continued from step 2, not started afresh


def test_data_toy_shapes_items_are_the_shapes_images_of_dit_toy():
    cfg = train_config(SHAPES_RUN)
    assert cfg.data.variant == "shapes"
    data = build_data(cfg)
    images, labels = make_toy_arrays(cfg.data.num_per_class, cfg.data.image_size, cfg.data.seed, "shapes")
    colours, _ = make_toy_arrays(cfg.data.num_per_class, cfg.data.image_size, cfg.data.seed, "colours")
    expected = to_model_range(images)
    assert len(data.dataset) == len(images) == 40
    for i in range(len(images)):
        x, y = data.dataset[i]
        assert y == labels[i]
        assert torch.equal(x, expected[i]) or torch.equal(x, expected[i].flip(-1))  # hflip is on
    assert not torch.equal(to_model_range(colours), expected)  # the variant made a difference


def test_a_toy_shapes_run_trains_records_its_variant_and_refuses_the_colour_set_on_resume(shapes_run):
    run, checkpoint = shapes_run
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 2 and state["config"]["data"]["variant"] == "shapes"
    assert state["data_identity"] == build_data(train_config(SHAPES_RUN)).identity
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    colours = [a for a in SHAPES_RUN if a not in ("data=toy_shapes", "max_steps=2")] + ["data=toy", "max_steps=3"]
    with single_thread(), pytest.raises(ConfigError, match=r"data.variant: 'shapes' -> 'colours'"):
        run_training(train_config(colours), run)


def test_a_bad_variant_is_refused_in_one_line_naming_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"data.variant='triangles'.*colours, shapes") as err:
        check_static(train_config([*TINY, "data.variant=triangles"]))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^judge_variant='stripes'.*colours, shapes") as err:
        compose_eval(tmp_path, ["judge_variant=stripes"])
    assert "\n" not in str(err.value)
    with single_thread(), pytest.raises(ConfigError, match=r"^eval.judge_variant='stripes'.*colours, shapes"):
        run_training(train_config([*TINY, *eval_keys(tmp_path), "eval.judge_variant=stripes"]), tmp_path / "r")


def eval_keys(tmp_path: Path) -> list[str]:
    ref = write_samples_npz(tmp_path / "real.npz", make_toy_arrays(2, 16, seed=1)[0])
    return ["eval.every=2", "eval.num_samples=4", "eval.batch_size=4", "eval.feature_extractor=toy_judge",
            f"eval.reference={ref}", f"eval.cache_dir={tmp_path / 'cache'}", "eval.sampler=ddim", "eval.num_steps=2"]


def compose_eval(tmp_path: Path, overrides):
    return to_eval_config(compose_config("eval", [f"reference={tmp_path / 'real.npz'}", *overrides]))


@pytest.mark.parametrize("data, given, expected", [("data=toy_shapes", None, "shapes"), ("data=toy", None, "colours"),
                                                   ("data=toy_shapes", "colours", "colours")])
def test_eval_every_uses_the_runs_toy_variant_unless_judge_variant_is_given(tmp_path, judge_calls, data, given,
                                                                            expected):
    args = [*(a for a in TINY if a not in ("data=toy", "max_steps=3")), data, "max_steps=2", *eval_keys(tmp_path)]
    if given is not None:
        args.append(f"eval.judge_variant={given}")
    with single_thread():
        run_training(train_config(args), tmp_path / "run")
    assert judge_calls and {c["variant"] for c in judge_calls} == {expected}
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval/fid" in line]
    assert [line["step"] for line in evals] == [2]


def test_the_eval_protocol_names_the_judge_variant_only_when_it_is_not_the_colour_judge(tmp_path):
    cfg = train_config([*TINY, *eval_keys(tmp_path)]).eval
    assert "judge_variant" not in protocol(cfg)  # best.json files from before variants still match
    cfg.judge_variant = "shapes"
    assert protocol(cfg)["judge_variant"] == "shapes"


def test_eval_fid_judge_variant_defaults_to_the_checkpoints_toy_variant_and_the_json_names_it(
        tmp_path, shapes_run, judge_calls):
    _, checkpoint = shapes_run
    samples = write_samples_npz(tmp_path / "samples.npz", make_toy_arrays(2, 16, seed=2, variant="shapes")[0])
    write_samples_npz(tmp_path / "real.npz", make_toy_arrays(2, 16, seed=1, variant="shapes")[0])
    base = ["feature_extractor=toy_judge", "metrics=[fid]", "results_table=null", f"cache_dir={tmp_path / 'c'}"]

    # No settings file: nothing says what the samples came from, so the colour judge (the default).
    record = evaluate_samples(compose_eval(tmp_path, base), samples)
    assert record["scoring"]["judge_variant"] == "colours" and judge_calls[-1]["variant"] == "colours"

    # sample.py's settings file names a checkpoint trained on the shapes set: its judge.
    settings_path_for(samples).write_text(json.dumps({"checkpoint": str(checkpoint), "mode": "bulk"}))
    record = evaluate_samples(compose_eval(tmp_path, base), samples)
    assert record["scoring"]["judge_variant"] == "shapes" and judge_calls[-1]["variant"] == "shapes"
    assert "shapes" in record["feature_extractor"]
    written = json.loads((tmp_path / "samples.toy_judge.metrics.json").read_text())
    assert written["scoring"]["judge_variant"] == "shapes"

    # Given, it wins; checkpoint= (generate first) is read the same way.
    record = evaluate_samples(compose_eval(tmp_path, [*base, "judge_variant=colours"]), samples)
    assert record["scoring"]["judge_variant"] == "colours" and judge_calls[-1]["variant"] == "colours"
    assert resolve_judge_variant(compose_eval(tmp_path, [f"checkpoint={checkpoint}"])) == "shapes"
