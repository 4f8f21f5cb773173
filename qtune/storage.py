"""Where files live: local paths, or any ``pyarrow`` / ``fsspec`` filesystem URI.

A *location* is a string: a local path (``/data/sft``, ``file:///data/sft``) or a URI
(``s3://bucket/sft?endpoint_override=host:9000``, ``gs://…``, ``hdfs://…``, ``abfs://…``,
or any protocol an installed ``fsspec`` implementation knows). URIs pyarrow knows natively go
through ``pyarrow.fs.FileSystem.from_uri``; others through ``fsspec`` wrapped as a pyarrow
filesystem, so the rest of qtune sees one API. Query parameters stay part of the location (a
Ray task on another node rebuilds the same filesystem from the string alone); credentials come
from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``…) as the filesystems read it.

Object stores have no rename: remote files are written with one PUT each (atomic for readers);
publication order (data first, manifests and ``LATEST`` last) keeps versions consistent.
"""

from __future__ import annotations

import functools
import glob as local_glob
import io
import os
import posixpath
import re
import shutil
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(OSError):
    """A location that cannot be resolved to a filesystem (unknown protocol, bad URI)."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than ``file`` (a Windows drive letter is not one)."""
    text = str(location)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    return len(scheme) > 1 and scheme.lower() != "file"


def _local(location: str | os.PathLike) -> str:
    text = str(location)
    return text[len("file://") :] if text.startswith("file://") else text


def _split(location: str | os.PathLike):
    # No fragments: "#" is an ordinary character in object keys.
    return urlsplit(str(location), allow_fragments=False)


def has_magic(location: str | os.PathLike) -> bool:
    """Whether a location is a glob. In a URI only its path counts (``?`` starts the query
    there, so use ``*`` or ``[…]`` as wildcards)."""
    path = _split(location).path if is_remote(location) else str(location)
    return local_glob.has_magic(path)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location / part / …``; a URI keeps its query after the joined path."""
    if not is_remote(location):
        return str(Path(_local(location)).joinpath(*parts))
    split = _split(location)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def name(location: str | os.PathLike) -> str:
    if not is_remote(location):
        return Path(_local(location)).name
    return _split(location).path.rstrip("/").rsplit("/", 1)[-1]


def without_query(location: str) -> str:
    """The location as shown to people and hashed for cache keys: no endpoint options, no
    credentials (``user:secret@``)."""
    if not is_remote(location):
        return str(location)
    split = _split(location)
    host = split.netloc.rsplit("@", 1)[-1]
    return urlunsplit((split.scheme, host, split.path, "", ""))


@functools.lru_cache(maxsize=64)
def _filesystem_for(root: str) -> pafs.FileSystem:
    try:
        filesystem, _ = pafs.FileSystem.from_uri(root)
        return filesystem
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as native_error:
        try:
            import fsspec
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs, _ = fsspec.core.url_to_fs(root)
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"{without_query(root)}: no filesystem for this URI (pyarrow: {native_error}; "
                f"fsspec: {e}); install the fsspec implementation of its protocol"
            ) from e
        return PyFileSystem(FSSpecHandler(fs))


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``location`` and the path inside it."""
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(_local(location)).absolute())
    split = _split(location)
    # The filesystem depends on scheme, host/bucket and options, not on the path: cache by those.
    filesystem = _filesystem_for(urlunsplit((split.scheme, split.netloc, "", split.query, "")))
    host = split.netloc.rsplit("@", 1)[-1]  # credentials in the URI are the filesystem's
    return filesystem, f"{host}{split.path}".rstrip("/") or "/"


def _info(location: str) -> pafs.FileInfo:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(_local(location)).exists()
    return _info(str(location)).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(_local(location)).is_dir()
    return _info(str(location)).type == pafs.FileType.Directory


def is_file(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return Path(_local(location)).is_file()
    return _info(str(location)).type == pafs.FileType.File


def size(location: str | os.PathLike) -> int:
    if not is_remote(location):
        return Path(_local(location)).stat().st_size
    info = _info(str(location))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{without_query(str(location))}: no such file")
    return int(info.size)


def list_files(location: str | os.PathLike) -> dict[str, int]:
    """Every file under a directory, recursively: ``{relative path with '/': size}``."""
    filesystem, root = resolve(location)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    prefix = root.rstrip("/") + "/"
    return {
        info.path[len(prefix) :]: int(info.size)
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and info.path.startswith(prefix)
    }


def normalize(location: str | os.PathLike) -> str:
    """A location in one canonical spelling, for comparing two of them: a local path absolute
    with symlinks resolved; a URI with its scheme in lower case, without credentials, query or
    trailing slash, and with ``.`` and ``..`` segments folded."""
    if not is_remote(location):
        return str(Path(_local(location)).resolve())
    split = _split(location)
    host = split.netloc.rsplit("@", 1)[-1]
    path = posixpath.normpath("/" + split.path.lstrip("/")).rstrip("/")
    return urlunsplit((split.scheme.lower(), host, path, "", ""))


def glob_base(pattern: str | os.PathLike) -> tuple[str, list[str]]:
    """A glob's literal base directory and the pattern's segments below it:
    ``data/*/x.jsonl`` -> (``data``, [``*``, ``x.jsonl``]). In a URI the base keeps its query."""
    remote = is_remote(pattern)
    split = _split(pattern)
    parts = split.path.strip("/").split("/") if remote else list(Path(_local(pattern)).parts)
    literal = next((i for i, p in enumerate(parts) if local_glob.has_magic(p)), len(parts))
    if not remote:
        return str(Path(*parts[:literal]) if literal else Path(".")), parts[literal:]
    path = "/" + "/".join(parts[:literal])
    return urlunsplit((split.scheme, split.netloc, path, split.query, "")), parts[literal:]


def glob(pattern: str) -> list[str]:
    """Files and directories matching a glob (``**`` spans directories), sorted."""
    if not is_remote(pattern):
        return sorted(local_glob.glob(_local(pattern), recursive=True))
    # The literal directories before the first wildcard are listed.
    base, rest = glob_base(pattern)
    base = join(base)
    wanted = "/".join(rest)
    matcher = _glob_regex(wanted)
    filesystem, root = resolve(base)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    matches = []
    for info in filesystem.get_file_info(selector):
        relative = info.path[len(root.rstrip("/")) + 1 :]
        if matcher.match(relative):
            matches.append(join(base, relative))
    return sorted(matches)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """glob.glob(recursive=True) semantics: ``*`` and ``?`` stay within a path segment,
    ``**/`` spans any number of directories (none included)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def open_input(location: str | os.PathLike) -> BinaryIO:
    """A buffered, seekable binary file (iterates by line) for reading."""
    if not is_remote(location):
        return open(_local(location), "rb")  # noqa: SIM115 (the caller closes it)
    filesystem, path = resolve(location)
    return io.BufferedReader(filesystem.open_input_file(path), buffer_size=1 << 20)


def parquet_file(location: str | os.PathLike) -> pq.ParquetFile:
    if not is_remote(location):
        return pq.ParquetFile(_local(location))
    filesystem, path = resolve(location)
    return pq.ParquetFile(filesystem.open_input_file(path))


def read_table(location: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    filesystem, path = resolve(location)
    return pq.read_table(path, columns=columns, filesystem=filesystem)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: one PUT on an object store (readers see all of it or none)."""
    filesystem, path = resolve(location)
    if not is_remote(location):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def read_bytes(location: str | os.PathLike) -> bytes:
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def download(location: str, target: Path) -> None:
    """Copy a remote file to a local path, renamed into place once complete."""
    filesystem, path = resolve(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with filesystem.open_input_stream(path) as source, open(tmp, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 22)
    os.replace(tmp, target)


def upload(source: Path, location: str) -> None:
    filesystem, path = resolve(location)
    with open(source, "rb") as reader, filesystem.open_output_stream(path) as sink:
        shutil.copyfileobj(reader, sink, 1 << 22)


def remove(location: str | os.PathLike) -> None:
    """Delete a file; a missing one is fine."""
    if not is_remote(location):
        Path(_local(location)).unlink(missing_ok=True)
        return
    filesystem, path = resolve(location)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass


def remove_tree(location: str | os.PathLike) -> None:
    """Delete a directory and everything in it; a missing one is fine."""
    if not is_remote(location):
        shutil.rmtree(_local(location), ignore_errors=True)
        return
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        filesystem.delete_dir(path)
