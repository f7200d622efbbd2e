"""Image-folder data: a ``train/`` + ``val/`` (or ``test/``) tree of class folders, or a ``.zip`` of one.

This covers ImageNet subsets (Imagenette; N classes picked from a class list, or ``num_classes``
with a seed) at any image size, and the CIFAR-10 JPEG zip. Images are resized (shorter side) and
center-cropped to ``image_size``. A set small enough is decoded once, cached on disk as uint8, and
trained from device memory; a larger one streams through a DataLoader with workers.
"""

from __future__ import annotations

import hashlib
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image

from normlab.cache import cache_dir
from normlab.data import image_safety
from normlab.errors import ConfigError
from normlab.data.image_set import DataShape, ImageSet
from normlab.records import atomic_write
from normlab.settings import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
TEST_SPLITS = ("val", "test")


class ImageTree:
    """Lists and reads the image files of a folder or a zip; safe to use from DataLoader workers."""

    def __init__(self, path: str | os.PathLike, max_pixels: int) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        self.max_pixels = max_pixels
        self.is_zip = self.path.suffix.lower() == ".zip"
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        names = self._names()
        self.splits = self._find_splits(names)

    def _names(self) -> list[str]:
        if self.is_zip:
            return [n for n in self._archive().namelist() if not n.endswith("/")]
        return [str(p.relative_to(self.path).as_posix()) for p in self.path.rglob("*") if p.is_file()]

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per process
            try:
                self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise ConfigError(f"data.root={str(self.path)!r} is not a readable zip archive "
                                  f"({type(e).__name__}: {e})") from None
        return self._zip

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_zip_pid": -1}

    @staticmethod
    def _find_splits(names: list[str]) -> dict[str, dict[str, list[str]]]:
        """{split: {class: [file, ...]}} for files at <prefix>/<split>/<class>/<file>."""
        splits: dict[str, dict[str, list[str]]] = {}
        for name in sorted(names):
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if ".." in parts or name.startswith(("/", "\\")) or (parts and ":" in parts[0]):
                raise ConfigError(f"data.root holds a member whose path leaves its folder: {name!r}; such "
                                  "members are refused (a zip-slip); rebuild the archive without it")
            if len(parts) < 3 or PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if "__MACOSX" in parts or parts[-1].startswith("."):  # archive metadata, not images
                continue
            split, cls = parts[-3], parts[-2]
            splits.setdefault(split, {}).setdefault(cls, []).append(name)
        return splits

    def read(self, name: str) -> bytes:
        """The file's bytes, once its size (a zip member's inflated size) is one an image can have."""
        try:
            size = self._archive().getinfo(name).file_size if self.is_zip else (self.path / name).stat().st_size
            image_safety.check_file_size(size, name, self.where, self.max_pixels)
            return self._archive().read(name) if self.is_zip else (self.path / name).read_bytes()
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{name!r} in {self.where} cannot be read ({type(e).__name__}: {e})") from None

    @property
    def where(self) -> str:
        return f"data.root={str(self.path)!r}"

    def open_image(self, name: str) -> Image.Image:
        """The image `name`, as RGB; a bomb, an oversized, truncated or non-image file is a ConfigError naming
        the tree and the member (data/image_safety.py)."""
        return image_safety.open_rgb(self.read(name), name, self.where, self.max_pixels)


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then center-crop to size × size."""
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size)) if (w, h) != (size, size) else image


@dataclass
class Selection:
    """What the config picks out of a tree: the splits, the classes, the image size."""

    tree: ImageTree
    test_split: str
    classes: list[str]
    size: int

    def files(self, split: str) -> tuple[list[str], list[int]]:
        names, labels = [], []
        for label, cls in enumerate(self.classes):
            found = self.tree.splits[split].get(cls, [])
            names += found
            labels += [label] * len(found)
        return names, labels

    @property
    def num_images(self) -> int:
        return sum(len(self.files(s)[0]) for s in ("train", self.test_split))

    def shape(self) -> DataShape:
        return DataShape(channels=3, size=self.size, num_classes=len(self.classes),
                         train_size=len(self.files("train")[0]), test_size=len(self.files(self.test_split)[0]))

    def fits_in(self, max_gb: float) -> bool:
        """Whether the decoded uint8 images fit in `max_gb` (else they stream through a DataLoader)."""
        return self.num_images * 3 * self.size ** 2 <= max_gb * 1e9


def select(settings: DataConfig) -> Selection:
    """Check the settings against the tree (ConfigError naming the key) and pick classes and size."""
    if not settings.root:
        raise ConfigError("data.root=None is invalid: imagefolder needs data.root, a folder or a .zip "
                          "holding train/<class>/ and val/<class>/ (or test/<class>/). For data=cifar10_jpeg, set "
                          "NORMLAB_CIFAR10_JPEG=/path/to/cifar10-jpeg.zip, or use torchvision's CIFAR-10: "
                          "data=cifar10 data.download=true")
    path = Path(os.path.expanduser(settings.root))
    if not path.exists():
        raise ConfigError(f"data.root={settings.root!r} does not exist (data.download=false; image folders are never "
                          f"downloaded); point data.root at a folder or .zip with train/ and val/ or test/")
    tree = ImageTree(path, settings.max_image_pixels)
    test_split = next((s for s in TEST_SPLITS if s in tree.splits), None)
    if "train" not in tree.splits or test_split is None:
        raise ConfigError(f"data.root={settings.root!r} holds splits {sorted(tree.splits) or 'none'}; need train/ and "
                          f"val/ or test/, each with one folder of images per class")
    available = sorted(tree.splits["train"])
    unmatched = sorted(set(available) ^ set(tree.splits[test_split]))
    if unmatched:
        only_train = [c for c in unmatched if c in tree.splits["train"]]
        only_test = [c for c in unmatched if c not in tree.splits["train"]]
        raise ConfigError(f"data.root={settings.root!r}: every class needs images in train/ and {test_split}/; "
                          + "; ".join(part for part in (
                              f"only in train/: {only_train[:10]}" if only_train else "",
                              f"only in {test_split}/: {only_test[:10]}" if only_test else "") if part)
                          + " (data.classes can pick classes that have both)")
    if settings.classes:
        missing = [c for c in settings.classes if c not in available]
        if missing:
            raise ConfigError(f"data.classes has {missing}, not found in {settings.root}; available: {available[:20]}"
                              f"{' ...' if len(available) > 20 else ''}")
        classes = list(settings.classes)
    elif settings.num_classes:
        if not 1 <= settings.num_classes <= len(available):
            raise ConfigError(f"data.num_classes={settings.num_classes} is invalid: {settings.root} has {len(available)} classes")
        classes = sorted(random.Random(settings.class_seed).sample(available, settings.num_classes))
    else:
        classes = available
    size = settings.image_size
    if size is None:
        first = tree.splits["train"][classes[0]][0]
        size = min(tree.open_image(first).size)
    elif size < 1:
        raise ConfigError(f"data.image_size={size} is invalid: must be >= 1")
    return Selection(tree, test_split, classes, size)


def decode(selection: Selection, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    names, labels = selection.files(split)
    images = torch.empty(len(names), 3, selection.size, selection.size, dtype=torch.uint8)
    for i, name in enumerate(names):
        array = torch.frombuffer(bytearray(resize_and_center_crop(selection.tree.open_image(name), selection.size).tobytes()),
                                 dtype=torch.uint8)
        images[i] = array.view(selection.size, selection.size, 3).permute(2, 0, 1)
    return images, torch.tensor(labels, dtype=torch.long)


def cache_path(settings: DataConfig, selection: Selection) -> Path:
    """Keyed by the source and every selected file: a zip by its size and mtime, a folder by each file's."""
    tree = selection.tree
    stat = tree.path.stat()
    files = f"{stat.st_size}|{stat.st_mtime_ns}"
    if not tree.is_zip:
        names = [n for split in ("train", selection.test_split) for n in selection.files(split)[0]]
        files = hashlib.sha1("".join(f"{n}:{(tree.path / n).stat().st_size}:{(tree.path / n).stat().st_mtime_ns}|"
                                     for n in names).encode()).hexdigest()
    key = f"{tree.path.resolve()}|{files}|{selection.size}|{selection.classes}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    root = Path(os.path.expanduser(settings.cache_dir)) if settings.cache_dir else cache_dir()
    return root / f"imagefolder-{selection.tree.path.stem}-{selection.size}px-{digest}.pt"


class ImageFolderSource:
    """Its shape comes from its ``Selection`` (``select``), which ``data.resolve`` keeps for the loaders."""

    def load(self, settings: DataConfig, selection: Selection | None = None) -> ImageSet:
        """Decode every selected image once (`selection`: the files resolved already); later runs read the
        uint8 cache."""
        selection = selection or select(settings)
        path = cache_path(settings, selection)
        if path.exists():
            try:  # tensors and a list of names only: a planted or damaged cache runs nothing, and is redone
                return ImageSet(**torch.load(path, weights_only=True))
            except Exception:  # noqa: BLE001
                path.unlink(missing_ok=True)
        train_images, train_labels = decode(selection, "train")
        test_images, test_labels = decode(selection, selection.test_split)
        image_set = ImageSet(train_images, train_labels, test_images, test_labels, selection.classes)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(vars(image_set), f), elsewhere="set data.cache_dir (or NORMLAB_CACHE)")
        return image_set
