"""The training configuration: hydra groups, the typed schema, checks that run before any work,
the experiment recipe and the SLURM launcher."""


import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dit.config import (
    ConfigError,
    Parallel,
    Precision,
    WandbMode,
    check_static,
    config_mismatches,
    flatten_model_overrides,
    resolve_architecture,
    to_train_config,
)
from dit.models import DiT_models, model_arch

from conftest import REPO, compose_config

CONF = REPO / "conf"


def compose_train(overrides, return_hydra_config=False):
    return compose_config("train", overrides, return_hydra_config=return_hydra_config)


def train_config(overrides, name="test"):
    return to_train_config(compose_train(([f"name={name}"] if name else []) + list(overrides)))


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    return root


@pytest.mark.parametrize("official", list(DiT_models))
def test_every_official_model_is_a_flat_option_holding_its_official_name(official, image_root):
    cfg = train_config([f"model={official}", f"data.root={image_root}"])  # "DiT-XL/2" -> model/DiT-XL-2.yaml
    assert cfg.model.name == official
    assert resolve_architecture(cfg.model) == model_arch(official)
    assert (CONF / "model" / (official.replace("/", "-") + ".yaml")).is_file()


def test_architecture_fields_override_one_by_one(image_root):
    cfg = train_config(["model=DiT-S/2", "model.depth=6", "model.patch_size=4", f"data.root={image_root}"])
    assert resolve_architecture(cfg.model) == {"depth": 6, "hidden_size": 384, "num_heads": 6, "patch_size": 4}
    custom = train_config(["model.name=null", "model.depth=2", "model.hidden_size=64", "model.num_heads=4",
                           "model.patch_size=2", f"data.root={image_root}"])
    assert resolve_architecture(custom.model) == {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2}
    with pytest.raises(ConfigError, match="model.hidden_size"):
        resolve_architecture(train_config(["model.name=null", "model.depth=2", f"data.root={image_root}"]).model)


def test_defaults_follow_the_paper(image_root):
    cfg = train_config([f"data.root={image_root}"])
    assert cfg.model.name == "DiT-XL/2" and cfg.model.class_dropout_prob == 0.1 and cfg.model.learn_sigma
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-4, 0.0, None)
    assert cfg.ema.decay == 0.9999 and cfg.global_batch_size == 256
    assert cfg.vae.name == "sd-ema" and cfg.data.image_size == 256 and cfg.data.hflip
    assert cfg.precision is Precision.fp32 and cfg.parallel is Parallel.ddp and cfg.log.wandb.mode is WandbMode.disabled


def test_experiment_recipe_dit_xl2_256(image_root):
    cfg = train_config(["experiment=DiT-XL-2-256", f"data.root={image_root}"], name=None)
    assert cfg.name == "DiT-XL-2-256"
    assert cfg.model.name == "DiT-XL/2" and cfg.vae.name == "sd-ema" and cfg.data.kind == "imagefolder"
    assert (cfg.global_batch_size, cfg.optim.lr, cfg.optim.weight_decay, cfg.ema.decay) == (256, 1e-4, 0.0, 0.9999)
    assert cfg.data.image_size == 256 and cfg.data.hflip and cfg.max_steps == 7_000_000
    check_static(cfg)
    # The command line still chooses the data source; the recipe's settings stay.
    cache = image_root.parent / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text("{}")
    lat = train_config(["experiment=DiT-XL-2-256", "data=latents", f"data.root={cache}"])
    assert lat.data.kind == "latents" and lat.data.image_size == 256 and lat.optim.lr == 1e-4
    big = train_config(["experiment=DiT-XL-2-512", f"data.root={image_root}"])
    assert big.data.image_size == 512 and big.global_batch_size == 256 and big.max_steps == 3_000_000


def test_toy_data_with_pixels_passes_the_checks():
    cfg = train_config(["data=toy", "vae=pixel", "model=DiT-S/4"])
    assert cfg.data.kind == "toy" and cfg.vae.name == "pixel"
    check_static(cfg)


@pytest.mark.parametrize(
    "override, key",
    [("model.dept=6", "model.dept"), ("optimm.lr=1", "optimm"), ("data.roots=/x", "data.roots"),
     ("optim.lr=fast", "optim.lr"), ("precision=fp8", "precision"), ("model.depth=1.5", "model.depth")],
)
def test_wrong_key_or_type_fails_at_composition_naming_the_key(override, key, image_root):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as err:
        train_config([override, f"data.root={image_root}"])
    message = str(err.value) + str(err.value.__cause__)
    assert key in message


def test_unknown_model_fails_naming_the_choices(image_root):
    with pytest.raises(ConfigCompositionException) as err:
        train_config(["model=DiT-XXL/2", f"data.root={image_root}"])
    assert "model/DiT-XXL-2" in str(err.value) and "DiT-XL-2" in str(err.value)
    cfg = train_config(["model.name=DiT-Q/2", f"data.root={image_root}"])
    with pytest.raises(ConfigError, match=r"model\.name.*DiT-Q/2.*DiT-S/2"):
        check_static(cfg)


def test_patch_size_not_dividing_the_latent_size_fails_naming_the_keys(image_root):
    cfg = train_config(["model=DiT-S/2", "data.image_size=248", f"data.root={image_root}"])  # sd-ema: 248/8 = 31
    with pytest.raises(ConfigError, match=r"data.image_size=248.*8 x model.patch_size 2 = 16.*e\.g\. 256"):
        check_static(cfg)
    cfg = train_config(["data=toy", "vae=pixel", "model=DiT-S/8", "data.image_size=36"])
    with pytest.raises(ConfigError, match=r"data.image_size=36.*1 x model.patch_size 8 = 8"):
        check_static(cfg)


def test_missing_or_wrong_data_path_fails_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root=\.\.\."):
        train_config([])  # data=imagefolder without a root
    cfg = train_config([f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"data\.root=.*nope does not exist"):
        check_static(cfg)
    cfg = train_config(["data=latents", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.root=.*not a complete latents cache.*cache_latents"):
        check_static(cfg)
    with pytest.raises(ConfigError, match=r"vae\.name=\.\.\."):
        train_config(["vae=local", f"data.root={tmp_path}"])


def test_batch_must_split_evenly_over_ranks(image_root):
    cfg = train_config(["global_batch_size=10", f"data.root={image_root}"])
    check_static(cfg, world_size=2)
    with pytest.raises(ConfigError, match="global_batch_size=10.*4"):
        check_static(cfg, world_size=4)


def test_flatten_model_overrides_only_touches_model_values():
    args = ["train.py", "-m", "model=DiT-S/2,DiT-XL/8", "data.root=/d/DiT-S/2", "+model=DiT-B/4", "seed=1"]
    assert flatten_model_overrides(args) == [
        "train.py", "-m", "model=DiT-S-2,DiT-XL-8", "data.root=/d/DiT-S/2", "+model=DiT-B-4", "seed=1"]


def test_run_and_sweep_directories_are_flat(image_root):
    cfg = compose_train(["model=DiT-B/4", f"data.root={image_root}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.name == "DiT-B-4_imagefolder"
        assert cfg.hydra.run.dir == "outputs/DiT-B-4_imagefolder"
        # Sweep jobs (issue 13): flat directories under multirun/, named by the job's overrides.
        assert cfg.hydra.sweep.dir == "multirun"
        root = str(image_root).replace("/", "%2F")
        assert cfg.hydra.sweep.subdir == f"data.root={root},model=DiT-B-4"
    finally:
        HydraConfig.instance().cfg = None


def test_config_mismatches_ignore_resumable_keys():
    a = {"optim": {"lr": 1e-4}, "max_steps": 10, "log": {"every": 5}, "data": {"root": "/a", "image_size": 32}}
    b = {"optim": {"lr": 2e-4}, "max_steps": 20, "log": {"every": 1}, "data": {"root": "/b", "image_size": 64}}
    assert config_mismatches(a, b) == ["data.image_size: 32 -> 64", "optim.lr: 0.0001 -> 0.0002"]
    assert config_mismatches(a, a) == []


def _sbatch_text(launcher_cfg, tmp_path, monkeypatch):
    """The sbatch script submitit would submit for this launcher config (no SLURM needed): the
    parameter mapping of hydra-submitit-launcher, then submitit's own validation and rendering."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend srun exists
    params = OmegaConf.to_container(launcher_cfg, resolve=True)
    params.pop("_target_")
    params["submitit_folder"] = str(tmp_path / "submitit")
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor, executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "1")


def test_slurm_launcher_runs_one_task_per_gpu_and_requeues(image_root, tmp_path, monkeypatch):
    cfg = compose_train(["hydra/launcher=slurm", "hydra.launcher.nodes=4", "hydra.launcher.partition=gpu",
                         "experiment=DiT-XL-2-256", f"data.root={image_root}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.nodes == 4
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    launcher.name = "dit"  # ${hydra.job.name} only resolves inside a job
    launcher.submitit_folder = "unused"
    executor, sbatch = _sbatch_text(launcher, tmp_path, monkeypatch)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "#SBATCH --time=4320"):
        assert line in sbatch, line
    assert executor._executor.max_num_timeout == launcher.max_num_timeout  # requeues after a timeout


def test_local_submitit_launcher_config():
    cfg = compose_train(["hydra/launcher=local", "data=toy", "vae=pixel"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.tasks_per_node == 1


def test_training_rejects_a_bad_config_before_any_work(tmp_path):
    """`run_training` (what train.py calls) checks the config before reading data, building the
    model or writing anything: here a patch size that does not divide the image."""
    from dit.train import run_training

    cfg = train_config(["data=toy", "vae=pixel", "model=DiT-S/8", "data.image_size=36"])
    with pytest.raises(ConfigError, match=r"data.image_size=36.*model.patch_size 8"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_vae_takes_an_option_a_directory_or_a_hub_id_in_every_cli(image_root, tmp_path, compose):
    vae_dir = tmp_path / "my-vae"
    vae_dir.mkdir()
    root = f"data.root={image_root}"
    assert train_config(["vae=sd-mse", root]).vae.name == "sd-mse"
    assert train_config([f"vae={vae_dir}", root]).vae.name == str(vae_dir)  # -> vae=local vae.name=DIR
    assert train_config(["vae=stabilityai/sd-vae-ft-mse", root]).vae.name == "stabilityai/sd-vae-ft-mse"
    for name in ("sample", "eval"):
        args = ["checkpoint=x.pt", "reference=r.npz"] if name == "eval" else ["checkpoint=x.pt"]
        assert compose(name, args).vae is None  # none chosen: the checkpoint's autoencoder
        assert compose(name, [*args, "vae=sd-mse"]).vae.name == "sd-mse"
        assert compose(name, [*args, f"vae={vae_dir}"]).vae.name == str(vae_dir)
        assert compose(name, [*args, "vae=local", f"vae.name={vae_dir}"]).vae.name == str(vae_dir)
        assert compose(name, [*args, "vae=null"]).vae is None
    assert flatten_model_overrides(["vae=sd-ema,sd-mse", "vae.name=/x", "vae=pixel", "vae=null", "vae=/d"]) == [
        "vae=sd-ema,sd-mse", "vae.name=/x", "vae=pixel", "~vae", "vae=local", "vae.name=/d"]


def test_sample_and_eval_overrides_map_to_one_sampler_settings(compose):
    from dit.config import SampleMode, to_eval_config, to_sample_config
    from dit.sampling.settings import SamplerSettings

    overrides = ["checkpoint=c.pt", "sampler=ddim", "sampler.num_steps=20", "sampler.eta=0.5", "guided_channels=all",
                 "guidance_interval=[100,700]", "grid.cfg_scale=3.0", "bulk.cfg_scale=2.0", "bulk.num_samples=10",
                 "bulk.batch_size=5", "bulk.labels=balanced", "mode=bulk", "which=model", "model_name=DiT-S/2",
                 "device=cpu", "seed=4"]
    for cfg in (to_sample_config(compose("sample", overrides)),
                to_eval_config(compose("eval", [*overrides, "reference=r.npz", "metrics=[fid,kid]"]))):
        assert cfg.sampler_settings(cfg.bulk.cfg_scale) == SamplerSettings(
            sampler="ddim", num_steps=20, eta=0.5, cfg_scale=2.0, guided_channels="all", guidance_interval=[100, 700])
        assert cfg.sampler_settings(cfg.grid.cfg_scale).cfg_scale == 3.0
        assert (cfg.mode, cfg.which, cfg.model_name, cfg.device, cfg.seed) == (SampleMode.bulk, "model", "DiT-S/2", "cpu", 4)
        assert (cfg.bulk.num_samples, cfg.bulk.batch_size, cfg.bulk.labels) == (10, 5, "balanced")
    defaults = to_sample_config(compose("sample", ["checkpoint=c.pt"]))
    assert defaults.sampler_settings(defaults.bulk.cfg_scale) == SamplerSettings()  # the paper's protocol
    assert defaults.sampler_settings(defaults.grid.cfg_scale).cfg_scale == 4.0 and defaults.mode is SampleMode.grid
    assert to_eval_config(compose("eval", ["reference=r.npz"])).mode is SampleMode.bulk
    with pytest.raises(ConfigError, match="sampler settings.*unknown sampler"):
        to_sample_config(compose("sample", ["checkpoint=c.pt", "sampler.name=rk4"]))
    with pytest.raises(ConfigError, match=r"checkpoint=\.\.\."):
        to_sample_config(compose("sample", []))
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as err:
        compose("eval", ["reference=r.npz", "prc_k=three"])
    assert "prc_k" in str(err.value) + str(err.value.__cause__)


def test_log_samples_are_sampler_settings_with_grid_defaults(image_root):
    from dit.sampling.settings import SamplerSettings

    cfg = train_config([f"data.root={image_root}", "log.samples.sampler=ddim", "log.samples.eta=0.3"])
    assert isinstance(cfg.log.samples, SamplerSettings)
    assert (cfg.log.samples.cfg_scale, cfg.log.samples.num_steps, cfg.log.samples.guided_channels) == (4.0, 100, "3")
    assert (cfg.log.samples.sampler, cfg.log.samples.eta) == ("ddim", 0.3)
    bad = train_config([f"data.root={image_root}", "log.samples.guided_channels=some"])
    with pytest.raises(ConfigError, match="log.samples: guided_channels"):
        check_static(bad)


def test_a_key_added_after_a_checkpoint_was_written_counts_as_its_default_on_resume():
    """A run directory written before an option existed ran with the option's default: resuming
    it with the default is no change, with another value it is."""
    from conftest import train_config
    from dit.config import config_mismatches, schema_defaults
    from dit.train.resume import plain_config

    cfg = train_config(["data=toy", "name=t"])
    saved = plain_config(cfg)
    del saved["optim"]["warmup_steps"], saved["optim"]["schedule"]  # as an older checkpoint has it
    assert config_mismatches(saved, plain_config(cfg)) != []  # without the defaults: stranded
    assert config_mismatches(saved, plain_config(cfg), defaults=schema_defaults(cfg)) == []
    changed = train_config(["data=toy", "name=t", "optim.warmup_steps=100"])
    assert config_mismatches(saved, plain_config(changed), defaults=schema_defaults(changed)) == [
        "optim.warmup_steps: 0 -> 100"]
