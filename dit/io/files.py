"""Deprecated: the old home of atomic writes, `.npz` files, images and the checkpoint error types,
split by concept into dit/io/atomic.py, dit/io/npz.py, dit/io/images.py and dit/io/errors.py
(re-exported by dit/io/checkpoint.py). Kept only while modules still import it from here; import
from the new modules instead.
"""

from dit.io.atomic import (FileWriteError, RecordingFile, atomic_target, read_json_file, write_atomic,
                           write_json_atomic, write_text_atomic)
from dit.io.errors import CheckpointError, CheckpointMismatchError, CheckpointWriteError, UnsafeCheckpointError
from dit.io.images import (IMAGE_SUFFIXES, WIDE_GREY_MODES, check_images, image_files, image_to_rgb, read_image_folder,
                           save_grid, to_uint8)
from dit.io.npz import (StreamedArray, npz_array_shape, open_npz, read_images, read_npz_array, read_samples_npz,
                        write_npz_atomic, write_samples_npz)

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "CheckpointWriteError", "FileWriteError", "IMAGE_SUFFIXES",
    "RecordingFile", "StreamedArray", "UnsafeCheckpointError", "WIDE_GREY_MODES", "atomic_target", "check_images",
    "image_files", "image_to_rgb", "npz_array_shape", "open_npz", "read_image_folder", "read_images",
    "read_json_file", "read_npz_array", "read_samples_npz", "save_grid", "to_uint8", "write_atomic",
    "write_json_atomic", "write_npz_atomic", "write_samples_npz", "write_text_atomic",
]
