"""Image sources: load a data set into memory as uint8 arrays.

Every source in :data:`DATASETS` answers two questions:

* ``info(root)`` gives the image shape ``(C, H, W)``, the number of classes (``None``
  for unlabelled data) and the class names, cheaply: static for the built-in data sets,
  a header read for files and folders.
* ``load(root, download, split)`` returns an :class:`ImageArrays` with all images of
  ``split`` (``"train"``, ``"test"`` or ``"all"``). Sources without an official test
  split (``has_test_split = False``) only serve ``"train"`` and ``"all"`` (the same data).

``split="all"`` of a source with a test split is the official train split followed by
the official test split; the data module indexes samples in that order.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from clusterlight.errors import ClusterlightError

__all__ = [
    "DATASETS",
    "ImageArrays",
    "ImageSource",
    "SourceInfo",
    "convert_images",
    "read_idx",
    "register_dataset",
]

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_ROOT = os.path.join("~", ".cache", "clusterlight")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass
class ImageArrays:
    """Images of one source split, in memory.

    Attributes:
        images: uint8 array ``(N, H, W, C)`` with ``C`` 1 or 3.
        labels: int64 array ``(N,)`` with class ids ``0..num_classes-1``, or ``None`` (unlabelled).
        class_names: one name per class id, or ``None``.
        paths: the file of each sample (folder sources), or ``None``.
        skipped: files that could not be read and were skipped (``skip_corrupt=True``).
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, H, W, C) with C in 1/3, got {self.images.dtype} "
                             f"{self.images.shape}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.images),):
                raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if self.paths is not None and len(self.paths) != len(self.images):
            raise ValueError(f"paths must have {len(self.images)} entries, got {len(self.paths)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape as ``(C, H, W)``."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def concat(self, other: ImageArrays) -> ImageArrays:
        """This data followed by ``other`` (same image shape)."""
        labels = None
        if self.labels is not None and other.labels is not None:
            labels = np.concatenate([self.labels, other.labels])
        paths = None
        if self.paths is not None and other.paths is not None:
            paths = self.paths + other.paths
        return ImageArrays(np.concatenate([self.images, other.images]), labels,
                           self.class_names, paths, self.skipped + other.skipped)


class SourceInfo(NamedTuple):
    """What a source knows before loading: image shape ``(C, H, W)``, classes, class names."""

    shape: tuple[int, int, int]
    num_classes: int | None
    class_names: list[str] | None


class ImageSource:
    """Base class of a data source (see the module docstring)."""

    #: whether the source has an official test split (``load(split="test")``)
    has_test_split: bool = False
    #: whether ``root`` must be given (a folder or file of the user's)
    requires_root: bool = False
    #: whether ``download=True`` can fetch the data
    downloadable: bool = False

    def info(self, root: str | None) -> SourceInfo:
        """Image shape, number of classes and class names, without loading the images."""
        raise NotImplementedError

    def check(self, root: str | None, download: bool) -> None:
        """Raise :class:`ClusterlightError` when the data cannot be found (and will not be downloaded)."""
        if root is not None and not download and not os.path.exists(os.path.expanduser(root)):
            raise ClusterlightError(f"root {root!r} does not exist; point root at the data"
                                    + (" or pass download: true" if self.downloadable else ""))

    def prepare(self, root: str | None, download: bool) -> None:
        """Download the data when ``download`` is true and it is not there yet."""

    def load(self, root: str | None, download: bool = False, split: str = "train", *,
             skip_corrupt: bool = False, size: tuple[int, int] | None = None) -> ImageArrays:
        """Load ``split`` into memory.

        Args:
            root: where the data lives (source specific; ``None`` for the default).
            download: download the data first when it is missing (torchvision sources).
            split: ``"train"``, ``"test"`` or ``"all"``.
            skip_corrupt: skip unreadable image files instead of failing (folder source).
            size: ``(H, W)`` to decode images at (folder source, needed for mixed sizes);
                other sources ignore it and are resized afterwards.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "test" and not self.has_test_split:
            raise ValueError(f"{type(self).__name__} has no test split")
        return self._load(root, download, split, skip_corrupt=skip_corrupt, size=size)

    def _load(self, root: str | None, download: bool, split: str, *, skip_corrupt: bool,
              size: tuple[int, int] | None) -> ImageArrays:
        raise NotImplementedError


def _one_line(e: BaseException) -> str:
    """An exception as ``Type: message`` on one line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _nhwc(images: np.ndarray) -> np.ndarray:
    """Add the channel axis to ``(N, H, W)`` images."""
    return images[..., None] if images.ndim == 3 else images


# --------------------------------------------------------------------------- scikit-learn digits
class DigitsSource(ImageSource):
    """scikit-learn's ``load_digits``: 1,797 8x8 digits, values 0..16 scaled to 0..255."""

    def info(self, root: str | None) -> SourceInfo:
        return SourceInfo((1, 8, 8), 10, [str(i) for i in range(10)])

    def _load(self, root, download, split, *, skip_corrupt, size):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
        return ImageArrays(_nhwc(images), np.asarray(bunch.target, dtype=np.int64), [str(i) for i in range(10)])


# --------------------------------------------------------------------------- npz files
def _npz_error(path: str, what: str) -> ClusterlightError:
    return ClusterlightError(f"npz file {path!r} {what}")


def _npz_header(path: str, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of array ``key`` of an npz file without reading the data (``None`` if absent)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                return None
            with zf.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _npz_error(path, f"is not a readable .npz archive ({_one_line(e)}); "
                         "expected numpy.savez output with key 'images'") from e
    return tuple(shape), dtype


def _check_npz_images(path: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) in (3, 4) and 0 in shape:
        raise _npz_error(path, f"has an empty 'images' array {shape}; it needs at least one image")
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if len(shape) == 4 and shape[3] in (1, 3):
        return (shape[3], shape[1], shape[2])
    raise _npz_error(path, f"has 'images' of shape {shape}; allowed: (N, H, W) or (N, H, W, C) with C 1 or 3")


def _read_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in keys if k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise _npz_error(path, f"is truncated or corrupt ({_one_line(e)}); "
                         "write it again with numpy.savez (no object arrays)") from e


def _npz_labels(path: str, labels: np.ndarray, n: int, names: np.ndarray | None
                ) -> tuple[np.ndarray, list[str]]:
    """Map the labels of an npz file to ``0..K-1`` (sorted distinct values) and name the classes."""
    if labels.shape != (n,) or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise _npz_error(path, f"has 'labels' of dtype {labels.dtype} and shape {labels.shape}; "
                         f"allowed: integers of shape ({n},)")
    values, inverse = np.unique(labels, return_inverse=True)
    if names is not None:
        names = [str(x) for x in np.asarray(names).reshape(-1)]
        if values.min() < 0 or values.max() >= len(names):
            raise _npz_error(path, f"has {len(names)} 'class_names' but labels range "
                             f"{values.min()}..{values.max()}; labels must index class_names")
        return labels.astype(np.int64), names
    return inverse.reshape(-1).astype(np.int64), [str(v) for v in values.tolist()]


def _npz_to_uint8(path: str, images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if images.size == 0:
        return images.astype(np.uint8)
    lo, hi = float(images.min()), float(images.max())
    if np.issubdtype(images.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return np.rint(images * 255.0).astype(np.uint8)
    if (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)) \
            and lo >= 0 and hi <= 255:
        return np.rint(images).astype(np.uint8)
    raise _npz_error(path, f"has 'images' of dtype {images.dtype} with values {lo:g}..{hi:g}; "
                     "allowed: uint8 0..255 or floats in [0, 1]")


class NpzSource(ImageSource):
    """A ``.npz`` file: ``images`` (N, H, W) or (N, H, W, C), optional ``labels`` and ``class_names``.

    ``root`` is the path of the file. Labels may be any integers; classes are their sorted
    distinct values (ids ``0..K-1``) unless ``class_names`` is given, then labels index it.
    """

    requires_root = True

    def path(self, root: str | None) -> str:
        if root is None:
            raise ClusterlightError("dataset 'npz' needs root: the path of a .npz file with key 'images'")
        return os.path.expanduser(root)

    def check(self, root: str | None, download: bool) -> None:
        path = self.path(root)
        if not os.path.isfile(path):
            raise ClusterlightError(f"root {root!r} is not a file; dataset 'npz' needs root: the path of a "
                                    ".npz file with key 'images'")

    def info(self, root: str | None) -> SourceInfo:
        path = self.path(root)
        self.check(root, False)
        header = _npz_header(path, "images")
        if header is None:
            raise _npz_error(path, "has no 'images' array; save the images under key 'images' "
                             "((N, H, W) or (N, H, W, C), C 1 or 3)")
        shape = _check_npz_images(path, header[0])
        if _npz_header(path, "labels") is None:
            return SourceInfo(shape, None, None)
        data = _read_npz(path, ("labels", "class_names"))
        _, names = _npz_labels(path, data["labels"], header[0][0], data.get("class_names"))
        return SourceInfo(shape, len(names), names)

    def _load(self, root, download, split, *, skip_corrupt, size):
        path = self.path(root)
        self.check(root, False)
        data = _read_npz(path, ("images", "labels", "class_names"))
        if "images" not in data:
            raise _npz_error(path, "has no 'images' array; save the images under key 'images' "
                             "((N, H, W) or (N, H, W, C), C 1 or 3)")
        images = data["images"]
        _check_npz_images(path, images.shape)
        images = _nhwc(_npz_to_uint8(path, images))
        labels, names = None, None
        if "labels" in data:
            labels, names = _npz_labels(path, data["labels"], len(images), data.get("class_names"))
        return ImageArrays(np.ascontiguousarray(images), labels, names)


class AssetNpzSource(NpzSource):
    """One of the shipped archives in ``clusterlight/data/assets``; ``root`` (a folder) overrides it."""

    requires_root = False

    def __init__(self, filename: str, shape: tuple[int, int, int], class_names: list[str]) -> None:
        self.filename = filename
        self.static = SourceInfo(shape, len(class_names), class_names)

    def path(self, root: str | None) -> str:
        if root is None:
            return str(ASSETS / self.filename)
        root = os.path.expanduser(root)
        return root if os.path.isfile(root) else os.path.join(root, self.filename)

    def check(self, root: str | None, download: bool) -> None:
        if not os.path.isfile(self.path(root)):
            raise ClusterlightError(f"root {root!r} has no {self.filename}; give the folder that holds "
                                    f"{self.filename} or leave root unset to use the shipped copy")

    def info(self, root: str | None) -> SourceInfo:
        if root is None:
            return self.static
        info = super().info(root)
        return SourceInfo(info.shape, info.num_classes, info.class_names or self.static.class_names)

    def _load(self, root, download, split, *, skip_corrupt, size):
        arrays = super()._load(root, download, split, skip_corrupt=skip_corrupt, size=size)
        if arrays.labels is not None and len(arrays.class_names) == len(self.static.class_names):
            arrays.class_names = list(self.static.class_names)
        return arrays


# --------------------------------------------------------------------------- MNIST-style idx files
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed when its name ends in ``.gz``."""
    path = os.fspath(path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ClusterlightError(f"idx file {path!r} cannot be read ({_one_line(e)}); "
                                "download it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ClusterlightError(f"idx file {path!r} has no idx header (magic 0x0000TTDD); "
                                "expected an MNIST-format file")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ClusterlightError(f"idx file {path!r} is truncated (header incomplete); download it again")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ClusterlightError(f"idx file {path!r} holds {len(data) - offset} data bytes but its header "
                                f"{shape} needs {expected}; the file is truncated or corrupt, download it again")
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


class IdxSource(ImageSource):
    """MNIST-format idx files, found in ``root``, ``root/raw`` or ``root/<TorchvisionClass>/raw``."""

    has_test_split = True
    downloadable = True
    FILES: ClassVar[dict[str, tuple[str, str]]] = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def __init__(self, torchvision_class: str, class_names: list[str], display: str,
                 fallback_roots: tuple[str, ...] = (), install_hint: str = "") -> None:
        self.torchvision_class = torchvision_class
        self.class_names = class_names
        self.display = display
        self.fallback_roots = fallback_roots
        self.install_hint = install_hint

    def info(self, root: str | None) -> SourceInfo:
        return SourceInfo((1, 28, 28), 10, list(self.class_names))

    def _roots(self, root: str | None) -> list[str]:
        if root is not None:
            return [os.path.expanduser(root)]
        return [os.path.expanduser(DEFAULT_ROOT), *self.fallback_roots]

    def find(self, root: str | None, name: str) -> str | None:
        """Path of idx file ``name`` (or ``name.gz``), or ``None``."""
        for base in self._roots(root):
            for folder in (base, os.path.join(base, "raw"), os.path.join(base, self.torchvision_class, "raw")):
                for candidate in (name, name + ".gz"):
                    path = os.path.join(folder, candidate)
                    if os.path.isfile(path):
                        return path
        return None

    def _present(self, root: str | None) -> bool:
        return all(self.find(root, name) is not None for files in self.FILES.values() for name in files)

    def _missing_error(self, root: str | None) -> ClusterlightError:
        where = repr(root) if root is not None else f"the default root {DEFAULT_ROOT!r}"
        return ClusterlightError(
            f"{self.display} idx files (train-images-idx3-ubyte[.gz] etc.) not found in {where} "
            f"(nor in its raw/ or {self.torchvision_class}/raw/); pass download: true{self.install_hint}")

    def check(self, root: str | None, download: bool) -> None:
        if not download and not self._present(root):
            raise self._missing_error(root)

    def prepare(self, root: str | None, download: bool) -> None:
        if not download or self._present(root):
            return
        import torchvision.datasets as tvd

        target = os.path.expanduser(root if root is not None else DEFAULT_ROOT)
        cls = getattr(tvd, self.torchvision_class)
        try:
            for train in (True, False):
                cls(target, train=train, download=True)
        except (OSError, RuntimeError) as e:
            raise ClusterlightError(f"downloading {self.display} into {target!r} failed ({_one_line(e)}); check "
                                    f"the network, or put the idx files into root by hand{self.install_hint}") from e

    def _load(self, root, download, split, *, skip_corrupt, size):
        self.prepare(root, download)
        if not self._present(root):
            raise self._missing_error(root)
        parts = []
        for part in (("train", "test") if split == "all" else (split,)):
            image_file, label_file = (self.find(root, name) for name in self.FILES[part])
            images, labels = read_idx(image_file), read_idx(label_file)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ClusterlightError(f"idx files {image_file!r} and {label_file!r} do not match: "
                                        f"images {images.shape}, labels {labels.shape}; download them again")
            parts.append(ImageArrays(_nhwc(images.astype(np.uint8)), labels.astype(np.int64),
                                     list(self.class_names)))
        return parts[0] if len(parts) == 1 else parts[0].concat(parts[1])


# --------------------------------------------------------------------------- torchvision data sets
class TorchvisionSource(ImageSource):
    """A torchvision data set class with ``root``/``download`` (CIFAR-10, STL-10)."""

    has_test_split = True
    downloadable = True

    def __init__(self, torchvision_class: str, shape: tuple[int, int, int], class_names: list[str],
                 folder: str, split_arg: bool) -> None:
        self.torchvision_class = torchvision_class
        self.static = SourceInfo(shape, len(class_names), class_names)
        self.folder = folder
        self.split_arg = split_arg

    def info(self, root: str | None) -> SourceInfo:
        return self.static

    def _root(self, root: str | None) -> str:
        return os.path.expanduser(root if root is not None else DEFAULT_ROOT)

    def check(self, root: str | None, download: bool) -> None:
        if not download and not os.path.isdir(os.path.join(self._root(root), self.folder)):
            where = repr(root) if root is not None else f"the default root {DEFAULT_ROOT!r}"
            raise ClusterlightError(f"{self.torchvision_class} not found in {where} (no {self.folder}/ "
                                    "folder); pass download: true or point root at the folder that holds it")

    def _dataset(self, root: str | None, download: bool, part: str):
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.torchvision_class)
        kwargs = {"split": part} if self.split_arg else {"train": part == "train"}
        try:
            return cls(self._root(root), download=download, **kwargs)
        except (OSError, RuntimeError) as e:
            hint = ("check the network, or put the files into root by hand" if download
                    else "pass download: true or point root at the folder that holds the data")
            raise ClusterlightError(f"{self.torchvision_class} in {self._root(root)!r} could not be "
                                    f"{'downloaded' if download else 'read'} ({_one_line(e)}); {hint}") from e

    def prepare(self, root: str | None, download: bool) -> None:
        if download:
            for part in ("train", "test"):
                self._dataset(root, True, part)

    def _load(self, root, download, split, *, skip_corrupt, size):
        if not download:
            self.check(root, download)
        parts = []
        for part in (("train", "test") if split == "all" else (split,)):
            ds = self._dataset(root, download, part)
            images = np.asarray(ds.data, dtype=np.uint8)
            if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:  # STL-10 stores NCHW
                images = images.transpose(0, 2, 3, 1)
            labels = np.asarray(ds.labels if hasattr(ds, "labels") else ds.targets, dtype=np.int64)
            parts.append(ImageArrays(np.ascontiguousarray(_nhwc(images)), labels, list(self.static.class_names)))
        return parts[0] if len(parts) == 1 else parts[0].concat(parts[1])


# --------------------------------------------------------------------------- image folders
def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class FolderSource(ImageSource):
    """Image files in ``root/<class>/<image>`` (labelled) or directly in ``root`` (unlabelled).

    Class ids follow the sorted class folder names; class folders are searched recursively.
    Images are converted to ``L`` when every file is grayscale, else to ``RGB``.
    """

    requires_root = True

    def check(self, root: str | None, download: bool) -> None:
        if root is None:
            raise ClusterlightError("dataset 'folder' needs root: a folder with class subfolders "
                                    "(root/<class>/<image>) or with image files directly")
        if not os.path.isdir(os.path.expanduser(root)):
            raise ClusterlightError(f"root {root!r} is not a folder; dataset 'folder' needs root/<class>/<image> "
                                    "or image files directly in root")

    def scan(self, root: str | None) -> tuple[list[str], np.ndarray | None, list[str] | None]:
        """Image files, their labels (``None`` when unlabelled) and the class names."""
        self.check(root, False)
        base = os.path.expanduser(root)
        entries = sorted(os.listdir(base))
        classes = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(base, e))]
        loose = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(base, e))]
        if classes and loose:
            raise ClusterlightError(f"folder {root!r} has both image files ({loose[0]!r}, ...) and class "
                                    f"folders ({classes[0]!r}, ...); use root/<class>/<image> or only images")
        if not classes:
            if not loose:
                raise ClusterlightError(f"folder {root!r} has no image files or class folders; allowed "
                                        f"extensions: {', '.join(IMAGE_EXTENSIONS)}")
            return [os.path.join(base, e) for e in loose], None, None
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(base, name), followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
            if not found:
                raise ClusterlightError(f"class folder {os.path.join(base, name)!r} has no image files; remove it "
                                        f"or add images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
            labels.extend([label] * len(found))
        return files, np.asarray(labels, dtype=np.int64), classes

    @staticmethod
    def _header(path: str) -> tuple[str, tuple[int, int]] | None:
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.mode, im.size
        except Exception:  # noqa: BLE001 - corrupt files are reported by load()
            return None

    def _headers(self, files: list[str]) -> list[tuple[str, tuple[int, int]] | None]:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(self._header, files, chunksize=64))

    @staticmethod
    def _mode(headers: list[tuple[str, tuple[int, int]] | None]) -> str:
        return "L" if all(h is None or h[0] in GRAY_MODES for h in headers) else "RGB"

    def info(self, root: str | None) -> SourceInfo:
        files, _, classes = self.scan(root)
        headers = self._headers(files)
        first = next((h for h in headers if h is not None), None)
        if first is None:
            raise ClusterlightError(f"folder {root!r} has no readable image; first file {files[0]!r} "
                                    "cannot be opened by PIL")
        w, h = first[1]
        channels = 1 if self._mode(headers) == "L" else 3
        return SourceInfo((channels, h, w), None if classes is None else len(classes), classes)

    @staticmethod
    def _read(path: str, mode: str, size: tuple[int, int] | None) -> np.ndarray | BaseException:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
                if im.mode.startswith("I") and mode == "L":  # 16/32-bit grayscale: scale to 8 bits
                    a = np.asarray(im, dtype=np.float64)
                    if a.max() > 255:
                        a = a * (255.0 / 65535.0)
                    im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
                else:
                    im = im.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for broken files
            return e
        return array

    def _load(self, root, download, split, *, skip_corrupt, size):
        files, labels, classes = self.scan(root)
        mode = self._mode(self._headers(files))
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(lambda p: self._read(p, mode, size), files, chunksize=32))
        keep, skipped, images = [], [], []
        for i, (path, result) in enumerate(zip(files, results)):
            if isinstance(result, BaseException):
                if not skip_corrupt:
                    raise ClusterlightError(f"image file {path!r} cannot be read ({_one_line(result)}); "
                                            "fix or remove it, or set skip_corrupt: true")
                skipped.append(path)
                continue
            keep.append(i)
            images.append(result)
        if not images:
            raise ClusterlightError(f"folder {root!r} has no readable image ({len(skipped)} corrupt files skipped)")
        shapes = {}
        for i, a in zip(keep, images):
            shapes.setdefault(a.shape[:2], files[i])
        if len(shapes) > 1:
            (s1, f1), (s2, f2) = list(shapes.items())[:2]
            raise ClusterlightError(f"folder {root!r} has images of mixed sizes ({f1!r} is {s1[0]}x{s1[1]}, "
                                    f"{f2!r} is {s2[0]}x{s2[1]}); set image_size to resize them to one size")
        kept_labels = None
        if labels is not None:
            kept_labels = labels[keep]
            empty = sorted(set(range(len(classes))) - set(np.unique(kept_labels).tolist()))
            if empty:
                raise ClusterlightError(f"class folder {os.path.join(os.path.expanduser(root), classes[empty[0]])!r} "
                                        "has no readable image after skipping corrupt files; fix or remove it")
        return ImageArrays(_nhwc(np.stack(images)), kept_labels, classes, [files[i] for i in keep], skipped)


# --------------------------------------------------------------------------- conversion
def convert_images(images: np.ndarray | torch.Tensor, channels: int | None = None,
                   size: tuple[int, int] | None = None, chunk: int = 2048) -> torch.Tensor:
    """uint8 images ``(N, H, W, C)`` (numpy) or ``(N, C, H, W)`` (tensor) to a uint8 tensor ``(N, C', H', W')``.

    Channels are converted gray -> RGB by repetition and RGB -> gray with the ITU-R 601
    luma weights (as PIL's ``L``); resizing is bilinear with antialiasing
    (``torch.nn.functional.interpolate``), rounded back to uint8. Works in chunks.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) if isinstance(images, np.ndarray) \
        else images
    n, c, h, w = x.shape
    c_out = c if channels is None else channels
    h_out, w_out = (h, w) if size is None else size
    if c_out == c and (h_out, w_out) == (h, w):
        return x.contiguous()
    out = torch.empty((n, c_out, h_out, w_out), dtype=torch.uint8)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for start in range(0, n, chunk):
        part = x[start:start + chunk].float()
        if c_out == 1 and c == 3:
            part = (part * weights).sum(dim=1, keepdim=True)
        if (h_out, w_out) != (h, w):
            part = F.interpolate(part, size=(h_out, w_out), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)  # broadcasts 1 -> 3 channels
    return out


# --------------------------------------------------------------------------- registry
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

#: name -> source; the ``dataset`` option of the data module picks one.
DATASETS: dict[str, ImageSource] = {
    "digits": DigitsSource(),
    "usps": AssetNpzSource("usps.npz", (1, 16, 16), [str(i) for i in range(10)]),
    "coil20": AssetNpzSource("coil20.npz", (1, 32, 32), [f"obj{i}" for i in range(1, 21)]),
    "mnist": IdxSource("MNIST", [str(i) for i in range(10)], "MNIST"),
    "fashion_mnist": IdxSource(
        "FashionMNIST", FASHION_CLASSES, "Fashion-MNIST", fallback_roots=(DEBIAN_FASHION_MNIST,),
        install_hint=f", or run 'apt-get install dataset-fashion-mnist' and use root {DEBIAN_FASHION_MNIST!r}"),
    "cifar10": TorchvisionSource("CIFAR10", (3, 32, 32), CIFAR10_CLASSES, "cifar-10-batches-py", split_arg=False),
    "stl10": TorchvisionSource("STL10", (3, 96, 96), STL10_CLASSES, "stl10_binary", split_arg=True),
    "folder": FolderSource(),
    "npz": NpzSource(),
}


def register_dataset(name: str, source: ImageSource) -> None:
    """Add a source to :data:`DATASETS` under ``name`` (replacing one of that name)."""
    if not isinstance(source, ImageSource):
        raise TypeError(f"source must be an ImageSource, got {type(source).__name__}")
    DATASETS[name] = source
