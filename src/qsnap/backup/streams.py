"""Byte streams for backups: parallel gzip, multithreaded zstd, hashing, decompression.

Parallel gzip: the input is cut into blocks, each compressed in a thread (zlib releases
the GIL) as an independent gzip member; RFC 1952 section 2.2 says a gzip file is a series
of members, and ``gunzip`` concatenates them. Memory stays bounded by the number of blocks
in flight.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Protocol

GZIP_BLOCK = 4 << 20
READ_CHUNK = 4 << 20


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class HashingWriter:
    """Pass bytes to TARGET and hash them (the file's sha256)."""

    def __init__(self, target: Writable, on_bytes: Callable[[int], None] | None = None) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.on_bytes = on_bytes

    def write(self, data: bytes) -> int:
        self.target.write(data)
        self.sha256.update(data)
        self.size += len(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        return len(data)


def _gzip_member(data: bytes, level: int) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


class ParallelGzipWriter:
    """Write a gzip stream made of independently compressed members, one per block."""

    def __init__(self, target: Writable, level: int = 6, threads: int | None = None) -> None:
        self.target = target
        self.level = level
        self.threads = threads or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="qsnap-gzip")
        self.pending: deque[Future[bytes]] = deque()
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        while len(self.buf) >= GZIP_BLOCK:
            block = bytes(self.buf[:GZIP_BLOCK])
            del self.buf[:GZIP_BLOCK]
            self._submit(block)
        return len(data)

    def _submit(self, block: bytes) -> None:
        self.pending.append(self.pool.submit(_gzip_member, block, self.level))
        while len(self.pending) > 2 * self.threads:
            self.target.write(self.pending.popleft().result())

    def close(self) -> None:
        try:
            if self.buf or not self.pending:
                self._submit(bytes(self.buf))
                self.buf.clear()
            while self.pending:
                self.target.write(self.pending.popleft().result())
        finally:
            self.abort()

    def abort(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


class ZstdWriter:
    """Multithreaded zstandard (all cores) writing one frame into TARGET."""

    def __init__(self, target: Writable, level: int = 3) -> None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=level, threads=-1)
        self.writer: Any = cctx.stream_writer(target, closefd=False)  # type: ignore[arg-type]

    def write(self, data: bytes) -> int:
        self.writer.write(data)
        return len(data)

    def close(self) -> None:
        self.writer.flush(__import__("zstandard").FLUSH_FRAME)

    def abort(self) -> None:
        pass


def iter_file(handle: BinaryIO, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    while block := handle.read(chunk):
        yield block


def gunzip_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a (multi-member) gzip stream; raise ValueError if it is damaged or cut short."""
    decomp = zlib.decompressobj(31)
    started = False
    for chunk in chunks:
        data = chunk
        while data:
            started = True
            try:
                out = decomp.decompress(data)
            except zlib.error as exc:
                raise ValueError(f"gzip data is damaged: {exc}") from exc
            if out:
                yield out
            if decomp.eof:
                data = decomp.unused_data
                decomp = zlib.decompressobj(31)
                if not data:
                    started = False
            else:
                data = b""
    if started and not decomp.eof:
        raise ValueError("gzip stream is truncated")


def unzstd_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a zstandard stream (any number of frames); raise ValueError if damaged/cut."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    decomp = dctx.decompressobj()
    pending = False
    for chunk in chunks:
        data = chunk
        while data:
            try:
                out = decomp.decompress(data)
            except zstandard.ZstdError as exc:
                raise ValueError(f"zstd data is damaged: {exc}") from exc
            pending = True
            if out:
                yield out
            if decomp.eof:
                data = decomp.unused_data
                decomp = dctx.decompressobj()
                pending = False
            else:
                data = b""
    if pending:
        raise ValueError("zstd stream is truncated")
