"""Sample from a DiT checkpoint: a PNG grid, or N images to an ADM `.npz` for FID.

    python sample.py checkpoint=outputs/quickstart                        # grid: a row per class, cfg 4.0
    python sample.py checkpoint=DiT-XL-2-256x256.pt grid.labels=[207,360,387,974,88,979,417,279]  # DiT's demo
    torchrun --nproc_per_node=8 sample.py checkpoint=... mode=bulk        # FID-50K protocol
    python sample.py checkpoint=... mode=bulk sampler=dpm++ sampler.num_steps=20 bulk.num_samples=5000
    python sample.py checkpoint=... vae=sd-mse                            # or vae=/path/to/vae_dir

Every option, its type and its default: dit/config/sample.py (SampleConfig); conf/sample.yaml
chooses the groups. The work is done by dit/sampling/generate.py.
"""

# The program lives in dit/cli/sample.py (also the installed console script); this file keeps
# `python sample.py ...` working in a checkout.
from dit.cli.sample import main, run  # noqa: F401  (main: hydra's entry, importable as before)

if __name__ == "__main__":
    run()
