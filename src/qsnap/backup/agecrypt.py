"""Streaming age (https://age-encryption.org/v1) passphrase encryption on top of pyrage.

pyrage streams only to X25519 recipients; its passphrase mode holds the whole file in memory.
The age payload (a 16-byte nonce + ChaCha20-Poly1305 STREAM) depends only on the file key,
not on the header, so qsnap lets pyrage encrypt the stream to a throw-away X25519 identity,
opens that one stanza itself (X25519 + HKDF + ChaCha20-Poly1305 of 16 bytes, all from the
``cryptography`` package, imported lazily so ``qsnap list`` does not load it) and writes a
standard ``scrypt`` stanza for the passphrase instead, with the header MAC recomputed.
Decryption does the reverse. The result is an ordinary age file:
``age -d backup.qcow2.zst.age | zstd -d > disk.qcow2`` or ``rage -d`` open it.

Spec references: age v1 (header, stanzas, HKDF labels), RFC 7748 (X25519),
RFC 8439 (ChaCha20-Poly1305), RFC 5869 (HKDF), RFC 7914 (scrypt, via hashlib).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

INTRO = b"age-encryption.org/v1\n"
SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
X25519_LABEL = b"age-encryption.org/v1/X25519"
#: scrypt work factor; 2**17 * 128 * 8 = 128 MiB of memory (age's default 18 needs 256 MiB).
SCRYPT_LOG_N = 17
MAX_SCRYPT_LOG_N = 22


class AgeError(Exception):
    """The age data is damaged or the passphrase is wrong."""


# --------------------------------------------------------------------- primitives

def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    if b"=" in text:
        raise AgeError("padded base64 in age header")
    return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA-256 (RFC 5869); an empty SALT means the all-zero salt, as in age."""
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


def _x25519_public(secret: bytes) -> bytes:
    """The X25519 public key (u-coordinate) of the 32-byte scalar SECRET (RFC 7748)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def _x25519_shared(secret: bytes, peer: bytes) -> bytes:
    """X25519(SECRET, PEER); AgeError for a malformed or low-order PEER (all-zero result)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    try:
        return X25519PrivateKey.from_private_bytes(secret).exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as exc:
        raise AgeError(f"invalid X25519 share in age header ({exc})") from exc


def seal(key: bytes, plaintext: bytes) -> bytes:
    """ChaCha20-Poly1305 with a zero nonce and no associated data (age's wrapping)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key).encrypt(bytes(12), plaintext, None)


def open_sealed(key: bytes, sealed: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    if len(sealed) != 32:  # a 16-byte file key + 16-byte tag, in both stanza types
        raise AgeError("malformed age stanza body")
    try:
        return ChaCha20Poly1305(key).decrypt(bytes(12), sealed, None)
    except InvalidTag:
        raise AgeError("wrong passphrase or damaged age header") from None


# --------------------------------------------------------------------- header handling

def _parse_header(header: bytes) -> tuple[list[tuple[list[bytes], bytes]], bytes, bytes]:
    """Split an age header into stanzas [(args, body)], the MAC'd text, and the MAC."""
    if not header.startswith(INTRO):
        raise AgeError("not an age file (missing age-encryption.org/v1 header)")
    lines = header[len(INTRO) :].split(b"\n")
    stanzas: list[tuple[list[bytes], bytes]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(b"--- "):
            mac_text = header[: header.rindex(b"\n--- ") + 4]
            return stanzas, mac_text, _unb64(line[4:])
        if not line.startswith(b"-> "):
            raise AgeError("malformed age header")
        args = line[3:].split(b" ")
        body = b""
        i += 1
        while True:
            body_line = lines[i]
            body += body_line
            i += 1
            if len(body_line) < 64:
                break
        stanzas.append((args, _unb64(body)))
    raise AgeError("age header has no MAC line")


def _stanza(args: list[bytes], body: bytes) -> bytes:
    text = _b64(body)
    wrapped = b"\n".join(text[i : i + 64] for i in range(0, len(text), 64)) if text else b""
    if len(text) % 64 == 0:
        wrapped += b"\n" if text else b""
    return b"-> " + b" ".join(args) + b"\n" + wrapped + b"\n"


def _finish_header(stanzas: bytes, file_key: bytes) -> bytes:
    text = INTRO + stanzas + b"---"
    mac = hmac.new(hkdf(file_key, b"", b"header"), text, hashlib.sha256).digest()
    return text + b" " + _b64(mac) + b"\n"


def _scrypt_key(passphrase: str, salt: bytes, log_n: int) -> bytes:
    return hashlib.scrypt(
        passphrase.encode(), salt=SCRYPT_LABEL + salt, n=1 << log_n, r=8, p=1,
        maxmem=130 * 8 * (1 << log_n) + (1 << 20), dklen=32,
    )


def x25519_to_scrypt(header: bytes, secret: bytes, passphrase: str, log_n: int = SCRYPT_LOG_N) -> bytes:
    stanzas = [s for s in _parse_header(header)[0] if s[0][0] == b"X25519"]  # drop grease stanzas
    if len(stanzas) != 1:
        raise AgeError("expected one X25519 stanza from pyrage")
    share = _unb64(stanzas[0][0][1])
    recipient = _x25519_public(secret)
    wrap_key = hkdf(_x25519_shared(secret, share), share + recipient, X25519_LABEL)
    file_key = open_sealed(wrap_key, stanzas[0][1])
    salt = os.urandom(16)
    body = seal(_scrypt_key(passphrase, salt, log_n), file_key)
    return _finish_header(_stanza([b"scrypt", _b64(salt), str(log_n).encode()], body), file_key)


def scrypt_to_x25519(header: bytes, passphrase: str, recipient: bytes) -> bytes:
    stanzas, mac_text, mac = _parse_header(header)
    if len(stanzas) != 1 or stanzas[0][0][0] != b"scrypt" or len(stanzas[0][0]) != 3:
        raise AgeError("this age file is not passphrase-encrypted (no single scrypt stanza)")
    salt = _unb64(stanzas[0][0][1])
    if len(salt) != 16:
        raise AgeError("malformed scrypt stanza (salt is not 16 bytes)")
    log_n_text = stanzas[0][0][2]
    if not log_n_text.isdigit() or log_n_text.startswith(b"0"):
        raise AgeError("malformed scrypt stanza (bad work factor)")
    log_n = int(log_n_text)
    if not 1 <= log_n <= MAX_SCRYPT_LOG_N:
        raise AgeError(f"scrypt work factor {log_n} is out of range")
    file_key = open_sealed(_scrypt_key(passphrase, salt, log_n), stanzas[0][1])
    expected = hmac.new(hkdf(file_key, b"", b"header"), mac_text, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise AgeError("age header MAC does not match (damaged header)")
    eph = os.urandom(32)
    share = _x25519_public(eph)
    wrap_key = hkdf(_x25519_shared(eph, recipient), share + recipient, X25519_LABEL)
    return _finish_header(_stanza([b"X25519", _b64(share)], seal(wrap_key, file_key)), file_key)


def _identity_secret(identity: Any) -> bytes:
    """The raw 32-byte scalar of a pyrage X25519 identity (Bech32 AGE-SECRET-KEY-1...)."""
    text = str(identity).lower()
    data = text[text.rindex("1") + 1 : -6]
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    acc, bits, out = 0, 0, bytearray()
    for ch in data:
        acc = (acc << 5) | charset.index(ch)
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    return bytes(out[:32])


# --------------------------------------------------------------------- streaming wrappers

class _HeaderRewriter:
    """Writer: buffers the age header, rewrites it with FN, then passes the payload through."""

    def __init__(self, target: Callable[[bytes], object], rewrite: Callable[[bytes], bytes]) -> None:
        self.target = target
        self.rewrite = rewrite
        self.buf = bytearray()
        self.done = False

    def write(self, data: bytes) -> int:
        if self.done:
            self.target(bytes(data))
            return len(data)
        self.buf += data
        end = self.buf.find(b"\n--- ")
        if end >= 0:
            nl = self.buf.find(b"\n", end + 5)
            if nl >= 0:
                self.target(self.rewrite(bytes(self.buf[: nl + 1])))
                rest = bytes(self.buf[nl + 1 :])
                self.buf.clear()
                self.done = True
                if rest:
                    self.target(rest)
        elif len(self.buf) > 1 << 16:
            raise AgeError("age header is too long")
        return len(data)

    def flush(self) -> None:
        pass


class AgeEncryptWriter:
    """Write plaintext in; age-encrypted bytes (passphrase/scrypt) come out through TARGET.

    pyrage pulls from a reader, so it runs in a thread reading a pipe that :meth:`write` fills.
    """

    def __init__(self, target: Callable[[bytes], object], passphrase: str) -> None:
        import pyrage

        identity = pyrage.x25519.Identity.generate()
        secret = _identity_secret(identity)
        self._out = _HeaderRewriter(target, lambda h: x25519_to_scrypt(h, secret, passphrase))
        rfd, wfd = os.pipe()
        self._reader = os.fdopen(rfd, "rb")
        self._writer = os.fdopen(wfd, "wb")
        self._error: BaseException | None = None

        def work() -> None:
            try:
                pyrage.encrypt_io(self._reader, self._out, [identity.to_public()])
            except BaseException as exc:
                self._error = exc
            finally:
                self._reader.close()

        self._thread = threading.Thread(target=work, name="qsnap-age", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> int:
        try:
            self._writer.write(data)
        except BrokenPipeError:
            self._thread.join()
            raise AgeError(f"age encryption failed: {self._error}") from self._error
        return len(data)

    def close(self) -> None:
        self._writer.close()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._writer.close()
        self._thread.join()


class _PrefixReader:
    """Reader: the rewritten header, then the rest of SOURCE."""

    def __init__(self, source: Any, passphrase: str, recipient: bytes) -> None:
        self.source = source
        head = bytearray()
        while b"\n--- " not in head or not head.endswith(b"\n"):
            if len(head) > 1 << 16:
                raise AgeError("age header is too long or missing")
            byte = source.read(1)
            if not byte:
                raise AgeError("age file ends inside its header (truncated)")
            head += byte
        self.prefix = scrypt_to_x25519(bytes(head), passphrase, recipient)

    def read(self, size: int = -1) -> bytes:
        if self.prefix:
            if size is None or size < 0:
                out, self.prefix = self.prefix + bytes(self.source.read()), b""
            else:
                out, self.prefix = self.prefix[:size], self.prefix[size:]
            return out
        return bytes(self.source.read(size))

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def decrypt_stream(source: Any, sink: Callable[[bytes], object], passphrase: str) -> None:
    """Decrypt the passphrase-age stream SOURCE (a reader) into SINK; AgeError on any problem."""
    import pyrage

    identity = pyrage.x25519.Identity.generate()
    reader = _PrefixReader(source, passphrase, _x25519_public(_identity_secret(identity)))

    failure: list[BaseException] = []

    class _Sink:
        def write(self, data: bytes) -> int:
            try:
                sink(bytes(data))
            except BaseException as exc:
                failure.append(exc)
                raise
            return len(data)

        def flush(self) -> None:
            pass

    try:
        pyrage.decrypt_io(reader, _Sink(), [identity])
    except (pyrage.DecryptError, OSError) as exc:
        if failure:
            raise failure[0] from None
        raise AgeError(f"age payload is damaged or truncated ({exc})") from exc
    if failure:
        raise failure[0]


def decrypted_chunks(source: Any, passphrase: str) -> Iterator[bytes]:
    """Yield the plaintext of the passphrase-age stream SOURCE (decryption runs in a thread)."""
    import queue

    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
    errors: list[BaseException] = []
    stop = threading.Event()

    def put(block: bytes) -> None:
        while not stop.is_set():
            try:
                chunks.put(block, timeout=0.1)
                return
            except queue.Full:
                continue
        raise AgeError("stopped")

    def produce() -> None:
        try:
            decrypt_stream(source, put, passphrase)
        except BaseException as exc:
            errors.append(exc)
        finally:
            with contextlib.suppress(queue.Full):
                chunks.put(None, timeout=1)

    thread = threading.Thread(target=produce, name="qsnap-age-decrypt", daemon=True)
    thread.start()
    try:
        while True:
            block = chunks.get()
            if block is None:
                break
            yield block
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                chunks.get_nowait()
            thread.join(0.01)
    if errors:
        raise errors[0]
