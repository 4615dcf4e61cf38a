"""Image-folder datasets: `<root>/{train,test}/<class>/*.{png,jpg,jpeg,bmp}`, a dir or a tarball.

Archives are read member by member with tarfile, never extracted. Every image is decoded
once by cnnray's one image decoder (decode.py, which serving uses too) into one
preallocated uint8 array; cache.py keeps the result, keyed also on the decoder's version,
so a 60,000-JPEG tree costs its decode only on the first load on a node.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnray.data import cache
from cnnray.data.base import DataError, Dataset, dataset_from_arrays
from cnnray.data.decode import DECODER_ID, TRAINING_LIMITS, DecodeError, decode_image
from cnnray.paths import PathError, check_printable

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
SPLITS = ("train", "test")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_STATS_CHUNK = 4096  # images squared at a time for the std: 25 MB of uint16 for CIFAR

LAYOUT = "<root>/train/<class>/*.png|jpg|jpeg|bmp and <root>/test/<class>/..."


@dataclass(frozen=True)
class ImageItem:
    """One image file: its split and class, a display name, and a path or in-memory bytes."""

    split: str
    cls: str
    name: str  # a path, or "archive.tar.gz:member", for error messages
    path: Path | None = None
    data: bytes | None = None


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def hidden(name: str) -> bool:
    """Whether a file or folder name is not data (hidden files, macOS metadata)."""
    # ".DS_Store", macOS "._x.jpg" resource forks and "__MACOSX" trees are not images.
    return name.startswith(".") or name == "__MACOSX"


def find_root(data_dir: Path) -> Path | None:
    """The image-folder source at `data_dir`: itself (tree or tarball), or its single tarball."""
    if data_dir.is_file():
        return data_dir if is_archive(data_dir) else None
    if not data_dir.is_dir():
        return None
    if (data_dir / "train").is_dir():
        return data_dir
    archives = sorted(p for p in data_dir.iterdir() if p.is_file() and is_archive(p))
    if len(archives) > 1:
        names = ", ".join(p.name for p in archives)
        raise DataError(f"{data_dir} holds several archives ({names}); pass the one to use")
    return archives[0] if archives else None


def list_dir(root: Path) -> list[ImageItem]:
    """Every image under root/<split>/<class>/, in a deterministic order."""
    items = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for cls_entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not cls_entry.is_dir() or hidden(cls_entry.name):
                continue
            for entry in sorted(os.scandir(cls_entry.path), key=lambda e: e.name):
                name = entry.name
                if hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                if entry.is_file():
                    path = Path(entry.path)
                    items.append(ImageItem(split, cls_entry.name, entry.path, path=path))
    return items


def member_parts(name: str) -> tuple[str, ...]:
    """A tar member's path parts; () for a hidden one (never an image nor a wanted file)."""
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    return () if any(hidden(p) for p in parts) else parts


def is_image_member(parts: tuple[str, ...]) -> bool:
    """Whether a member (`member_parts`) is an image at .../<split>/<class>/<file>."""
    return (
        len(parts) >= 3
        and parts[-3] in SPLITS
        and os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS
    )


def split_classes(items: Sequence, source: str) -> tuple[list, list, list[str]]:
    """(train items, test items, class names) of a listing, for the in-memory and the
    streamed loader alike: each split sorted by (class, name), the classes being train's
    class folders. Items need `.split`, `.cls` and `.name`. DataError for an empty split,
    a class name that is not printable text, or a test class without a train folder."""
    train = sorted((it for it in items if it.split == "train"), key=lambda it: (it.cls, it.name))
    test = sorted((it for it in items if it.split == "test"), key=lambda it: (it.cls, it.name))
    if not train or not test:
        split = "train" if not train else "test"
        raise DataError(f"no {split} images found in {source}; expected {LAYOUT}")
    classes = sorted({it.cls for it in train})
    for name in classes:  # shown as typed in reports, logs and answers: printable text only
        try:
            check_printable(name, f"{source}: class folder")
        except PathError as e:
            raise DataError(str(e)) from None
    unknown = sorted({it.cls for it in test} - set(classes))
    if unknown:
        raise DataError(
            f"{source}: test classes {unknown} have no train folder; train classes are {classes}"
        )
    return train, test, classes


@contextlib.contextmanager
def tar_errors(display: str) -> Iterator[None]:
    """Reading the tarball `display`: its format and I/O errors become one-line DataErrors."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataError(f"{display} is not a readable tar archive ({exc})") from None
    except OSError as exc:
        raise DataError(f"cannot read {display}: {str(exc.strerror or exc).splitlines()[0]}") from None


def check_one_root(prefixes: set[tuple[str, ...]], display: str) -> None:
    """A tarball's image tree may sit under one top-level folder, not several (DataError)."""
    if len(prefixes) > 1:
        roots = ", ".join("/".join(p) or "." for p in sorted(prefixes))
        raise DataError(f"{display} holds several image-folder roots ({roots}); expected one")


def scan_tar(
    archive: Path, wanted: frozenset[str] = frozenset()
) -> tuple[list[ImageItem], dict[str, bytes]]:
    """One pass over a tarball: its images, and the members whose base name is in `wanted`.

    The tree may sit under a top-level folder (`CIFAR-10-images/train/...`), but only one.
    """
    items: list[ImageItem] = []
    extra: dict[str, bytes] = {}
    prefixes: set[tuple[str, ...]] = set()
    with tar_errors(str(archive)):
        # Stream mode ("r|*"): one sequential read, ~2x faster than random access here.
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = member_parts(member.name)
                if not parts:
                    continue
                is_image = is_image_member(parts)
                if parts[-1] not in wanted and not is_image:
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if parts[-1] in wanted:
                    extra.setdefault(parts[-1], data)
                else:
                    prefixes.add(parts[:-3])
                    items.append(
                        ImageItem(parts[-3], parts[-2], f"{archive}:{member.name}", data=data)
                    )
    check_one_root(prefixes, str(archive))
    return items, extra


def pixel_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel exact sums of the pixels and of their squares of uint8 N x C x H x W
    images, as uint64 (cannot overflow: 255**2 * 2**40 < 2**64), squared in uint16 chunks
    so that no float copy of the whole dataset is made."""
    total = x.sum(axis=(0, 2, 3), dtype=np.uint64)
    total_sq = np.zeros(x.shape[1], dtype=np.uint64)
    for start in range(0, len(x), _STATS_CHUNK):
        chunk = x[start : start + _STATS_CHUNK].astype(np.uint16)
        total_sq += np.square(chunk, out=chunk).sum(axis=(0, 2, 3), dtype=np.uint64)
    return total, total_sq


def stats_from_sums(total: np.ndarray, total_sq: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] pixel units from `pixel_sums` over `count` pixels
    per channel (N x H x W); the streamed loader adds sums batch by batch (cnnray.data.stream)."""
    count_f = float(max(count, 1))
    mean = total / count_f  # in 0..255 pixel units
    var = np.maximum(total_sq / count_f - mean**2, 0.0)
    return mean / 255.0, np.sqrt(var) / 255.0


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 N x C x H x W images, in [0, 1] pixel units."""
    total, total_sq = pixel_sums(x)
    return stats_from_sums(total, total_sq, x.shape[0] * x.shape[2] * x.shape[3])


def decode_images(items: Sequence[ImageItem], source: str) -> dict[str, np.ndarray]:
    """Decode all items into train/test uint8 arrays, labels, class names and stats.

    Classes are the sorted class folders of train. Each image is decoded by
    `cnnray.data.decode.decode_image` (as a viewer shows it); images are grayscale (C=1) if
    every image is, else RGB; all are resized (bilinear) to the first train image's size.
    Raises DataError naming the file for an unreadable image or one over TRAINING_LIMITS.
    """
    train, test, classes = split_classes(items, source)
    index = {c: i for i, c in enumerate(classes)}
    ordered = train + test
    out: np.ndarray | None = None
    size = (0, 0)  # (height, width) of the first train image
    all_gray = True
    for i, item in enumerate(ordered):
        try:
            data = item.data if item.data is not None else item.path.read_bytes()
            # The image's own channels (1 if a viewer shows it gray), at the first image's size.
            pixels = decode_image(data, None, size if out is not None else None, TRAINING_LIMITS)
        except DecodeError as exc:
            raise DataError(f"cannot read image {item.name}: {exc.message}") from None
        except OSError as exc:
            raise DataError(f"cannot read image {item.name}: {exc.strerror or exc}") from None
        if out is None:
            size = (pixels.shape[1], pixels.shape[2])
            # Three channels until every image is known to be gray; see below.
            out = np.empty((len(ordered), 3, *size), dtype=np.uint8)
        out[i] = pixels  # a gray 1 x H x W broadcasts onto the three channels, as L -> RGB does
        all_gray = all_gray and pixels.shape[0] == 1
    assert out is not None
    if all_gray:
        out = np.ascontiguousarray(out[:, :1])
    labels = np.array([index[it.cls] for it in ordered], dtype=np.int64)
    n = len(train)
    mean, std = _mean_std(out[:n])
    return {
        "train_x": out[:n],
        "train_y": labels[:n],
        "test_x": out[n:],
        "test_y": labels[n:],
        "classes": np.array(classes, dtype=str),  # a unicode array: no pickle needed
        "mean": mean,
        "std": std,
    }


def load_arrays(source: Path, cache_dir: Path, kind: str) -> dict[str, np.ndarray]:
    """Decoded arrays of an image-folder tree or tarball, from the cache when possible."""
    if is_archive(source) and source.is_file():
        # Keyed on the archive alone, so a cache hit does not even open it.
        return cache.cached_arrays(
            cache_dir, kind, [source], lambda: decode_images(scan_tar(source)[0], str(source)),
            decoder=DECODER_ID,
        )
    try:
        items = list_dir(source)
    except OSError as exc:
        raise DataError(f"cannot list {source}: {exc.strerror or exc}") from exc
    if not items:
        raise DataError(f"no images found in {source}; expected {LAYOUT}")
    paths = [it.path for it in items if it.path is not None]
    return cache.cached_arrays(
        cache_dir, kind, paths, lambda: decode_images(items, str(source)), decoder=DECODER_ID
    )


def load_imagefolder(data_dir: Path, *, cache_dir: Path) -> Dataset:
    """Load an image-folder dataset; mean and std are computed from its train images."""
    source = find_root(data_dir)
    if source is None:
        what = "does not exist" if not data_dir.exists() else "holds no image folder"
        raise DataError(
            f"imagefolder: {data_dir} {what}; pass --data-dir pointing to a tree {LAYOUT}, "
            "or to a .tar.gz of it"
        )
    arrays = load_arrays(source, cache_dir, "imagefolder")
    classes = [str(c) for c in arrays["classes"]]
    return dataset_from_arrays("imagefolder", arrays, classes, arrays["mean"], arrays["std"])
