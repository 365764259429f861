"""Issue 21, item 16: a dangling symlink named like an image in an ImageFolder ended start-up in a
raw FileNotFoundError (the data identity sizes every file), even with `data.skip_bad=true`. Now
it is skipped with a warning naming it under `skip_bad`, and refused in one clear error without."""

import os

import pytest

from dit.data.images import BadImageError, ImageFolderDataset
from dit.data.toy import write_toy_imagefolder
from dit.train.stream import data_identity


@pytest.fixture
def folder_with_a_dangling_link(tmp_path):
    root = tmp_path / "images"
    write_toy_imagefolder(root, num_per_class=2, image_size=16, seed=0)
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    link = first_class / "000_gone.png"  # sorts first: the file data_identity reads of this class
    os.symlink(tmp_path / "deleted.png", link)
    return root, link


def test_skip_bad_skips_a_dangling_link_with_a_warning_naming_it(folder_with_a_dangling_link):
    root, link = folder_with_a_dangling_link
    with pytest.warns(UserWarning, match=f"{link.name}.*does not exist"):
        ds = ImageFolderDataset(root, 16, skip_bad=True)
    assert str(link) not in [p for p, _ in ds.samples] and ds.num_skipped == 1
    identity = data_identity("imagefolder", ds)  # sized and read every file: no FileNotFoundError
    assert identity["items"] == len(ds) == 20


def test_without_skip_bad_a_dangling_link_is_one_clear_error(folder_with_a_dangling_link):
    root, link = folder_with_a_dangling_link
    with pytest.raises(BadImageError, match=f"point to nothing: {link}.*skip_bad"):
        ImageFolderDataset(root, 16, skip_bad=False)
