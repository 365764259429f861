"""Issue 23, item 1: a key the schema does not have is refused by every entry point, with or
without `+`, naming the closest real key.

hydra refused `train.py experiment=quickstart max_step=100` but advised `+max_step=100`, and with
the `+` the run was accepted and trained its full 2000 steps; `+data.root=DIR` without
`data=imagefolder` trained on the toy set. Now train.py, sample.py, eval_fid.py and
`python -m dit.cache_latents` each end such a launch in one line, exit 1 ("unknown config key
max_step: ... did you mean max_steps?"), before any work and without writing anything (no run
folder). The programs' work is replaced by a stub here: a launch that got through would call it.
"""

from __future__ import annotations


import pytest

from dit.cli import cache_latents as cache_cli
from dit.cli import eval_fid as eval_cli
from dit.cli import sample as sample_cli
from dit.cli import train as train_cli
from dit.config import ConfigError

from conftest import assert_one_line, compose_config, run_program


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: hydra configures logging per job


@pytest.fixture
def work(monkeypatch) -> list:
    """Each program's work replaced by a stub that records its call: a launch that got through."""
    calls = []
    monkeypatch.setattr(train_cli, "run_training", lambda cfg, **kw: calls.append(("train", cfg)))
    monkeypatch.setattr(sample_cli, "generate", lambda cfg: calls.append(("sample", cfg)))
    monkeypatch.setattr(eval_cli, "generate_and_evaluate", lambda cfg: calls.append(("eval", cfg)))
    monkeypatch.setattr(cache_cli, "cache_latents", lambda cfg: calls.append(("cache", cfg)))
    return calls


# (program, its arguments with `{plus}` where the typo's prefix goes, what the line must name).
CASES = {
    "train.py max_step": ("train.py", ["experiment=quickstart", "{plus}max_step=100"],
                          ["max_step", "did you mean max_steps?"]),
    "train.py data.root without data=imagefolder": (
        "train.py", ["experiment=quickstart", "{plus}data.root=/data/imagenet/train"],
        ["data.root", "data=toy", "data=imagefolder", "data=latents"]),
    "train.py optim.lrr": ("train.py", ["experiment=quickstart", "{plus}optim.lrr=1e-3"],
                           ["optim.lrr", "did you mean optim.lr?"]),
    "sample.py sampler.num_step": ("sample.py", ["checkpoint=model.pt", "{plus}sampler.num_step=10"],
                                   ["sampler.num_step", "did you mean sampler.num_steps?"]),
    "sample.py grid.nrows": ("sample.py", ["checkpoint=model.pt", "{plus}grid.nrows=2"],
                             ["grid.nrows", "did you mean grid.nrow?"]),
    "eval_fid.py metric": ("eval_fid.py", ["samples=s.npz", "reference=r.npz", "{plus}metric=[fid]"],
                           ["metric", "did you mean metrics?"]),
    "eval_fid.py bulk.num_sample": ("eval_fid.py", ["checkpoint=model.pt", "reference=r.npz",
                                                    "{plus}bulk.num_sample=100"],
                                    ["bulk.num_sample", "did you mean bulk.num_samples?"]),
    "cache_latents image_sise": ("cache_latents", ["data_root=images", "out_dir=cache", "vae=pixel",
                                                   "{plus}image_sise=64"], ["image_sise", "did you mean image_size?"]),
}


@pytest.mark.parametrize("plus", ["", "+", "++"], ids=["no-plus", "plus", "plus-plus"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_unknown_key_is_refused_naming_the_closest_key(case, plus, work, tmp_path, capsys, monkeypatch):
    program, args, names = CASES[case]
    monkeypatch.chdir(tmp_path)  # where a run folder or default outputs would land
    code, out, err = run_program(program, [a.replace("{plus}", plus) for a in args], capsys, monkeypatch)
    assert_one_line(code, err, "unknown config key", *names)
    assert "To append" not in err and "use +" not in err  # not hydra's advice, which led to the silent run
    assert work == []  # refused before any work
    assert list(tmp_path.iterdir()) == []  # nothing written: no outputs/<name>/ folder


def test_the_issue_commands(work, tmp_path, capsys, monkeypatch):
    """The issue's own commands: `+max_step=100` no longer trains 2000 steps, `+data.root=DIR`
    no longer trains on the toy set; the same keys spelt right are accepted."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_program("train.py", ["experiment=quickstart", "+max_step=100"], capsys, monkeypatch)
    assert_one_line(code, err, "max_step", "did you mean max_steps?")
    code, _, err = run_program("train.py", ["experiment=quickstart", f"+data.root={tmp_path}"], capsys, monkeypatch)
    assert_one_line(code, err, "data.root", "data=imagefolder")
    assert work == [] and not (tmp_path / "outputs").exists()

    code, _, err = run_program("train.py", ["experiment=quickstart", "max_steps=100"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_program("train.py", ["experiment=quickstart", "data=imagefolder", f"data.root={tmp_path}",
                                            "name=q2"], capsys, monkeypatch)
    assert code == 0, err
    (_, first), (_, second) = work
    assert first.max_steps == 100 and second.data.root == str(tmp_path)


def test_a_sweep_with_an_unknown_key_is_refused_before_any_job(work, tmp_path, capsys, monkeypatch):
    """`-m ... +max_step=100`: refused once, before the sweep folder or any job exists."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_program("train.py", ["-m", "experiment=quickstart", "+max_step=100", "seed=1,2",
                                            f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys, monkeypatch)
    assert_one_line(code, err, "max_step", "did you mean max_steps?")
    assert work == [] and list(tmp_path.iterdir()) == []


def test_hydra_keys_stay_appendable(compose):
    """hydra's own node takes keys the schema does not list (a launcher's settings, env_set)."""
    from dit.config.keys import check_known_keys, unknown_keys

    cfg = compose("train", ["+hydra.job.env_set.DIT_TEST=1"], return_hydra_config=True)
    assert unknown_keys(cfg) == []
    check_known_keys(cfg)


@pytest.mark.parametrize("config_name, overrides", [
    ("train", []), ("train", ["experiment=quickstart"]), ("train", ["data=latents"]), ("train", ["objective=flow"]),
    ("train", ["experiment=REPA-SiT-XL-2-256"]), ("sample", []), ("sample", ["protocol=SiT-XL-2-256"]),
    ("sample", ["vae=sd-ema"]), ("eval", ["protocol=DiT-XL-2-256"]), ("cache_latents", []),
])
def test_every_shipped_config_has_only_schema_keys(config_name, overrides):
    """What conf/ composes by itself is refused nowhere: the check only catches added keys."""
    from dit.config.keys import unknown_keys

    assert unknown_keys(compose_config(config_name, overrides)) == []


def test_the_suggestions():
    """By the whole dotted key, else by its last part; only the closest."""
    from dit.config.keys import check_known_keys, suggestions

    known = ["max_steps", "optim.lr", "optim.min_lr", "optim.warmup_steps", "log.every", "ckpt.every"]
    assert suggestions("max_step", known) == ["max_steps"]
    assert suggestions("optim.lrr", known) == ["optim.lr"]
    assert suggestions("lr", known) == ["optim.lr"]
    assert suggestions("every", known) == ["log.every", "ckpt.every"]
    assert suggestions("completely_else", known) == []
    cfg = compose_config("train", ["+foo.bar=1"])
    with pytest.raises(ConfigError, match=r"unknown config key foo\.bar: .*--cfg job prints every key"):
        check_known_keys(cfg)
