"""Train a DiT. The same command runs as one process or under torchrun / SLURM:

    python train.py model=DiT-S/2 data=toy vae=pixel                          # one process
    torchrun --nproc_per_node=8 train.py experiment=DiT-XL-2-256 data.root=...  # one node
    python train.py -m hydra/launcher=slurm hydra.launcher.nodes=4 experiment=DiT-XL-2-256 ...

Relaunching a command continues its run from the newest checkpoint in its run directory
(outputs/<name>). The options, their defaults and the recipes: docs/training.md, dit/config/schema.py
and conf/.
"""

# First thing, before torch and the library are imported (seconds): a preemption signal from here
# on exits with status 75, the requeue status, not the signal's own 143 / 138 (dit/preemption.py).
from dit.preemption import guard_start_up

if __name__ == "__main__":
    guard_start_up()

# The program lives in dit/cli/train.py (also the installed console script); this file keeps
# `python train.py ...` working in a checkout.
from dit.cli.train import main, run  # noqa: E402, F401  (main: hydra's entry, importable as before)

if __name__ == "__main__":
    run()
