"""torch.hub entry points: one per official DiT size, named as `DiT_models` with `_` for `-` and `/`.

    model = torch.hub.load("<owner>/<repo>", "DiT_XL_2", pretrained=True)             # the release, 256 px
    model = torch.hub.load("<repo dir>", "DiT_B_4", source="local", pretrained="run/ckpt.pt")

`image_size` is in pixels of the KL-f8 VAE's images (latent side = image_size / 8). `pretrained`:
False (random init), True (the official release file, DiT-XL/2 at 256 or 512 only, downloaded
with torch.hub.load_state_dict_from_url and read weights-only), or a local checkpoint path
(ours, a release file or .safetensors). Other keyword arguments are `DiTConfig` fields
(e.g. `num_classes`, `learn_sigma`); `device` builds there directly ("cuda", or "meta" for
shapes only: DiT-XL/2's 675M parameters take about a minute to initialise on a busy CPU).
Models come back in eval mode.
"""

dependencies = ["torch", "timm", "safetensors"]

# Private names: torch.hub.list() shows every public callable here as an entry point.
from dit.io.checkpoint import load_dit_checkpoint as _load_dit_checkpoint  # noqa: E402
from dit.models import DiT_models as _DiT_models  # noqa: E402

# The official release files (facebookresearch/DiT): EMA state dicts of DiT-XL/2.
_RELEASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{size}x{size}.pt"
RELEASE_SIZES = (256, 512)
VAE_DOWNSAMPLE = 8  # the SD KL-f8 VAE the release was trained in


def _build(name: str, pretrained, image_size: int, device=None, **kwargs):
    import torch

    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling {VAE_DOWNSAMPLE}")
    input_size = image_size // VAE_DOWNSAMPLE
    if isinstance(pretrained, (str, bytes)) or hasattr(pretrained, "__fspath__"):
        model, _ = _load_dit_checkpoint(pretrained, model_name=name, input_size=input_size, device=device or "cpu",
                                        **kwargs)
        return model
    if pretrained is False:
        with torch.device(device or "cpu"):  # "meta": shapes only, no memory and no init time
            return _DiT_models[name](input_size=input_size, **kwargs).eval()
    if pretrained is not True:
        raise TypeError(f"pretrained must be False, True or a checkpoint path, got {pretrained!r}")
    if name != "DiT-XL/2" or image_size not in RELEASE_SIZES or kwargs:
        raise ValueError(f"released weights exist only for DiT-XL/2 at image_size 256 or 512 with the default config, "
                         f"not {name} at {image_size} {kwargs or ''}: pass pretrained=<local checkpoint>")
    state = torch.hub.load_state_dict_from_url(_RELEASE_URL.format(size=image_size), map_location="cpu",
                                               weights_only=True)
    with torch.device("meta"):  # the file's tensors become the parameters: no random init to throw away
        model = _DiT_models[name](input_size=input_size)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device or "cpu").eval()


def _entry(name: str):
    def entry(pretrained=False, image_size: int = 256, device=None, **kwargs):
        return _build(name, pretrained, image_size, device, **kwargs)

    entry.__name__ = name.replace("-", "_").replace("/", "_")
    entry.__doc__ = f"{name} (see the module docstring for `pretrained`, `image_size` and keyword arguments)."
    return entry


for _name in _DiT_models:
    globals()[_entry(_name).__name__] = _entry(_name)
del _name
