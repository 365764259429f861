"""Sampling: everything between a trained checkpoint and images, around one sampler interface.

    settings.py   `SamplerSettings`: how to sample (plain data and its checks; the schemas import it)
    base.py       `Sampler`: the one interface, `sample(denoiser, noise) -> (x, nfe)`, and the
                  table of sampler classes (`register_sampler`)
    diffusion.py  DDPM, DDIM, DPM-Solver++ (diffusion models, DDPM time)
    flow.py       Euler, Heun, dopri5 ODE and SiT's SDE (flow models, flow time)
    samplers.py   `build_sampler`: settings checked once, against the trained objective, into a sampler
    trained.py    what a checkpoint was trained on (the diffusion chain or the flow objective)
    guidance.py   guidance for every sampler: cfg, autoguidance (a guide model) and APG, with the
                  scale, guided channels and interval
    images.py     drawing latents and images; numbered samples batch by batch
    order.py      per-sample seeds, labels and network batches
    precision.py  the network forward's arithmetic (fp32 | tf32 | bf16)
    loading.py    a checkpoint loaded for sampling; output names and settings files
    bulk.py       N samples to an ADM .npz, split across ranks, resumable, byte-identical
    generate.py   what sample.py runs (a grid or a bulk file), from its config

Data flow of one call: `trained_objective(provenance)` -> `build_sampler(settings, objective,
autoencoder)` -> for each block of sample indices: noise and labels from the seed
(order.py) -> `GuidedDenoiser(model, labels, settings)` -> `sampler.sample(denoiser, noise)` ->
decode -> uint8. docs/design.md draws it with the training step.

This package's `__init__` imports nothing, so that `dit.config` can read the settings without
loading the samplers.
"""
