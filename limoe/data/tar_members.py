"""Samples of a tar shard, each member's header parsed once.

webdataset reads shards with Python's `tarfile`, which builds a full TarInfo per header and, for
the pax extended header webdataset's TarWriter puts before every member, parses the pax records
with regular expressions and then reads and parses the member's own header again: on 256 px JPEGs
that was about a ninth of a data worker's time. Shards are read front to back once, so this reads
the 512-byte headers itself (`tarfile`'s own `nti`, `nts` and `calc_chksums` for the fields),
taking a member's path and size from its pax records or GNU long name when there are any, and
hands the members to webdataset's `url_opener` and `group_by_keys` as its tar expander would.

A header whose checksum is wrong or a member cut short raises `tarfile.ReadError`, which the
loaders count as a broken shard. `.tar.gz` and `.tgz` shards (by name) are read through gzip.
"""

from __future__ import annotations

import gzip
import re
import tarfile
from typing import BinaryIO, Iterator

from webdataset.tariterators import group_by_keys, url_opener

BLOCK = 512
REGULAR_FILES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them
GZIP_SUFFIXES = (".gz", ".tgz")


def shard_samples(url: str) -> Iterator[dict]:
    """webdataset samples ({"__key__", "__url__", extension: bytes, …}) of the shard at `url` (a
    path, `pipe:` command or URL, opened by webdataset)."""
    for source in url_opener([{"url": url}]):
        stream = source["stream"]
        try:
            members = tar_members(gzip.GzipFile(fileobj=stream) if url.endswith(GZIP_SUFFIXES) else stream, url)
            yield from group_by_keys(members)
        finally:
            stream.close()


def tar_members(stream: BinaryIO, url: str) -> Iterator[dict]:
    """{"fname", "data", "__url__"} for each regular file in the tar `stream`, in order."""
    path, size = None, None  # from a pax header or GNU long name, for the member that follows
    while True:
        header = _read(stream, BLOCK, allow_end=True)
        if not header.strip(b"\0"):  # the end-of-archive zero block, or the end of the stream
            return
        checksum = tarfile.nti(header[148:156])
        if checksum != sum(header[:148]) + sum(header[156:]) + 256 and checksum not in tarfile.calc_chksums(header):
            raise tarfile.ReadError(f"bad tar header checksum in {url}")  # (the unsigned sum is the usual one)
        kind = header[156:157]
        length = size if size is not None else tarfile.nti(header[124:136])
        data = _read(stream, length)
        _read(stream, -length % BLOCK)  # padding to the block
        if kind == tarfile.XHDTYPE:
            records = _pax_records(data)
            path, size = records.get(b"path", b"").decode("utf-8") or None, int(records.get(b"size", -1))
            size = None if size < 0 else size
            continue
        if kind == tarfile.GNUTYPE_LONGNAME:
            path = tarfile.nts(data, "utf-8", "surrogateescape")
            continue
        name = path or _header_name(header)
        path, size = None, None
        if kind in REGULAR_FILES and not META.match(name):
            yield {"fname": name, "data": data, "__url__": url}


def _read(stream: BinaryIO, length: int, allow_end: bool = False) -> bytes:
    data = stream.read(length) if length else b""
    if len(data) != length and not (allow_end and not data):
        raise tarfile.ReadError(f"unexpected end of tar data: {len(data)} of {length} bytes")
    return data


def _header_name(header: bytes) -> str:
    """The name field, after the POSIX ustar prefix field where the header has one."""
    name = tarfile.nts(header[0:100], "utf-8", "surrogateescape")
    if header[257:263] == tarfile.POSIX_MAGIC[:6] and header[345] != 0:
        return tarfile.nts(header[345:500], "utf-8", "surrogateescape") + "/" + name
    return name


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """`"%d %s=%s\\n"` records: each starts with its own length in bytes."""
    records, position = {}, 0
    try:
        while position < len(data) and data[position] != 0:
            space = data.index(b" ", position)
            length = int(data[position:space])
            key, _, value = data[space + 1 : position + length - 1].partition(b"=")
            records[key] = value
            position += max(length, 1)
    except ValueError:
        raise tarfile.ReadError("unreadable pax extended header") from None
    return records
