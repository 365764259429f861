"""Experiments (conf/experiment/) compose with any data group: the keys only one data group has
live in conf/experiment_data/<experiment>_<data>.yaml, read when that pair is chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import train_config
from dit.config import ConfigError
from dit.toy import write_toy_imagefolder
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
