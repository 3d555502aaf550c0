"""The fast paths of the backup streams: gzip members with a length field, parallel gunzip with a
sequential fallback for other gzip files, block reads, read-ahead, compact .qcow2 output."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
from pathlib import Path

import pytest

from qsnap.backup import export_snapshot, verify_backup
from qsnap.backup.source import SourceReader
from qsnap.backup.streams import (
    GZ_HEAD_SIZE,
    AsyncHash,
    ChunkReader,
    ParallelGzipWriter,
    member_size,
    parallel_gunzip,
    prefetch,
)

from .conftest import run, snap, write


def _payload() -> bytes:
    text = b"".join(b"line %d of some text\n" % i for i in range(40000))
    return os.urandom(300_000) + text + bytes(500_000)


def _compress(data: bytes, block: int = 256 << 10) -> bytes:
    out = io.BytesIO()
    writer = ParallelGzipWriter(out, 6, threads=2, block=block)
    for k in range(0, len(data), 70_001):  # odd write sizes: members do not align with writes
        writer.write(data[k : k + 70_001])
    writer.close()
    return out.getvalue()


def _members(blob: bytes) -> list[int]:
    sizes, at = [], 0
    while at < len(blob):
        size = member_size(blob[at : at + GZ_HEAD_SIZE])
        assert size is not None
        sizes.append(size)
        at += size
    return sizes


def test_every_member_records_its_length_and_gzip_reads_the_stream(tmp_path: Path) -> None:
    data = _payload()
    blob = _compress(data)
    assert len(_members(blob)) > 3 and sum(_members(blob)) == len(blob)
    assert gzip.decompress(blob) == data
    path = tmp_path / "x.gz"
    path.write_bytes(blob)
    assert subprocess.run(["gunzip", "-c", str(path)], check=True, capture_output=True).stdout == data


def test_parallel_gunzip_matches_and_falls_back_for_foreign_gzip() -> None:
    data = _payload()
    ours = _compress(data)
    assert b"".join(parallel_gunzip(io.BytesIO(ours).read, threads=2)) == data
    foreign = gzip.compress(data)  # no QS field: sequential path
    assert member_size(foreign[:GZ_HEAD_SIZE]) is None
    assert b"".join(parallel_gunzip(io.BytesIO(foreign).read)) == data
    mixed = ours + foreign  # switches to the sequential path midway
    assert b"".join(parallel_gunzip(io.BytesIO(mixed).read)) == data + data


@pytest.mark.parametrize("where", ["length field", "body", "trailer", "cut"])
def test_parallel_gunzip_rejects_damage(where: str) -> None:
    blob = bytearray(_compress(_payload()))
    first = _members(bytes(blob))[0]
    if where == "length field":
        blob[GZ_HEAD_SIZE - 4] ^= 0x01
    elif where == "body":
        blob[first // 2] ^= 0x10
    elif where == "trailer":
        blob[first - 6] ^= 0x01  # CRC32 of the first member
    else:
        del blob[-10:]
    with pytest.raises(ValueError):
        b"".join(parallel_gunzip(io.BytesIO(bytes(blob)).read, threads=2))


def test_chunk_reader_and_async_hash() -> None:
    reader = ChunkReader(iter([b"abc", b"", b"defgh", b"i"]))
    assert [reader.read(2), reader.read(4), reader.read(10), reader.read(1)] == [b"ab", b"cdef", b"ghi", b""]
    import hashlib

    data = os.urandom(1 << 20)
    with AsyncHash() as digest:
        for k in range(0, len(data), 100_000):
            digest.update(data[k : k + 100_000])
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_prefetch_passes_items_errors_and_stops_early() -> None:
    assert list(prefetch(iter(range(50)))) == list(range(50))

    def failing():  # type: ignore[no-untyped-def]
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(failing()))
    produced: list[int] = []

    def counting():  # type: ignore[no-untyped-def]
        for i in range(10_000):
            produced.append(i)
            yield i

    gen = prefetch(counting(), depth=2)
    assert next(gen) == 0
    gen.close()  # stops the thread instead of reading everything
    assert len(produced) < 100


def test_block_reads_equal_cluster_reads_on_a_fragmented_image(tmp_path: Path) -> None:
    """Guest order != host order (written backwards): blocks must still hold guest order."""
    path = tmp_path / "frag.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M")
    for k in reversed(range(0, 12)):
        write(path, 0x40 + k, f"{k}M", "512k")
    with SourceReader(path) as reader:
        indices = list(reader.mapping.data_indices())
        expected = b"".join(data for _, data in reader.iter_clusters(indices))
        for block in (64 << 10, 300 << 10, 4 << 20):
            blocks = list(reader.iter_blocks(indices, block))
            assert sum(n for n, _ in blocks) == len(indices)
            assert b"".join(data for _, data in blocks) == expected


def test_plain_qcow2_backup_is_compact_and_equals_the_snapshot(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.qcow2"
    result = export_snapshot(image, snap(image, "later"), out)
    assert result.method == "stream" and result.manifest["payload"]["layout"] == "qsnap-stream-v1"
    assert result.sha256 == result.payload_sha256
    flat = tmp_path / "flat.qcow2"
    run("qemu-img", "convert", "-l", f"snapshot.id={snap(image, 'later').id}", "-O", "qcow2", str(image), str(flat))
    assert subprocess.run(["qemu-img", "compare", "-q", str(flat), str(out)]).returncode == 0
    report = verify_backup(out)
    assert report.ok


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_decompression_output_is_bounded_and_cuts_are_caught(kind: str) -> None:
    """64 MiB of zeros compress to a few KiB: output comes in <= 4 MiB pieces; a cut stream fails."""
    import zstandard

    from qsnap.backup.streams import gunzip_chunks, unzstd_chunks

    data = os.urandom(1 << 20) + bytes(64 << 20) + b"end"
    if kind == "zstd":
        blob = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data) + \
            zstandard.ZstdCompressor().compress(b"+frame")
        decompress = unzstd_chunks
    else:
        blob = gzip.compress(data) + gzip.compress(b"+frame")
        decompress = gunzip_chunks

    def chunks(b: bytes):  # type: ignore[no-untyped-def]
        for k in range(0, len(b), 100_000):
            yield b[k : k + 100_000]

    pieces = list(decompress(chunks(blob)))
    assert max(map(len, pieces)) <= 4 << 20 and b"".join(pieces) == data + b"+frame"
    for cut in (len(blob) - 1, len(blob) // 2):
        with pytest.raises(ValueError, match="truncated"):
            list(decompress(chunks(blob[:cut])))


def _zstd(data: bytes, block: int = 256 << 10) -> bytes:
    from qsnap.backup.streams import ZstdWriter

    out = io.BytesIO()
    writer = ZstdWriter(out, 3, threads=2, block=block)
    for k in range(0, len(data), 70_001):  # frames do not align with writes
        writer.write(data[k : k + 70_001])
    writer.close()
    return out.getvalue()


def _zstd_frames(blob: bytes) -> list[int]:
    """The compressed sizes announced by the pzstd size frames, checked against the stream."""
    import struct

    sizes, at = [], 0
    while at < len(blob):
        magic, length, size = struct.unpack_from("<III", blob, at)
        assert (magic, length) == (0x184D2A50, 4)
        sizes.append(size)
        at += 12 + size
    assert at == len(blob)
    return sizes


def test_zstd_frames_are_independent_announced_and_read_by_the_zstd_cli(tmp_path: Path) -> None:
    import zstandard

    data = _payload()
    blob = _zstd(data)
    assert len(_zstd_frames(blob)) > 3
    path = tmp_path / "x.zst"
    path.write_bytes(blob)
    assert subprocess.run(["zstd", "-d", "-c", str(path)], check=True, capture_output=True).stdout == data
    # each frame says how much it holds: one block, give or take the write that completed it
    assert 256 << 10 <= zstandard.frame_content_size(blob[12:]) < (256 << 10) + 70_001


def test_parallel_unzstd_matches_and_falls_back_for_foreign_zstd() -> None:
    import zstandard

    from qsnap.backup.streams import parallel_unzstd

    data = _payload()
    ours = _zstd(data)
    assert b"".join(parallel_unzstd(io.BytesIO(ours).read, threads=2)) == data
    # one frame of unknown size, as `zstd` writes from a pipe: the sequential path
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    foreign = cobj.compress(data) + cobj.flush()
    assert zstandard.frame_content_size(foreign) == -1
    assert b"".join(parallel_unzstd(io.BytesIO(foreign).read)) == data
    mixed = ours + foreign  # switches to the sequential path midway
    assert b"".join(parallel_unzstd(io.BytesIO(mixed).read, threads=2)) == data + data


@pytest.mark.parametrize("where", ["size frame", "frame body", "checksum", "cut in a frame", "cut after a size frame"])
def test_parallel_unzstd_rejects_damage(where: str) -> None:
    from qsnap.backup.streams import parallel_unzstd

    blob = bytearray(_zstd(_payload()))
    first = _zstd_frames(bytes(blob))[0]
    if where == "size frame":
        blob[8] ^= 0x01  # the announced length of the first frame
    elif where == "frame body":
        blob[12 + first // 2] ^= 0x10
    elif where == "checksum":
        blob[12 + first - 1] ^= 0x01  # the frame's content checksum
    elif where == "cut in a frame":
        del blob[-10:]
    else:
        blob = blob[: 12 + first + 12]
    with pytest.raises(ValueError):
        b"".join(parallel_unzstd(io.BytesIO(bytes(blob)).read, threads=2))


def _announced(frame: bytes, size: int | None = None) -> bytes:
    import struct

    return struct.pack("<III", 0x184D2A50, 4, len(frame) if size is None else size) + frame


@pytest.mark.parametrize("case", ["two frames in one", "junk after the frame", "empty frame with junk"])
def test_parallel_unzstd_wants_exactly_one_frame_per_announcement(case: str) -> None:
    import zstandard

    from qsnap.backup.streams import parallel_unzstd

    one = zstandard.ZstdCompressor(write_checksum=True).compress(b"a" * 100_000)
    two = zstandard.ZstdCompressor(write_checksum=True).compress(b"b" * 100_000)
    if case == "two frames in one":
        blob = _announced(one + two)
    elif case == "junk after the frame":
        blob = _announced(one + b"junk")
    else:  # a frame header saying "0 bytes of content" (single segment), then garbage
        blob = _announced(b"\x28\xb5\x2f\xfd\x20\x00" + os.urandom(64))
    with pytest.raises(ValueError):
        b"".join(parallel_unzstd(io.BytesIO(blob).read, threads=2))


def test_big_announced_frames_and_members_do_not_inflate_whole() -> None:
    """A few KiB that announce 64 MiB per frame (not qsnap's): the sequential reader, whose
    pieces are at most 4 MiB, takes them, so memory does not grow with the core count. A QS
    gzip member (only qsnap writes them) that inflates beyond what qsnap puts in one is damage."""
    import zstandard

    from qsnap.backup.streams import parallel_unzstd

    zeros = bytes(64 << 20)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(zeros)
    pieces = list(parallel_unzstd(io.BytesIO(_announced(frame) * 3).read, threads=2))
    assert max(map(len, pieces)) <= 4 << 20 and sum(map(len, pieces)) == 3 * len(zeros)
    member = _compress(zeros, block=128 << 20)  # one QS member of 64 MiB
    assert len(_members(member)) == 1
    with pytest.raises(ValueError, match="damaged"):
        b"".join(parallel_gunzip(io.BytesIO(member * 2).read, threads=2))
