"""Data: the device loader against a slow per-sample reference, and every source on data made here."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab import data as datasets
from normlab.config import DataConfig
from normlab.errors import ConfigError
from normlab.data.device_loader import DeviceLoader, Normalize, epoch_generator, random_crop_flip

CIFAR10_JPEG = os.environ.get("NORMLAB_CIFAR10_JPEG", str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                          "cifar10-jpeg.zip"))


def describe(settings: DataConfig) -> datasets.DataShape:
    return datasets.resolve(settings).shape


def build(settings: DataConfig, *args, **kwargs) -> datasets.Loaders:
    return datasets.build(datasets.resolve(settings), *args, **kwargs)


def data_cfg(**kwargs) -> DataConfig:
    return DataConfig(**kwargs)


# ---------------------------------------------------------------- batched augmentation

def test_crop_and_flip_match_a_per_sample_loop():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, flip=True, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # replay the same draws, one sample at a time
    offsets = torch.randint(0, 5, (2, 16, 1), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    for i in range(16):
        padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
        dy, dx = int(offsets[0, i, 0]), int(offsets[1, i, 0])
        crop = padded[:, dy:dy + 8, dx:dx + 8]
        if flips[i]:
            crop = crop.flip(2)
        assert torch.equal(out[i], crop), i
    assert len({(int(offsets[0, i]), int(offsets[1, i]), bool(flips[i])) for i in range(16)}) > 4  # per sample


def test_train_loader_shuffles_deterministically_per_epoch_and_drops_the_last_partial_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    loader = DeviceLoader(images, labels, 4, Normalize(torch.zeros(1), torch.ones(1) / 255, "cpu"), train=True,
                          augment=False, seed=1)
    assert len(loader) == 2
    epoch1 = [y.tolist() for _, y in loader.epoch(1)]
    assert epoch1 == [y.tolist() for _, y in loader.epoch(1)]
    assert epoch1 != [y.tolist() for _, y in loader.epoch(2)]
    for x, y in loader.epoch(3):
        assert torch.equal(x[:, 0, 0, 0], y.float())  # images stay with their labels; normalize is x/255·255
    assert all(len(y) == 4 for _, y in loader.epoch(1))


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_an_epoch_started_at_step_k_gives_the_whole_epochs_batches_from_k_on(shard):
    """A run resumed mid-epoch: order and augmentation as if the epoch had run from its start (the reference)."""
    images = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(40), 8, Normalize(torch.zeros(3), torch.ones(3), "cpu"), train=True,
                          padding=2, flip=True, seed=3, shard=shard)
    whole = list(loader.epoch(2))
    for k in range(len(whole) + 1):
        tail = list(loader.epoch(2, start=k))
        assert len(tail) == len(whole) - k
        assert all(torch.equal(x, wx) and torch.equal(y, wy) for (x, y), (wx, wy) in zip(tail, whole[k:]))


def test_eval_loader_keeps_order_and_every_sample():
    images = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(10), 4, Normalize(torch.zeros(1), torch.ones(1), "cpu"), train=False)
    assert [y.tolist() for _, y in loader.epoch(1)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_normalize_uses_the_training_sets_mean_and_std():
    loaders = build(data_cfg(name="synthetic", num_train=256, num_test=64, size=8, augment=False), 32,
                             torch.device("cpu"),
                             seed=0)
    x = torch.cat([x for x, _ in loaders.train.epoch(1)])
    assert x.mean().item() == pytest.approx(0.0, abs=0.05)
    assert x.std().item() == pytest.approx(1.0, abs=0.05)


def test_epoch_generator_differs_by_seed_and_epoch():
    draws = {(s, e): torch.rand(3, generator=epoch_generator(s, e, torch.device("cpu"))).tolist()
             for s in range(3) for e in range(3)}
    assert len({tuple(v) for v in draws.values()}) == 9


# ---------------------------------------------------------------- sources

def test_digits_split_is_fixed_and_stratified():
    a = datasets.SOURCES["digits"]().load(data_cfg(name="digits"))
    b = datasets.SOURCES["digits"]().load(data_cfg(name="digits"))
    assert (len(a.train_labels), len(a.test_labels)) == (1437, 360)
    assert torch.equal(a.train_images, b.train_images) and a.train_images.dtype == torch.uint8
    assert a.train_images.shape[1:] == (1, 8, 8) and int(a.train_images.max()) == 255
    assert torch.bincount(a.test_labels).min() >= 35


# ---------------------------------------------------------------- subsets

def test_train_subset_is_class_stratified_seeded_and_leaves_the_test_set_whole():
    cfg = data_cfg(name="digits", train_subset=500)
    a = build(cfg, 10, torch.device("cpu"), seed=0)
    b = build(cfg, 10, torch.device("cpu"), seed=5)  # the run seed does not move the subset
    full = datasets.SOURCES["digits"]().load(cfg)
    assert a.train.num_samples == 500 and a.test.num_samples == 360
    assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.train.images, b.train.images)
    shares = torch.bincount(full.train_labels).double() * 500 / 1437  # each class at its share, ±1
    assert ((torch.bincount(a.train.labels) - shares).abs() < 1).all()
    rows = {tuple(x.flatten().tolist()) for x in full.train_images}  # every subset image is a training image
    assert all(tuple(x.flatten().tolist()) in rows for x in a.train.images.cpu())
    other = build(data_cfg(name="digits", train_subset=500, subset_seed=1), 10, torch.device("cpu"), seed=0)
    assert not torch.equal(a.train.images, other.train.images)


def test_test_subset_and_the_described_sizes():
    cfg = data_cfg(name="digits", train_subset=100, test_subset=50)
    assert (describe(cfg).train_size, describe(cfg).test_size) == (100, 50)
    assert describe(data_cfg(name="digits")).test_size == 360  # sklearn's 1,797 digits, 20% held out
    loaders = build(cfg, 10, torch.device("cpu"), seed=0)
    assert (loaders.train.num_samples, loaders.test.num_samples) == (100, 50)
    full = datasets.SOURCES["digits"]().load(cfg).test_labels
    assert ((torch.bincount(loaders.test.labels) - torch.bincount(full) * 50 / 360).abs() < 1).all()


@pytest.mark.parametrize("setting, message", [
    (dict(train_subset=5), r"data.train_subset=5 is invalid: .* at least one image per class \(10 classes\)"),
    (dict(test_subset=0), r"data.test_subset=0 is invalid"),
    (dict(train_subset=2000), r"data.train_subset=2000 is invalid: data=digits has 1437 training images"),
    (dict(test_subset=500), r"data.test_subset=500 is invalid: data=digits has 360 test images"),
])
def test_bad_subsets_are_named(setting, message):
    with pytest.raises(ConfigError, match=message):
        describe(data_cfg(name="digits", **setting))


def write_fake_cifar10(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    """The torchvision CIFAR-10 pickle layout, with random content."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), "labels": list(range(n_train))}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({k: v for k, v in batch.items()}))
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": [3] * n_test}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar_loads_torchvisions_layout_as_uint8_nchw(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    write_fake_cifar10(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)  # our files, not the real md5s
    cfg = data_cfg(name="cifar10", root=str(tmp_path))
    assert describe(cfg).num_classes == 10
    image_set = datasets.SOURCES["cifar10"]().load(cfg)
    assert image_set.train_images.shape == (100, 3, 32, 32) and image_set.test_images.shape == (10, 3, 32, 32)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())["data"][0]
    assert torch.equal(image_set.test_images[0], torch.from_numpy(raw.reshape(3, 32, 32)))
    assert image_set.classes == [f"c{i}" for i in range(10)]


def write_image_tree(root: Path, classes=("cat", "dog", "emu"), per_class=(6, 3), size=(12, 10),
                     test_split="val") -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class[0]), (test_split, per_class[1])):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(0, 9, (size[1], size[0], 3), dtype=np.uint8)
                pixels = np.full((size[1], size[0], 3), 40 * label, dtype=np.uint8) + noise
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def zip_tree(root: Path, target: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, prefix + path.relative_to(root).as_posix())
    return target


@pytest.mark.parametrize("as_zip", [False, True])
def test_imagefolder_reads_a_tree_or_a_zip(tmp_path, as_zip):
    tree = tmp_path / "tree"
    write_image_tree(tree)
    root = zip_tree(tree, tmp_path / "tree.zip", prefix="wrapped/") if as_zip else tree
    cfg = data_cfg(name="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    assert describe(cfg) == datasets.DataShape(channels=3, size=8, num_classes=3, train_size=18,
                                                                test_size=9)
    image_set = datasets.SOURCES["imagefolder"]().load(cfg)
    assert image_set.train_images.shape == (18, 3, 8, 8) and image_set.test_images.shape == (9, 3, 8, 8)
    assert image_set.classes == ["cat", "dog", "emu"]
    assert image_set.train_labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    means = [image_set.train_images[image_set.train_labels == c].float().mean().item() for c in range(3)]
    assert means[0] < means[1] < means[2]  # each class folder's pixels went to its label
    assert list((tmp_path / "cache").glob("*.pt"))  # decoded once, cached
    again = datasets.SOURCES["imagefolder"]().load(cfg)
    assert torch.equal(again.train_images, image_set.train_images)


def test_imagefolder_picks_a_seeded_class_subset_or_a_class_list(tmp_path):
    write_image_tree(tmp_path / "t", classes=("a", "b", "c", "d", "e"), test_split="test")
    base = dict(name="imagefolder", root=str(tmp_path / "t"), image_size=8, cache_dir=str(tmp_path / "c"))
    picked = datasets.SOURCES["imagefolder"]().load(data_cfg(num_classes=3, class_seed=1, **base)).classes
    assert len(picked) == 3 and picked == sorted(picked)
    assert picked == datasets.SOURCES["imagefolder"]().load(data_cfg(num_classes=3, class_seed=1, **base)).classes
    listed = datasets.SOURCES["imagefolder"]().load(data_cfg(classes=["e", "b"], **base))
    assert listed.classes == ["e", "b"] and listed.train_labels.tolist() == [0] * 6 + [1] * 6


def test_imagefolder_default_size_is_the_first_images_shorter_side(tmp_path):
    write_image_tree(tmp_path / "t", size=(12, 10))
    assert describe(data_cfg(name="imagefolder", root=str(tmp_path / "t"))).size == 10


@pytest.mark.parametrize("setting, message", [
    ({"root": None}, r"data\.root=None is invalid: imagefolder needs data\.root.* NORMLAB_CIFAR10_JPEG=.*"
                     r"data=cifar10 data\.download=true"),
    ({"root": "/no/such/folder"}, r"data\.root='/no/such/folder' does not exist"),
    ({"classes": ["cat", "yak"]}, r"data\.classes has \['yak'\], not found"),
    ({"num_classes": 9}, r"data\.num_classes=9 is invalid: .* has 3 classes"),
])
def test_imagefolder_bad_settings_are_named(tmp_path, setting, message):
    write_image_tree(tmp_path / "t")
    cfg = data_cfg(**{"name": "imagefolder", "root": str(tmp_path / "t"), **setting})
    with pytest.raises(ConfigError, match=message):
        describe(cfg)


def test_imagefolder_without_a_test_split_is_named(tmp_path):
    write_image_tree(tmp_path / "t", test_split="holdout")
    with pytest.raises(ConfigError, match=r"holds splits \['holdout', 'train'\]; need train/ and val/ or test/"):
        describe(data_cfg(name="imagefolder", root=str(tmp_path / "t")))


def test_large_imagefolder_streams_through_a_dataloader(tmp_path):
    write_image_tree(tmp_path / "t")
    cfg = data_cfg(name="imagefolder", root=str(tmp_path / "t"), image_size=8, in_memory_max_gb=0.0,
                   loader_workers=0, eval_batch=4)
    loaders = build(cfg, 4, torch.device("cpu"), seed=0)
    assert type(loaders.train).__name__ == "StreamLoader"
    batches = list(loaders.train.epoch(1))
    assert len(batches) == len(loaders.train) == 4 and batches[0][0].shape == (4, 3, 8, 8)
    assert batches[0][0].dtype == torch.float32
    assert sum(len(y) for _, y in loaders.test.epoch(1)) == 9


@pytest.mark.parametrize("shard", [(0, 1), (1, 3)])
def test_a_streamed_epoch_is_the_same_for_any_worker_count_and_from_any_step(tmp_path, shard):
    """Each image's crop comes from its place in the epoch: 0 or 2 DataLoader workers, or an epoch started at step
    k (a run resumed mid-epoch), give the uninterrupted single-process epoch's batches."""
    write_image_tree(tmp_path / "t", per_class=(8, 2), size=(14, 11))
    loaders = {workers: build(data_cfg(name="imagefolder", root=str(tmp_path / "t"), image_size=8, in_memory_max_gb=0.0,
                                       loader_workers=workers), 6, torch.device("cpu"), seed=4, shard=shard)
               for workers in (0, 2)}
    whole = list(loaders[0].train.epoch(3))
    assert len(whole) == 4 and len({x.sum().item() for x, _ in whole}) == 4
    for workers, k in ((0, 0), (2, 0), (0, 1), (2, 3), (0, 4)):
        tail = list(loaders[workers].train.epoch(3, start=k))
        assert len(tail) == len(whole) - k
        assert all(torch.equal(x, wx) and torch.equal(y, wy) for (x, y), (wx, wy) in zip(tail, whole[k:]))
    before = torch.get_rng_state()
    list(loaders[0].train.epoch(1))
    assert torch.equal(torch.get_rng_state(), before)  # the crops' seeds leave torch's own generator alone
    assert [x.sum().item() for x, _ in loaders[0].train.epoch(1)] != [x.sum().item() for x, _ in whole]


@pytest.mark.slow
def test_the_real_cifar10_jpeg_zip(tmp_path):
    if not Path(CIFAR10_JPEG).exists():
        pytest.skip(f"the CIFAR-10 JPEG zip is not at {CIFAR10_JPEG}; set NORMLAB_CIFAR10_JPEG to its path")
    cfg = data_cfg(name="imagefolder", root=CIFAR10_JPEG, cache_dir=str(tmp_path))
    assert describe(cfg) == datasets.DataShape(channels=3, size=32, num_classes=10, train_size=50_000,
                                                                test_size=10_000)
    image_set = datasets.SOURCES["imagefolder"]().load(cfg)
    assert image_set.train_images.shape == (50_000, 3, 32, 32) and image_set.test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(image_set.train_labels).tolist() == [5000] * 10
    assert image_set.classes[:3] == ["airplane", "automobile", "bird"]
    mean, std = image_set.mean_std()
    assert mean.tolist() == pytest.approx([0.491, 0.482, 0.447], abs=0.01)  # CIFAR-10's published channel means


def test_imagefolder_cache_follows_the_files_and_ignores_archive_metadata(tmp_path):
    from normlab.data.imagefolder import cache_path, select

    write_image_tree(tmp_path / "t")
    (tmp_path / "t" / "train" / "cat" / "._0000.png").write_bytes(b"resource fork")
    cfg = data_cfg(name="imagefolder", root=str(tmp_path / "t"), image_size=8, cache_dir=str(tmp_path / "c"))
    selection = select(cfg)
    assert len(selection.files("train")[0]) == 18
    before = cache_path(cfg, selection)
    Image.new("RGB", (12, 10)).save(tmp_path / "t" / "train" / "cat" / "0099.png")
    assert cache_path(cfg, select(cfg)) != before


# ---------------------------------------------------------------- hostile or damaged image trees

def make_tree(root: Path) -> Path:
    write_image_tree(root)
    return root


def test_an_image_that_does_not_decode_names_the_tree_and_the_member(tmp_path):
    tree = make_tree(tmp_path / "t")
    bad = next((tree / "train").rglob("*.png"))
    bad.write_bytes(b"not an image")
    zipped = zip_tree(tree, tmp_path / "t.zip")
    for root in (tree, zipped):
        cfg = data_cfg(name="imagefolder", root=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ConfigError, match=rf"'train/{bad.parent.name}/{bad.name}' in data\.root=.* is not a "
                                               r"readable image \(UnidentifiedImageError"):
            datasets.SOURCES["imagefolder"]().load(cfg)


def test_a_corrupt_archive_names_the_file(tmp_path):
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04 but not really a zip")
    with pytest.raises(ConfigError, match=r"data\.root='.*broken\.zip' is not a readable zip archive \(BadZipFile"):
        describe(data_cfg(name="imagefolder", root=str(path)))


def test_a_member_that_leaves_its_folder_is_refused_by_name(tmp_path):
    tree = make_tree(tmp_path / "t")
    path = zip_tree(tree, tmp_path / "t.zip")
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("../../train/a/x.png", next((tree / "train").rglob("*.png")).read_bytes())
    with pytest.raises(ConfigError, match=r"a member whose path leaves its folder: '\.\./\.\./train/a/x\.png'"):
        describe(data_cfg(name="imagefolder", root=str(path)))


def test_a_class_missing_from_one_split_is_named(tmp_path):
    tree = make_tree(tmp_path / "t")
    first = sorted((tree / "val").iterdir())[0]
    for image in first.iterdir():
        image.unlink()
    first.rmdir()
    with pytest.raises(ConfigError, match=rf"every class needs images in train/ and val/; only in train/: \['{first.name}'\]"):
        describe(data_cfg(name="imagefolder", root=str(tree)))


def test_a_shuffled_test_pass_is_one_fixed_order_of_every_test_image():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    loader = DeviceLoader(images, torch.arange(10), 4, Normalize(torch.zeros(1), torch.ones(1), torch.device("cpu")),
                          train=False)
    labels = [torch.cat([y for _, y in loader.epoch(e, shuffled=True)]).tolist() for e in (1, 2)]
    assert labels[0] == labels[1] and sorted(labels[0]) == list(range(10)) and labels[0] != list(range(10))
    assert torch.cat([y for _, y in loader.epoch(1)]).tolist() == list(range(10))
