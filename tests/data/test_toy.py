"""The toy data set (dit.data.toy) and its judge (dit.scoring.judge): deterministic, distinct classes,
ImageFolder round trip, and a judge that tells real classes apart and scores samples."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from dit.data import toy
from dit.scoring.judge import JudgeSettings, ToyJudge
from dit.data.toy import (CLASS_NAMES, NUM_CLASSES, ToyShapesDataset, class_rng, make_toy_arrays, render,
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


# ------------------------------------------------------------------------------ the shape-only variant


def _nearest_mean_colour_accuracy(variant: str) -> float:
    """Fit one mean colour per class on one seed's images, classify another seed's by the
    nearest class mean (Euclidean, in RGB): how far mean colour alone tells classes apart."""
    train, train_labels = make_toy_arrays(200, image_size=16, seed=11, variant=variant)
    test, test_labels = make_toy_arrays(200, image_size=16, seed=12, variant=variant)

    def colour(x):
        return x.reshape(len(x), -1, 3).astype(np.float64).mean(1)  # (N, 3)

    means = np.stack([colour(train)[train_labels == c].mean(0) for c in range(NUM_CLASSES)])
    pred = ((colour(test)[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == test_labels).mean())


def test_shape_variant_classes_are_not_told_apart_by_mean_colour():
    # 2000 test images: chance is 10 %, its standard error 0.67 %; 13 % is 4.5 of them above.
    assert _nearest_mean_colour_accuracy("shapes") <= 0.13
    # The same classifier reads the colour-coded set well: the check can see a colour cue.
    assert _nearest_mean_colour_accuracy("colours") >= 0.35


def test_shape_variant_covers_the_same_area_in_every_class():
    # SHAPE_AREAS re-measured from the signed distance functions on a fine grid ...
    grid = (np.arange(768) + 0.5) / 768 * 2 - 1
    u, v = np.meshgrid(grid, grid)
    for c in range(NUM_CLASSES):
        inside = toy._shape_sdf(c, u, v) < 0
        assert inside.mean() * 4 == pytest.approx(toy.SHAPE_AREAS[c], rel=0.01), CLASS_NAMES[c]
        assert np.hypot(u, v)[inside].max() == pytest.approx(toy.SHAPE_REACH[c], abs=0.01)
    # ... so the rendered images' bright fraction (the shape) is the same for every class.
    images, labels = make_toy_arrays(100, image_size=32, seed=3, variant="shapes")
    covered = (images.max(-1) > 0.5 * 255).reshape(len(images), -1).mean(1)  # shapes >= 0.8, background <= 0.3
    per_class = np.array([covered[labels == c].mean() for c in range(NUM_CLASSES)])
    assert per_class.max() - per_class.min() < 0.1 * per_class.mean()


def test_shape_variant_is_deterministic_by_seed_and_differs_from_the_colour_set():
    a, la = make_toy_arrays(5, image_size=16, seed=3, variant="shapes")
    b, lb = make_toy_arrays(5, image_size=16, seed=3, variant="shapes")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert (a != make_toy_arrays(5, image_size=16, seed=4, variant="shapes")[0]).mean() > 0.5
    # Not the colour set: the same seed draws the same backgrounds and positions, but the shape's
    # colour and size differ, so the shape pixels (about a quarter of the image) change.
    assert (a != make_toy_arrays(5, image_size=16, seed=3)[0]).mean() > 0.15
    ds = ToyShapesDataset(2, image_size=16, seed=3, variant="shapes")
    assert ds.classes == list(toy.SHAPE_NAMES) and ds.classes[0] == "circle"
    with pytest.raises(ValueError, match="variant"):
        make_toy_arrays(2, variant="colour")


@pytest.mark.slow
def test_each_variant_has_its_own_judge(tmp_path):
    # The colour set's judge keeps its cache name (no variant in it); the shape set's is its own file.
    assert JudgeSettings(image_size=16).cache_name() == (
        "toy_judge_16px_seed0_" + hashlib.sha1(json.dumps(
            {k: v for k, v in dataclasses.asdict(JudgeSettings(image_size=16)).items() if k != "variant"},
            sort_keys=True).encode()).hexdigest()[:10] + ".pt")
    # Judges far shorter than the defaults (a test, not a measurement): the colour one still reads
    # the colour set perfectly; the shape one reaches about 60 % on shapes (the default, 92 %).
    colour_judge = ToyJudge.load_or_train(tmp_path, image_size=16, seed=0, progress=False, steps=100,
                                          num_per_class=50)
    shape_judge = ToyJudge.load_or_train(tmp_path, image_size=16, seed=0, progress=False, variant="shapes",
                                         steps=300, num_per_class=100)
    assert len(list(tmp_path.iterdir())) == 2 and shape_judge.settings.variant == "shapes"
    images, labels = make_toy_arrays(30, image_size=16, seed=555, variant="shapes")  # 300 images
    # Trained on colours, a judge cannot read the shape set (chance: 10 %, standard error 1.7 %);
    # trained on shapes, it can.
    assert (colour_judge.classify(images) == labels).mean() <= 0.2
    assert (shape_judge.classify(images) == labels).mean() >= 0.35
