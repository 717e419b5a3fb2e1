"""Image classification data: decode once, cache as uint8 arrays, augment on tensors.

A data path (``--data PATH``) is either

* a directory holding the splits, each as an ImageFolder directory (``train/<class>/*.jpg``),
  an ImageFolder tarball (``train.tar.gz``, ``.tgz`` or ``.tar``) or a compact sample
  (``train.npz``); the evaluation split is ``test`` or, failing that, ``val``;
* or one of those forms directly (a ``.npz`` or tarball file, or an ImageFolder directory),
  which then serves every split.

Images are decoded once with Pillow into a uint8 array of shape (N, H, W, 3) plus int64
labels and cached under ``~/.cache/hwprune/datasets`` (``$HWPRUNE_CACHE/datasets`` when
that variable is set), keyed by the source's absolute path, size and modification time.
Images whose size differs from the requested ``image_size`` are resized (shorter side)
and center-cropped while decoding.

:class:`BatchLoader` keeps the whole split as one uint8 tensor and builds each batch
with vectorised tensor operations: padded random crop, horizontal flip, conversion to
float and per-channel normalisation.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hwprune.atomic import atomic_write
from hwprune.errors import HwpruneError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
_TAR_EXTS = (".tar.gz", ".tgz", ".tar")
_EVAL_SPLITS = ("test", "val")
_CACHE_VERSION = "1"


@dataclass
class ImageDataset:
    """A labelled image set held in memory.

    ``images`` is uint8 (N, H, W, 3), ``labels`` int64 (N,); ``mean`` and ``std`` are the
    per-channel normalisation (on the 0..1 scale) that loaders apply.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image as a model sees it."""
        return (3, int(self.images.shape[1]), int(self.images.shape[2]))

    def subset(self, indices: np.ndarray) -> "ImageDataset":
        """The images at ``indices`` (same classes and normalisation)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, images=self.images[idx], labels=self.labels[idx])

    def with_normalization(self, mean, std) -> "ImageDataset":
        """The same images with another normalisation (e.g. the one a model was trained with)."""
        return replace(self, mean=_triple(mean), std=_triple(std))


@dataclass
class Splits:
    """A training split and, when the data has one, an evaluation split (same normalisation)."""

    train: ImageDataset
    test: ImageDataset | None


# ----------------------------------------------------------------------------- loading


def load_splits(path: str | os.PathLike, image_size: int | None = None, cache_dir: str | os.PathLike | None = None) -> Splits:
    """Load the training and evaluation splits under ``path``.

    The evaluation split uses the training split's normalisation. It is ``None`` when
    ``path`` is a single dataset (a file, a bare ImageFolder, or a directory without a
    ``test``/``val`` split): nothing is held out then.
    """
    root = Path(path)
    train = load_dataset(root, "train", image_size=image_size, cache_dir=cache_dir)
    if not root.is_dir() or _find_split(root, _EVAL_SPLITS) is None:
        return Splits(train, None)
    test = load_dataset(root, "test", image_size=image_size or train.images.shape[1], cache_dir=cache_dir)
    if test.classes != train.classes:
        raise HwpruneError(f"the train and test splits under {path} have different classes",
                           hint="both splits need the same class folders")
    return Splits(train, test.with_normalization(train.mean, train.std))


def load_dataset(path: str | os.PathLike, split: str = "train", image_size: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load one split (``train``, ``test`` or ``val``) of the data at ``path``.

    ``image_size`` resizes (shorter side) and center-crops every image to a square of
    that size; without it all images must share one size. Decoded folders and tarballs
    are cached; the normalisation is CIFAR-10's for CIFAR-10 and computed from the
    images otherwise.
    """
    source = _resolve(Path(path), split)
    if source.suffix == ".npz":
        ds = _load_npz(source)
        if image_size is not None and ds.images.shape[1:3] != (image_size, image_size):
            raise HwpruneError(f"{source} holds {ds.images.shape[2]}x{ds.images.shape[1]} images, not {image_size}x{image_size}",
                               hint="pass the image size the sample was made with")
        return ds
    cache = _cache_file(source, image_size, cache_dir)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                images, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
        except (OSError, ValueError, KeyError):
            cache.unlink(missing_ok=True)  # unreadable cache: decode again
            return load_dataset(path, split, image_size, cache_dir)
    else:
        images, labels, classes = _decode(source, image_size)
        _atomic_savez(cache, compress=False, images=images, labels=labels, classes=np.array(classes))
    return _with_default_normalization(images, labels, classes)


def save_npz_sample(dataset: ImageDataset, path: str | os.PathLike, per_class: int, seed: int = 0) -> Path:
    """Write a deterministic stratified sample of ``per_class`` images per class as a compressed ``.npz``.

    The file keeps the dataset's classes and normalisation; :func:`load_dataset` reads it.
    """
    idx = _stratified(dataset.labels, len(dataset.classes), per_class, seed)[0]
    sample = dataset.subset(idx)
    path = Path(path)
    _atomic_savez(path, compress=True, images=sample.images, labels=sample.labels, classes=np.array(dataset.classes),
                  mean=np.array(dataset.mean, dtype=np.float64), std=np.array(dataset.std, dtype=np.float64))
    return path


def holdout_split(dataset: ImageDataset, per_class: int = 200, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split ``dataset`` into (rest, held-out) with ``per_class`` held-out images per class.

    The split depends only on the labels, ``per_class`` and ``seed``; both parts keep
    their images in the original order.
    """
    held, rest = _stratified(dataset.labels, len(dataset.classes), per_class, seed)
    return dataset.subset(rest), dataset.subset(held)


def default_cache_dir() -> Path:
    """``$HWPRUNE_CACHE/datasets``, or ``~/.cache/hwprune/datasets``."""
    root = os.environ.get("HWPRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hwprune") / "datasets"


def _resolve(path: Path, split: str) -> Path:
    if not path.exists():
        raise HwpruneError(f"data path {path} does not exist",
                           hint="pass a directory with train/ and test/ (folders, .tar.gz or .npz), or a .npz/.tar.gz file")
    if path.is_file():
        if path.suffix == ".npz" or path.name.endswith(_TAR_EXTS):
            return path
        raise HwpruneError(f"{path} is not a dataset file", hint="expected a .npz, .tar.gz, .tgz or .tar file")
    names = _EVAL_SPLITS if split in _EVAL_SPLITS else (split,)
    found = _find_split(path, names)
    if found is not None:
        return found
    if _class_dirs(path):
        return path  # an ImageFolder directory itself
    raise HwpruneError(f"no '{split}' split under {path}",
                       hint=f"expected {names[0]}/ (class folders), {names[0]}.tar.gz or {names[0]}.npz")


def _find_split(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (root / name, *(root / f"{name}{ext}" for ext in (*_TAR_EXTS, ".npz"))):
            if candidate.exists():
                return candidate
    return None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _cache_file(source: Path, image_size: int | None, cache_dir) -> Path:
    source = source.resolve()
    h = hashlib.sha256(f"{_CACHE_VERSION}|{source}|{image_size}".encode())
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"|{f.relative_to(source.parent)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return Path(cache_dir or default_cache_dir()) / f"{h.hexdigest()[:24]}.npz"


def _decode(source: Path, image_size: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image under ``source`` (folder or tarball) into (images, labels, classes)."""
    items: list[tuple[str, np.ndarray]] = []  # (class name, HxWx3 uint8)
    if source.is_dir():
        for cdir in _class_dirs(source):
            for f in sorted(cdir.rglob("*")):
                if f.suffix.lower() in _IMAGE_EXTS:
                    items.append((cdir.name, _decode_image(f.read_bytes(), image_size, f)))
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(_IMAGE_EXTS)),
                                 key=lambda m: m.name)
                for m in members:
                    parts = Path(m.name).parts
                    if len(parts) < 2:
                        continue  # an image outside any class folder
                    items.append((parts[-2], _decode_image(tar.extractfile(m).read(), image_size, m.name)))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise HwpruneError(f"cannot read tarball {source}: {e}", hint="the file is truncated or not a tar archive") from e
    if not items:
        raise HwpruneError(f"no images found in {source}", hint="expected <class>/<image>.jpg entries")
    shapes = {a.shape for _, a in items}
    if len(shapes) > 1:
        raise HwpruneError(f"images in {source} have different sizes ({len(shapes)} distinct)",
                           hint="pass an image size (e.g. --image-size 224) to resize them")
    classes = sorted({c for c, _ in items})
    index = {c: i for i, c in enumerate(classes)}
    images = np.stack([a for _, a in items])
    labels = np.array([index[c] for c, _ in items], dtype=np.int64)
    return images, labels, classes


def _decode_image(data: bytes, size: int | None, name) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise HwpruneError(f"cannot decode image {name}: {e}", hint="remove or replace the broken file") from e
    if size is not None and img.size != (size, size):
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def _load_npz(path: Path) -> ImageDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"].astype(np.int64), [str(c) for c in z["classes"]]
            mean = tuple(z["mean"]) if "mean" in z else None
            std = tuple(z["std"]) if "std" in z else None
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise HwpruneError(f"cannot read dataset file {path}: {e}", hint="expected an .npz written by save_npz_sample") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[0] != labels.shape[0]:
        raise HwpruneError(f"{path} does not hold uint8 (N, H, W, 3) images with one label each")
    ds = _with_default_normalization(images, labels, classes)
    return ds if mean is None or std is None else ds.with_normalization(mean, std)


def _with_default_normalization(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> ImageDataset:
    if tuple(classes) == CIFAR10_CLASSES:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = channel_stats(images)
    return ImageDataset(images=images, labels=labels, classes=list(classes), mean=mean, std=std)


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and standard deviation (0..1 scale) of uint8 (N, H, W, 3) images."""
    s = np.zeros(3)
    sq = np.zeros(3)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        s += x.sum(0)
        sq += (x * x).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 1e-12))
    return _triple(mean), _triple(std)


def _triple(v) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in v)
    return (a, b, c)


def _stratified(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(picked, rest) indices: ``per_class`` random images of each class, both sorted."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise HwpruneError(f"class {c} has {len(idx)} images, fewer than the {per_class} requested per class")
        picked.append(rng.permutation(idx)[:per_class])
    chosen = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[chosen] = False
    return chosen, np.flatnonzero(mask)


def _atomic_savez(path: Path, compress: bool, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))


# ----------------------------------------------------------------------------- batches


class BatchLoader:
    """Iterate over ``dataset`` in batches of normalised float tensors (N, 3, H, W) and int64 labels.

    The whole dataset lives on ``device`` as one uint8 tensor. With ``augment`` each
    batch gets a random crop from the image zero-padded by ``pad`` pixels (default: an
    eighth of the image size, 4 for 32x32) and a random horizontal flip. Shuffling and
    augmentation draw from a generator seeded with ``seed`` and the epoch
    (:meth:`set_epoch`), so an epoch's batches are reproducible.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, drop_last: bool = False, device: str | torch.device = "cpu",
                 channels_last: bool = False, pad: int | None = None):
        if batch_size < 1:
            raise HwpruneError(f"batch size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.pad = max(1, dataset.images.shape[1] // 8) if pad is None else pad
        self.epoch = 0
        # NHWC storage seen as NCHW: batches come out in channels_last layout for free
        self._images = torch.from_numpy(np.ascontiguousarray(dataset.images)).to(self.device).permute(0, 3, 1, 2)
        self._labels = torch.from_numpy(dataset.labels.astype(np.int64)).to(self.device)
        mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling and augmentation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self._order(gen)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size].to(self.device)
            x = self._images.index_select(0, idx)
            if self.augment:
                x = self._augment(x, gen)
            yield self._normalize(x), self._labels.index_select(0, idx)

    def _order(self, gen: torch.Generator) -> torch.Tensor:
        """The epoch's image order (a distributed loader keeps its rank's share of it)."""
        n = len(self.dataset)
        return torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(self.device)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen).to(self.device)
        flip = (torch.rand(b, generator=gen) < 0.5).to(self.device)
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (oy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]
        cols = ox[:, None] + torch.arange(w, device=self.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # flip = read columns backwards
        batch = torch.arange(b, device=self.device)[:, None, None, None]
        chan = torch.arange(c, device=self.device)[None, :, None, None]
        return padded[batch, chan, rows, cols]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(dtype=torch.float32, memory_format=memory_format)
        return x.mul_(self._scale).add_(self._shift)
