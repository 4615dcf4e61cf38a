"""Where image folders live: a tree or a tarball, on a local path or any URI pyarrow.fs
reads (file://, s3://, gs://, hdfs://...), listed as the in-memory loader (imagefolder.py)
lists them, for the streamed loader (stream.py).

Also the small JSON cache of listings and scans (no pixels) and the memory figures the
`auto` loader rule compares. Every problem raises `DataError`; nothing runs at import.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnray.data.base import DataError, default_cache_dir, default_data_dir
from cnnray.data.decode import DECODER_ID
from cnnray.data.imagefolder import (
    IMAGE_EXTENSIONS, LAYOUT, SPLITS, check_one_root, hidden, is_archive, is_image_member, member_parts, split_classes,
    tar_errors,
)
from cnnray.errors import first_line

SCAN_VERSION = 1  # bump when what the cache stores changes


@dataclass(frozen=True)
class Item:
    """One image: its split, class and name (a path in the source's file system, or
    "archive:member" for a tarball)."""

    split: str
    cls: str
    name: str


@dataclass(frozen=True)
class Listing:
    """Every image of a source, in the in-memory loader's order: train then test, each
    sorted by (class, name)."""

    uri: str  # what the user passed, for messages
    path: str  # inside the file system
    archive: bool
    train: tuple[Item, ...]
    test: tuple[Item, ...]
    first_train: bytes  # the first train image's bytes: its size is every image's size

    @property
    def filesystem(self):  # noqa: ANN201 (a pyarrow.fs.FileSystem)
        return filesystem(self.uri)[0]


# --- listing ---------------------------------------------------------------------------


def filesystem(uri: str):  # noqa: ANN202
    import pyarrow.fs

    try:
        if "://" in uri:
            return pyarrow.fs.FileSystem.from_uri(uri)
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise DataError(f"cannot open data source {uri!r}: {first_line(e)}") from None


def source_uri(dataset: str, data_dir: str | None) -> str:
    """The data_dir to stream (the dataset's default folder when None)."""
    return data_dir if data_dir is not None else str(default_data_dir(dataset))


def _locate(uri: str) -> tuple[Any, str, bool]:
    """(file system, path, is a tarball): the tree or tarball at uri, or a folder's one tarball."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            if not is_archive(Path(path)):
                raise DataError(f"{uri} is not a .tar, .tar.gz or .tgz archive of {LAYOUT}")
            return fs, path, True
        if info.type == pafs.FileType.Directory:
            if fs.get_file_info(f"{path.rstrip('/')}/train").type == pafs.FileType.Directory:
                return fs, path, False
            entries = fs.get_file_info(pafs.FileSelector(path))
            archives = sorted(e.path for e in entries if e.type == pafs.FileType.File and is_archive(Path(e.path)))
            if len(archives) == 1:
                return fs, archives[0], True
            if len(archives) > 1:
                names = ", ".join(Path(a).name for a in archives)
                raise DataError(f"{uri} holds several archives ({names}); pass the one to use")
            raise DataError(f"{uri} holds no image folder; pass --data-dir pointing to a tree {LAYOUT}, or to a .tar.gz of it")
    except OSError as e:  # pyarrow's errors (permissions, network, bucket) are OSErrors
        raise DataError(f"cannot read data source {uri}: {first_line(e)}") from None
    raise DataError(f"{uri} does not exist; pass --data-dir pointing to a tree {LAYOUT}, or to a .tar.gz of it")


def _list_tree(fs: Any, root: str) -> tuple[list[Item], dict[str, tuple[int, int]]]:
    """Images at root/<split>/<class>/<file> (as imagefolder.list_dir), and each file's
    (size, mtime ns) for the cache key."""
    import pyarrow.fs as pafs

    items, stats = [], {}
    for split in SPLITS:
        base = f"{root.rstrip('/')}/{split}"
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            continue
        for e in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            rel = e.path[len(base) + 1:].split("/")
            if e.type != pafs.FileType.File or len(rel) != 2:
                continue
            cls, name = rel
            if hidden(cls) or hidden(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            items.append(Item(split, cls, e.path))
            stats[e.path] = (int(e.size or 0), int(e.mtime_ns or 0))
    return items, stats


def open_tar(fs: Any, path: str) -> tarfile.TarFile:
    # Stream mode: one sequential read, no seeking (object stores stream well).
    return tarfile.open(fileobj=fs.open_input_stream(path), mode="r|*")


def _list_tar(fs: Any, path: str, display: str) -> tuple[list[Item], bytes]:
    """The images of a tarball (as imagefolder.scan_tar), and the first train image's bytes."""
    items, prefixes = [], set()
    first: tuple[tuple[str, str], bytes] | None = None
    with tar_errors(display):
        with open_tar(fs, path) as tar:
            for member in tar:
                parts = member_parts(member.name)
                if not member.isfile() or not parts or not is_image_member(parts):
                    continue
                prefixes.add(parts[:-3])
                item = Item(parts[-3], parts[-2], f"{display}:{member.name}")
                items.append(item)
                if item.split == "train" and (first is None or (item.cls, item.name) < first[0]):
                    f = tar.extractfile(member)
                    first = ((item.cls, item.name), f.read() if f is not None else b"")
    check_one_root(prefixes, display)
    return items, first[1] if first else b""


def list_source(uri: str, cache_dir: Path | None = None) -> Listing:
    """Every image of the tree or tarball at `uri` (a path or a URI), sorted as the
    in-memory loader sorts them. A tarball's listing is cached (it costs a full read)."""
    fs, path, archive = _locate(uri)
    display = path if "://" not in uri else uri
    if archive:
        key = cache_key("listing", display, [file_stat(fs, path)])
        cached = cache_read(cache_dir, key)
        if cached is not None:
            items = [Item(*t) for t in cached["items"]]
            first = bytes.fromhex(cached["first"])
        else:
            items, first = _list_tar(fs, path, display)
            cache_write(cache_dir, key, {"items": [list(asdict(i).values()) for i in items], "first": first.hex()})
    else:
        items, _ = _list_tree(fs, path)
        first = b""
    train, test, _ = split_classes(items, uri)
    if not archive:
        first = read_bytes(fs, train[0].name)
    return Listing(uri, path, archive, tuple(train), tuple(test), first)


def read_bytes(fs: Any, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {first_line(e)}") from None


def file_stat(fs: Any, path: str) -> tuple[str, int, int]:
    info = fs.get_file_info(path)
    return (path, int(info.size or 0), int(info.mtime_ns or 0))


# --- memory, for the auto rule ------------------------------------------------------------------------------------


def memory_per_worker(workers: int) -> int:
    """Bytes each of `workers` workers on this machine may use: the memory available now
    (MemAvailable, or the cgroup's limit when lower) shared equally."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            avail = min(avail or int(limit), int(limit))
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail // max(1, workers)


def decoded_bytes(listing: Listing) -> int:
    """Upper bound of the decoded dataset's size: images x 3 x the first image's H x W."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(listing.first_train)) as img:
            w, h = img.size
    except Exception:  # an unreadable first image: the decode pass names it later
        w = h = 0
    return (len(listing.train) + len(listing.test)) * 3 * h * w


# --- the small cache of listings and scans ----------------------------------------------------


def cache_key(kind: str, source: str, stats: list[tuple[str, int, int]]) -> str:
    h = hashlib.sha256(f"cnnray-stream v{SCAN_VERSION} {kind} {DECODER_ID} {source}".encode())
    for path, size, mtime in stats:
        h.update(f"\0{path}\0{size}\0{mtime}".encode())
    return f"stream-{kind}-{h.hexdigest()[:24]}.json"


def cache_read(cache_dir: Path | None, key: str) -> dict[str, Any] | None:
    path = (cache_dir or default_cache_dir()) / key
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cache_write(cache_dir: Path | None, key: str, value: dict[str, Any]) -> None:
    """Atomic (write, then rename); a cache that cannot be written is only slower."""
    directory = cache_dir or default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, directory / key)
    except OSError:
        pass
