"""Experiments (conf/experiment/) compose with any data group: the keys only one data group has
live in conf/experiment_data/<experiment>_<data>.yaml, read when that pair is chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import train_config
from dit.config import ConfigError, check_static, resolve_architecture
from dit.config.checks import check_objective, check_optim_schedule, check_repa
from dit.data.toy import write_toy_imagefolder
from dit.train import run_training


def test_the_quickstart_recipe_keeps_its_toy_settings():
    cfg = train_config(["experiment=quickstart"])
    assert cfg.data.kind == "toy" and cfg.data.num_per_class == 500 and cfg.data.image_size == 16
    assert train_config(["data=toy", "name=t"]).data.num_per_class == 100  # the toy default, outside the recipe


def test_the_quickstart_recipe_trains_on_a_folder_of_images(tmp_path):
    root = write_toy_imagefolder(tmp_path / "images", num_per_class=4, image_size=16, seed=0)  # 40 images, batch 32
    overrides = ["experiment=quickstart", "data=imagefolder", f"data.root={root}", "data.image_size=16",
                 "data.hflip=false", "data.num_workers=0", "max_steps=2", "log.every=1", "log.samples.every=0"]
    cfg = train_config(overrides)
    assert cfg.data.kind == "imagefolder" and cfg.model.hidden_size == 128 and cfg.optim.lr == 2.0e-3
    result = run_training(cfg, tmp_path / "run")
    assert result["step"] == 2
    logged = [json.loads(line) for line in (Path(tmp_path / "run") / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]

    with pytest.raises(ConfigError, match="data.root"):  # the folder is still required, and named
        run_training(train_config(overrides[:2] + overrides[3:]), tmp_path / "no_root")


# ------------------------------------------------------------------------------ the paper recipes (issue 14)

PAPER_RECIPES = {
    # experiment: what makes it that paper's recipe (docs/recipes.md)
    "SiT-XL-2-256": dict(objective="flow", time_sampling="uniform", cosine_weight=0.0, repa=None, lr=1e-4,
                         batch=256, steps=7_000_000, norm="layernorm", mlp="gelu", rope=False),
    "REPA-SiT-XL-2-256": dict(objective="flow", time_sampling="uniform", cosine_weight=0.0,
                              repa="vit_base_patch14_dinov2.lvd142m", lr=1e-4, batch=256, steps=4_000_000,
                              norm="layernorm", mlp="gelu", rope=False),
    "LightningDiT-XL-2-256": dict(objective="flow", time_sampling="logit_normal", cosine_weight=1.0, repa=None,
                                  lr=2e-4, batch=1024, steps=80_000, norm="rmsnorm", mlp="swiglu", rope=True),
}


@pytest.mark.parametrize("experiment", sorted(PAPER_RECIPES))
@pytest.mark.parametrize("data", ["latents", "imagefolder"])
def test_each_paper_recipe_composes_with_both_data_groups(experiment, data, tmp_path):
    want = PAPER_RECIPES[experiment]
    cfg = train_config([f"experiment={experiment}", f"data={data}", f"data.root={tmp_path}"])
    arch = resolve_architecture(cfg.model)
    if data == "imagefolder":
        check_static(cfg)  # every static check train.py runs before reading data
    else:  # the same, less the latents cache's own checks (an empty folder is no cache)
        check_objective(cfg)
        check_repa(cfg, arch["depth"])
        check_optim_schedule(cfg)
    # The XL/2 backbone in every recipe, on SD's VAE at 256 px (a 16x16 token grid).
    assert (arch["depth"], arch["hidden_size"], arch["num_heads"], arch["patch_size"]) == (28, 1152, 16, 2)
    assert cfg.vae.name == "sd-ema" and cfg.data.image_size == 256 and cfg.name == experiment
    assert cfg.objective.kind == want["objective"] and cfg.objective.path == "linear"
    assert cfg.objective.prediction == "velocity" and cfg.objective.time_sampling == want["time_sampling"]
    assert cfg.objective.cosine_weight == want["cosine_weight"]
    assert cfg.repa.encoder == want["repa"]
    if want["repa"]:  # the paper's REPA settings for XL/2
        assert (cfg.repa.depth, cfg.repa.coeff, cfg.repa.resolution) == (8, 0.5, 224)
    assert cfg.optim.lr == pytest.approx(want["lr"]) and cfg.global_batch_size == want["batch"]
    assert cfg.max_steps == want["steps"]
    assert (cfg.model.norm, cfg.model.mlp, cfg.model.rope) == (want["norm"], want["mlp"], want["rope"])


def test_quickstart_on_the_shape_only_set_keeps_the_recipes_data_size():
    cfg = train_config(["experiment=quickstart", "data=toy_shapes"])
    assert (cfg.data.variant, cfg.data.num_per_class, cfg.data.image_size) == ("shapes", 500, 16)
    assert train_config(["experiment=quickstart"]).data.variant == "colours"
