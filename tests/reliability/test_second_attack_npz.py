"""Issue 21, item 12: an `.npz` member's header is checked against what the member holds before
numpy reads it. A header claiming 10^12 labels ended in a raw MemoryError; a 1 MB file whose
compressed `arr_1` inflates to 1 GB of labels cost 0.85 GB and was scored."""

import tracemalloc
import zipfile

import numpy as np
import pytest

from dit.io.npz import read_samples_npz, write_samples_npz
from dit.scoring.images import open_images

IMAGES = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)


def npy_header(shape, dtype) -> bytes:
    """The bytes of a version-1.0 .npy header claiming `shape` of `dtype` (no data)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def with_arr_1(path, header: bytes, data_bytes: int, compress: bool):
    """An ADM sample file whose arr_1 member is `header` followed by `data_bytes` zero bytes."""
    write_samples_npz(path, IMAGES)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        with zf.open("arr_1.npy", "w", force_zip64=True) as f:
            f.write(header)
            chunk = bytes(1 << 22)
            for start in range(0, data_bytes, len(chunk)):
                f.write(chunk[: min(len(chunk), data_bytes - start)])
    return path


@pytest.mark.parametrize("reader", [read_samples_npz, open_images])
def test_a_label_header_claiming_1e12_elements_is_refused_naming_the_member(tmp_path, reader):
    path = with_arr_1(tmp_path / "claims.npz", npy_header((6 * 10**12,), np.int64), 6 * 8, compress=False)
    with pytest.raises(ValueError, match=r"arr_1.*claims \(6000000000000,\) int64.*holds 48 bytes"):
        reader(path)


@pytest.mark.slow
def test_a_megabyte_file_inflating_to_a_gigabyte_of_labels_is_never_decompressed(tmp_path):
    n = (1 << 30) // 8  # 1 GiB of int64 labels, deflated to about 1 MB
    path = with_arr_1(tmp_path / "bomb.npz", npy_header((n,), np.int64), n * 8, compress=True)
    assert path.stat().st_size < 2 * 2**20
    for reader in (open_images, read_samples_npz):
        tracemalloc.start()
        try:
            _, labels = reader(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert labels is None  # not one label per image: not read
        assert peak < 64 * 2**20, f"{reader.__name__} allocated {peak / 2**20:.0f} MB"
