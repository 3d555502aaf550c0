"""S3-compatible object storage through boto3 (the AWS SDK for Python).

Endpoint, region and credentials come from boto3's standard configuration chain
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws/config`` and ``~/.aws/credentials``), never from qsnap's argv.

- :class:`MultipartSink`: a streamed upload. Bytes are cut into parts (8 MiB or more) that are
  uploaded by a small thread pool while the next part fills; at most ``parallel`` parts (and the
  one filling) are in memory. :meth:`MultipartSink.commit` completes the upload, which S3 makes visible
  atomically; any failure, and Ctrl-C, aborts it (no orphaned parts left billing the user).
  Uploads carry the metadata ``qsnap: <version>`` and are listed by ``qsnap doctor --target``.
- :class:`RangedReader`: an object read front to back with ranged GETs in flight in
  parallel, pinned to the object's ETag (an object replaced mid-read is an error, not a mix).
- :func:`s3_error`: botocore exceptions -> one-sentence :class:`TargetError` and friends.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import qsnap
from qsnap.backup.targets import S3Location
from qsnap.core.errors import Interrupted, OutputExists, QsnapError, TargetError

PART_SIZE = 8 << 20
MAX_PARTS = 10_000
# Parts uploading at once (8 MiB+ of memory each). Over a shaped 75 MB/s link (bench_offsite.py,
# 1 GiB): 3 -> 11.3-11.7 s, 6 -> 10.9 s, 10 -> 10.3 s for +13 / +31 MiB of peak memory; a real WAN
# link, where one TCP connection is bounded by its window over the round trip, gains more.
PARALLEL = 6
IN_FLIGHT_BYTES = 64 << 20  # at most this much of parts uploading at once (but 2 parts at least)
READ_PARALLEL = 3  # ranged GETs in flight (verify, import): 8 MiB each, decompressed behind them
READ_CHUNK = 8 << 20
UPLOAD_METADATA = "qsnap"


def _boto() -> tuple[Any, Any, Any]:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise QsnapError("boto3 is not installed; it is needed for s3:// targets.",
                         hint="pip install 'boto3>=1.34'") from exc
    return boto3, botocore.config, botocore.exceptions


def s3_error(exc: BaseException, what: str, location: S3Location | None = None) -> QsnapError:
    """A botocore error as the sentence a user can act on (credentials, endpoint, bucket...)."""
    _, _, errors = _boto()
    where = f" ({location})" if location is not None else ""
    if isinstance(exc, QsnapError):
        return exc
    if isinstance(exc, errors.NoCredentialsError | errors.PartialCredentialsError):
        return TargetError(f"No S3 credentials found while trying to {what}{where}.",
                           hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, errors.EndpointConnectionError | errors.ConnectionClosedError
                  | errors.ConnectTimeoutError | errors.ReadTimeoutError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        if not endpoint:
            from urllib.parse import urlsplit

            url = urlsplit(str(getattr(exc, "kwargs", {}).get("endpoint_url") or ""))
            endpoint = f"{url.scheme}://{url.netloc}" if url.netloc else "(default AWS endpoint)"
        return TargetError(f"Cannot reach the S3 endpoint {endpoint} to {what}{where}.",
                           hint="check AWS_ENDPOINT_URL and the network")
    if isinstance(exc, errors.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(error.get("Message") or code or status)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId",
                    "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidToken"):
            return TargetError(f"The S3 endpoint rejected the credentials while trying to {what}{where}: {message}.",
                               hint="check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if code == "NoSuchBucket" or (code == "404" and what.startswith("open the bucket")):
            bucket = location.bucket if location is not None else "?"
            return TargetError(f"The S3 bucket {bucket!r} does not exist.", hint="create it first")
        if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
            return TargetError(f"Access denied while trying to {what}{where}: {message}.",
                               hint="the credentials lack permission for this bucket or key")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return TargetError(f"There is no object {location}." if location else f"Not found: {message}.")
        return TargetError(f"S3 refused to {what}{where}: {code or status}: {message}.")
    if isinstance(exc, errors.BotoCoreError):
        return TargetError(f"S3 failed to {what}{where}: {exc}.")
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(f"Interrupted while trying to {what}{where}.")
    return TargetError(f"S3 failed to {what}{where}: {exc}.")


_lock = threading.Lock()
_clients: dict[tuple[str | None, ...], Any] = {}
#: The environment that decides which endpoint and credentials a client uses (its cache key).
_CONFIG_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
                     "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_MAX_ATTEMPTS")


def client() -> Any:
    """An S3 client from the standard AWS configuration chain, made once and shared by all
    threads (boto3 clients are thread-safe; making one per thread costs ~20 MiB and 0.1 s each)."""
    boto3, config, _ = _boto()
    key = tuple(os.environ.get(name) for name in _CONFIG_VARIABLES)
    with _lock:
        cached = _clients.get(key)
        if cached is not None:
            return cached
        session = boto3.session.Session()
        made = session.client(
            "s3",
            region_name=session.region_name or "us-east-1",
            config=config.Config(
                retries={"mode": "standard", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "3"))},
                max_pool_connections=2 * PARALLEL + 2,
                connect_timeout=10, read_timeout=60,
            ),
        )
        _clients.clear()
        _clients[key] = made
        return made


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: str = ""


class S3Target:
    """One bucket: the operations qsnap needs, with errors mapped to qsnap's."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.s3 = client()

    def where(self, key: str) -> S3Location:
        return S3Location(self.bucket, key)

    def check_bucket(self) -> None:
        """The bucket exists and the credentials work (before any byte is read or sent)."""
        try:
            self.s3.head_bucket(Bucket=self.bucket)
            return
        except Exception as exc:
            error = exc
        status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (400, 403):
            # a HEAD reply has no body, so no error code: wrong credentials and a denied
            # bucket look alike. A GET says which.
            try:
                self.s3.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                return
            except Exception as exc:
                error = exc
        raise s3_error(error, "open the bucket", self.where("")) from error

    def head(self, key: str) -> ObjectInfo | None:
        _, _, errors = _boto()
        try:
            reply = self.s3.head_object(Bucket=self.bucket, Key=key)
        except errors.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise s3_error(exc, "look up", self.where(key)) from exc
        except Exception as exc:
            raise s3_error(exc, "look up", self.where(key)) from exc
        return ObjectInfo(key, int(reply["ContentLength"]), str(reply["ETag"]), str(reply.get("LastModified", "")))

    def get_bytes(self, key: str) -> bytes | None:
        _, _, errors = _boto()
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
            return bytes(body.read())
        except errors.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise s3_error(exc, "read", self.where(key)) from exc
        except Exception as exc:
            raise s3_error(exc, "read", self.where(key)) from exc

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except Exception as exc:
            raise s3_error(exc, "write", self.where(key)) from exc

    def delete(self, key: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise s3_error(exc, "delete", self.where(key)) from exc

    def list_objects(self, prefix: str, *, recursive: bool = True) -> Iterator[ObjectInfo]:
        """Objects under PREFIX (only those directly in it unless RECURSIVE)."""
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"}))
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(str(item["Key"]), int(item["Size"]), str(item.get("ETag", "")),
                                     str(item.get("LastModified", "")))
        except Exception as exc:
            raise s3_error(exc, "list", self.where(prefix)) from exc

    def uploads(self, prefix: str) -> list[dict[str, str]]:
        """Unfinished multipart uploads under PREFIX (key, upload id, start time)."""
        found: list[dict[str, str]] = []
        try:
            pages = self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Uploads", []) or []:
                    found.append({"key": str(item["Key"]), "upload_id": str(item["UploadId"]),
                                  "initiated": str(item.get("Initiated", ""))})
        except Exception as exc:
            raise s3_error(exc, "list the unfinished uploads of", self.where(prefix)) from exc
        return found

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            raise s3_error(exc, "abort the upload of", self.where(key)) from exc

    def sink(self, key: str, *, force: bool = False, size_hint: int = 0) -> MultipartSink:
        """A streamed upload to KEY; OutputExists (13) if KEY (or its manifest) exists unless FORCE."""
        self.check_bucket()
        if not force and (self.head(key) is not None or self.head(key + ".json") is not None):
            raise OutputExists(f"Backup output {self.where(key)} already exists.", hint="use --force to replace it")
        return MultipartSink(self, key, size_hint=size_hint)

    def reader(self, key: str) -> RangedReader:
        info = self.head(key)
        if info is None:
            raise TargetError(f"There is no object {self.where(key)}.")
        return RangedReader(self, info)


class MultipartSink:
    """A multipart upload fed by :meth:`write`; see the module docstring."""

    def __init__(self, target: S3Target, key: str, *, size_hint: int = 0, parallel: int = PARALLEL) -> None:
        self.target = target
        self.key = key
        self.size = 0
        self.part_size = max(PART_SIZE, -(-size_hint // (MAX_PARTS - 100)))
        # memory stays bounded whatever the disk size: fewer parts in flight when they are larger
        # (huge disks need parts over 8 MiB to stay under 10,000 of them)
        parallel = max(2, min(parallel, IN_FLIGHT_BYTES // self.part_size))
        self.parallel = parallel
        self.upload_id: str | None = None
        self.pending = bytearray()
        self.parts: list[tuple[int, Future[str]]] = []
        self.slots = threading.BoundedSemaphore(parallel)  # parts submitted, not yet uploaded
        self.pool: ThreadPoolExecutor | None = None
        self.done = False
        self.abort_failed: str | None = None

    # the upload
    def _start(self) -> None:
        s3 = self.target.s3
        try:
            reply = s3.create_multipart_upload(Bucket=self.target.bucket, Key=self.key,
                                               Metadata={UPLOAD_METADATA: qsnap.__version__})
        except Exception as exc:
            raise s3_error(exc, "start the upload of", self.target.where(self.key)) from exc
        self.upload_id = str(reply["UploadId"])
        self.pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="qsnap-s3-part")

    def _upload(self, number: int, body: bytes | bytearray) -> str:
        try:
            reply = client().upload_part(Bucket=self.target.bucket, Key=self.key, PartNumber=number,
                                         UploadId=self.upload_id, Body=body)
            return str(reply["ETag"])
        finally:
            self.slots.release()

    def _raise_failed(self) -> None:
        for number, fut in self.parts:
            if fut.done() and fut.exception() is not None:
                exc = fut.exception()
                assert exc is not None
                raise s3_error(exc, f"upload part {number} of", self.target.where(self.key)) from exc

    def _send(self, body: bytes | bytearray) -> None:
        if self.upload_id is None:
            self._start()
        assert self.pool is not None
        while not self.slots.acquire(timeout=0.2):
            self._raise_failed()
        self._raise_failed()
        number = len(self.parts) + 1
        if number > MAX_PARTS:
            self.slots.release()
            raise TargetError(f"The upload of {self.target.where(self.key)} needs more than {MAX_PARTS} parts.")
        try:
            self.parts.append((number, self.pool.submit(self._upload, number, body)))
        except BaseException:
            self.slots.release()
            raise

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        n = len(data)
        if not n:
            return 0
        self.pending += data  # one growing buffer: no list of pieces joined into a second copy
        self.size += n
        if len(self.pending) >= self.part_size:
            body, self.pending = self.pending, bytearray()
            self._send(body)
        return n

    def commit(self) -> None:
        """Upload what is left and complete the upload: the object appears whole, or not at all."""
        body, self.pending = bytes(self.pending), bytearray()
        where = self.target.where(self.key)
        if self.upload_id is None:
            # smaller than one part: a single PUT is atomic too
            try:
                self.target.s3.put_object(Bucket=self.target.bucket, Key=self.key, Body=body,
                                          Metadata={UPLOAD_METADATA: qsnap.__version__})
            except Exception as exc:
                raise s3_error(exc, "upload", where) from exc
            self.done = True
            return
        if body:
            self._send(body)
        etags = []
        for number, fut in self.parts:
            try:
                etags.append({"PartNumber": number, "ETag": fut.result()})
            except Exception as exc:
                raise s3_error(exc, f"upload part {number} of", where) from exc
        try:
            self.target.s3.complete_multipart_upload(Bucket=self.target.bucket, Key=self.key,
                                                     UploadId=self.upload_id, MultipartUpload={"Parts": etags})
        except Exception as exc:
            raise s3_error(exc, "complete the upload of", where) from exc
        self.done = True
        self._shutdown()

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def abort(self) -> None:
        """Stop uploading and abort the multipart upload (its parts are deleted by S3)."""
        self.pending = bytearray()
        if self.done or self.upload_id is None:
            self._shutdown()
            return
        self._shutdown()
        try:
            self.target.s3.abort_multipart_upload(Bucket=self.target.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception as exc:  # the endpoint went away: say so, `qsnap doctor --target` finds it later
            self.abort_failed = str(s3_error(exc, "abort the upload of", self.target.where(self.key)))
        self.upload_id = None


class RangedReader:
    """Read an object front to back: ranged GETs of READ_CHUNK bytes, READ_PARALLEL in flight."""

    def __init__(self, target: S3Target, info: ObjectInfo, *, parallel: int = READ_PARALLEL,
                 chunk: int = READ_CHUNK) -> None:
        self.target = target
        self.info = info
        self.size = info.size
        self.chunk = chunk
        self.parallel = parallel
        self.next_offset = 0
        self.inflight: deque[Future[bytes]] = deque()
        self.buffer = memoryview(b"")
        self.pool = ThreadPoolExecutor(parallel, thread_name_prefix="qsnap-s3-get")
        self._fill()

    def _get(self, start: int, end: int) -> bytes:
        where = self.target.where(self.info.key)
        try:
            reply = client().get_object(Bucket=self.target.bucket, Key=self.info.key,
                                        Range=f"bytes={start}-{end - 1}", IfMatch=self.info.etag)
            data = bytes(reply["Body"].read())
        except Exception as exc:
            raise s3_error(exc, "read", where) from exc
        if len(data) != end - start:
            raise TargetError(f"S3 returned {len(data)} bytes of {where} where {end - start} were asked.")
        return data

    def _fill(self) -> None:
        while len(self.inflight) < self.parallel and self.next_offset < self.size:
            end = min(self.size, self.next_offset + self.chunk)
            self.inflight.append(self.pool.submit(self._get, self.next_offset, end))
            self.next_offset = end

    def read(self, n: int = -1, /) -> bytes:
        """Up to N bytes (all the rest when N < 0); fewer only at the end of the object, as a file."""
        pieces: list[bytes] = []
        wanted = self.size if n < 0 else n
        while wanted > 0:
            if not self.buffer:
                if not self.inflight:
                    break
                self.buffer = memoryview(self.inflight.popleft().result())
                self._fill()
            take = min(wanted, len(self.buffer))
            pieces.append(bytes(self.buffer[:take]))
            self.buffer = self.buffer[take:]
            wanted -= take
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        for fut in self.inflight:
            fut.cancel()
        self.inflight.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RangedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.close()
