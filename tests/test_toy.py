"""The toy data set (dit.toy) and its judge (dit.judge): deterministic, distinct classes,
ImageFolder round trip, and a judge that tells real classes apart and scores samples."""

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from dit.judge import JudgeSettings, ToyJudge
from dit.toy import (CLASS_NAMES, NUM_CLASSES, ToyShapesDataset, class_rng, make_toy_arrays, render,
                     render_batch, to_model_range, write_toy_imagefolder)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """The default judge, trained once for this module into a temporary cache."""
    return ToyJudge.load_or_train(tmp_path_factory.mktemp("judge"), image_size=32, seed=0, progress=False)


def test_same_seed_gives_identical_images_and_other_seeds_differ():
    a, la = make_toy_arrays(6, image_size=24, seed=3)
    b, lb = make_toy_arrays(6, image_size=24, seed=3)
    c, _ = make_toy_arrays(6, image_size=24, seed=4)
    assert a.dtype == np.uint8 and a.shape == (60, 24, 24, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert (a != c).mean() > 0.5  # a new seed redraws position, size, rotation and background
    # Classes are interleaved, and each class is its own stream: asking for more images per class
    # keeps the earlier ones (a prefix of the bigger set is the smaller set).
    np.testing.assert_array_equal(la, np.tile(np.arange(NUM_CLASSES), 6))
    bigger, _ = make_toy_arrays(9, image_size=24, seed=3)
    np.testing.assert_array_equal(bigger[:60], a)
    # render() draws from the generator it is given, so the same generator state repeats it.
    np.testing.assert_array_equal(render(4, class_rng(3, 4), 24), render_batch(4, 1, class_rng(3, 4), 24)[0])


def test_images_have_a_shape_on_a_background():
    images, labels = make_toy_arrays(20, image_size=32, seed=0)
    for c in range(NUM_CLASSES):
        imgs = images[labels == c].astype(np.float64)
        corner = imgs[:, :2, :2].reshape(len(imgs), -1, 3).mean(1)  # (n, 3)
        brightest = imgs.reshape(len(imgs), -1, 3).max(1)  # (n, 3)
        # The shape (bright, saturated) and the dark background both appear in every image.
        assert (np.abs(brightest - corner).max(1) > 100).all(), CLASS_NAMES[c]
    with pytest.raises(ValueError, match="class_id"):
        render(NUM_CLASSES, np.random.default_rng(0))


def test_dataset_items_are_model_range_tensors_matching_the_arrays():
    ds = ToyShapesDataset(num_per_class=3, image_size=16, seed=1)
    assert len(ds) == 30 and ds.num_classes == 10 and ds.classes == list(CLASS_NAMES)
    x, y = ds[13]
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and isinstance(y, int) and y == 3
    assert -1.0 <= x.min() and x.max() <= 1.0
    expected = torch.from_numpy(ds.images[13]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    flipping = ToyShapesDataset(num_per_class=3, image_size=16, seed=1, hflip=True)
    torch.manual_seed(0)
    items = [flipping[13][0] for _ in range(20)]
    flipped = [torch.equal(it, expected.flip(-1)) for it in items]
    assert all(f or torch.equal(it, expected) for f, it in zip(flipped, items))
    assert 0 < sum(flipped) < 20  # both outcomes occur


def test_imagefolder_round_trip_keeps_labels_and_pixels(tmp_path):
    root = write_toy_imagefolder(tmp_path / "toy", num_per_class=2, image_size=16, seed=5)
    folder = ImageFolder(str(root))
    # Folder names sort into the toy label order, so ImageFolder's labels are the toy labels.
    assert [folder.class_to_idx[d] for d in sorted(folder.class_to_idx)] == list(range(NUM_CLASSES))
    assert [d.split("_", 1)[1] for d in folder.classes] == list(CLASS_NAMES)
    images, labels = make_toy_arrays(2, image_size=16, seed=5)
    assert len(folder) == len(images)
    for path, label in folder.samples:
        index = int(path.rsplit("/", 1)[1].split(".")[0]) * NUM_CLASSES + label
        assert labels[index] == label
        np.testing.assert_array_equal(np.asarray(folder.loader(path)), images[index])  # PNG is lossless
    assert not list(root.rglob("*.tmp"))


def test_judge_separates_real_classes(judge):
    images, labels = make_toy_arrays(30, image_size=32, seed=777)  # seeds the judge never trained on
    assert (judge.classify(images) == labels).mean() >= 0.98
    assert judge.stats["heldout_accuracy"] >= 0.98


def test_judge_cache_reloads_the_same_weights_and_rejects_bad_input(judge, tmp_path):
    cache = tmp_path / "cache"
    settings = dict(num_per_class=20, steps=20)  # a quick judge: the point is the cache, not accuracy
    first = ToyJudge.load_or_train(cache, image_size=16, seed=2, progress=False, **settings)
    files = list(cache.iterdir())
    assert [f.name for f in files] == [JudgeSettings(image_size=16, seed=2, **settings).cache_name()]
    blob = torch.load(files[0], weights_only=True)
    assert blob["settings"]["steps"] == 20
    again = ToyJudge.load_or_train(cache, image_size=16, seed=2, progress=False, **settings)
    images, _ = make_toy_arrays(2, image_size=16, seed=0)
    torch.testing.assert_close(first.logits(images), again.logits(images), rtol=0, atol=0)
    # A different seed is a different cache entry and different weights.
    other = ToyJudge.load_or_train(cache, image_size=16, seed=3, progress=False, **settings)
    assert len(list(cache.iterdir())) == 2
    assert not torch.equal(first.logits(images), other.logits(images))

    with pytest.raises(TypeError, match="uint8"):
        judge.classify(images.astype(np.float32))
    with pytest.raises(ValueError, match="channels last"):
        judge.classify(images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="image_size=16"):
        judge.classify(images)  # a 32-pixel judge given 16-pixel images


def test_judge_report_scores_real_high_and_wrong_or_noise_low(judge, judge_report):
    real, _ = make_toy_arrays(60, image_size=32, seed=100)
    other, other_labels = make_toy_arrays(60, image_size=32, seed=200)
    good = judge_report(other, other_labels, real, judge=judge)
    assert set(good) >= {"class_accuracy", "frechet_distance", "per_class_accuracy"}
    assert good["class_accuracy"] >= 0.98 and good["num_samples"] == 600

    wrong = judge_report(other, (other_labels + 1) % NUM_CLASSES, real, judge=judge)
    assert wrong["class_accuracy"] <= 0.05
    assert wrong["frechet_distance"] == pytest.approx(good["frechet_distance"])  # labels don't enter the distance

    noise = np.random.default_rng(0).integers(0, 256, size=other.shape, dtype=np.uint8)
    bad = judge_report(noise, other_labels, real, judge=judge)
    assert bad["frechet_distance"] > 50 * good["frechet_distance"]

    feats = judge.features(other)
    assert feats.dtype == np.float64 and feats.shape == (600, judge.feature_dim)
    with pytest.raises(ValueError, match="one label per sample"):
        judge_report(other, other_labels[:5], real, judge=judge)


def test_to_model_range_maps_uint8_endpoints():
    x = to_model_range(np.array([[[[0, 255, 128]]]], dtype=np.uint8))
    assert x.shape == (1, 3, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
