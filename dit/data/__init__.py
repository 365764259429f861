"""Training data: images from an ImageFolder, or latents encoded once through the autoencoder
and cached, and the sampler that fixes (and resumes) the order in which they are seen.

    ds = ImageFolderDataset("imagenet/train", image_size=256)        # (3, 256, 256) in [-1, 1], label
    build_latent_cache("imagenet/train", build_autoencoder("sd-ema"), "cache/in256", 256,
                       fmt=CacheFormat(dtype="float32"), run=CacheRun(batch_size=64))
    ds = LatentCacheDataset("cache/in256")                           # (4, 32, 32) scaled latent, label
    sampler = DistributedResumableSampler(len(ds), world_size, rank, seed)

Every random choice for an item (its horizontal flip, its posterior noise) is a function of
(seed, epoch, index) alone, never of a global RNG or of the DataLoader worker that loads it: a
resumed run, or one with another number of workers, sees exactly the same data.

Where things are:
    images.py    ADM center crop, RGB decoding, BadImageError, ImageFolderDataset
    seeds.py     item_seed / item_generator: the per-item randomness
    sampler.py   DistributedResumableSampler: the data order across ranks, resumable mid-epoch
    latents.py   the latents cache format and its reader, LatentCacheDataset (check_compatible)
    cache.py     build_latent_cache: the cache builder (`python -m dit.cache_latents`)
    workers.py   default_num_workers: how many DataLoader workers when the config says null
The built-in toy set is dit/data/toy.py.
"""

from dit.data.cache import CacheFormat, CacheRun, build_latent_cache
from dit.data.images import (
    BadImageError,
    ImageFolderDataset,
    center_crop_arr,
    check_image_root,
    load_rgb,
    pil_to_tensor,
)
from dit.data.latents import (
    BUILD_FILE,
    CACHE_FORMAT_VERSION,
    META_FILE,
    LatentCacheDataset,
    LatentCacheMismatch,
    same_autoencoder_name,
)
from dit.data.sampler import DistributedResumableSampler
from dit.data.seeds import item_generator, item_seed

__all__ = [
    "BUILD_FILE",
    "CACHE_FORMAT_VERSION",
    "CacheFormat",
    "CacheRun",
    "META_FILE",
    "BadImageError",
    "DistributedResumableSampler",
    "ImageFolderDataset",
    "LatentCacheDataset",
    "LatentCacheMismatch",
    "build_latent_cache",
    "center_crop_arr",
    "check_image_root",
    "item_generator",
    "item_seed",
    "load_rgb",
    "pil_to_tensor",
    "same_autoencoder_name",
]
