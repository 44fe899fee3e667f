"""Tar members read by limoe's header parser against webdataset's tarfile reader."""

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from limoe.data.tar_members import shard_samples

DEMO = Path(__file__).resolve().parents[2] / "data_shards"


def _webdataset_samples(url: str) -> list[dict]:
    return list(wds.tarfile_samples([{"url": url}]))


def _tar(path: Path, members: dict[str, bytes], format: int) -> str:
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


LONG = "d" * 120 + "/" + "k" * 90  # beyond the 100-byte name field: a pax path, GNU long name or ustar prefix
MEMBERS = {f"{LONG}.jpg": b"\xff\xd8 an image", f"{LONG}.txt": b"a caption", "short.txt": b"x" * 513,
           "__meta__/ignored.txt": b"metadata", "empty.txt": b""}


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_and_samples_are_the_ones_webdataset_reads(tmp_path, format):
    url = _tar(tmp_path / "00000.tar", MEMBERS, format)
    ours, theirs = list(shard_samples(url)), _webdataset_samples(url)
    assert ours == theirs
    assert [sample["__key__"] for sample in ours] == [LONG, "short", "empty"]


def test_demo_shards_gzipped_and_plain_read_the_same_as_webdataset(tmp_path):
    shard = str(DEMO / "heldout" / "00000.tar.gz")
    plain = tmp_path / "00000.tar"
    plain.write_bytes(gzip.decompress(Path(shard).read_bytes()))
    expected = [{k: v for k, v in s.items() if k != "__url__"} for s in _webdataset_samples(shard)]
    assert len(expected) > 100
    for url in (shard, str(plain)):
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in shard_samples(url)] == expected


def test_a_cut_or_corrupt_shard_raises_a_tar_error(tmp_path):
    whole = Path(_tar(tmp_path / "whole.tar", MEMBERS, tarfile.PAX_FORMAT)).read_bytes()
    cut, bad_header, bad_pax = tmp_path / "cut.tar", tmp_path / "bad_header.tar", tmp_path / "bad_pax.tar"
    cut.write_bytes(whole[:1800])
    bad_header.write_bytes(b"garbage!" + whole[8:])  # the first header's checksum no longer matches
    bad_pax.write_bytes(whole[:512] + b"garbage!" + whole[520:])  # its pax records
    for path in (cut, bad_header, bad_pax):
        with pytest.raises(tarfile.ReadError):
            list(shard_samples(str(path)))
