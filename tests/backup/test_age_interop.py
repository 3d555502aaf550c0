"""qsnap's age encryption against the reference implementation (the real `age` 1.1.1 program).

age 1.1.1 reads passphrases only from a terminal (no AGE_PASSPHRASE, no batch mode), so these
tests give it a pseudo-terminal as stdin/stderr and type the passphrase at its prompt.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qsnap.backup import EncryptionSpec, export_snapshot
from qsnap.backup.agecrypt import SCRYPT_LOG_N, AgeError, decrypt_stream, decrypted_chunks

from .conftest import reads, run, snap

PROMPT = re.compile(rb"passphrase[^\n]*: ", re.IGNORECASE)


def age_on_a_tty(args: list[str], passphrase: str, prompts: int, timeout: float = 120) -> tuple[int, str]:
    """Run `age ARGS` with a pty as its terminal, type PASSPHRASE at its first PROMPTS prompts.

    Returns (exit status, what age wrote to the terminal)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(["age", *args], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    transcript = b""
    answered = 0
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: age exited and closed the terminal
                    chunk = b""
                if not chunk:
                    break
                transcript += chunk
                if answered < prompts and len(PROMPT.findall(transcript)) > answered:
                    os.write(master, passphrase.encode() + b"\n")
                    answered += 1
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()  # by PID: only the age process this helper started
            proc.wait()
        os.close(master)
    text = transcript.decode(errors="replace")
    assert answered == prompts, f"age showed {answered} of {prompts} passphrase prompts: {text}"
    return rc, text


def age_ok(args: list[str], passphrase: str, prompts: int) -> None:
    rc, text = age_on_a_tty(args, passphrase, prompts)
    assert rc == 0, f"age {' '.join(args)} failed ({rc}): {text}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["b.qcow2.zst.age", "b.qcow2.gz.age"])
def test_age_d_decrypts_a_qsnap_backup_to_the_exact_payload(image: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    result = export_snapshot(image, snap(image, "base"), out, encrypt=EncryptionSpec("correct horse"))
    assert result.manifest["encryption"] == {"scheme": "age-scrypt", "key": "passphrase",
                                             "scrypt_log_n": SCRYPT_LOG_N}
    compressed = tmp_path / "plain.compressed"
    age_ok(["-d", "-o", str(compressed), str(out)], "correct horse", prompts=1)
    payload = tmp_path / "payload.qcow2"
    if name.endswith(".zst.age"):
        run("zstd", "-q", "-d", str(compressed), "-o", str(payload))
    else:
        payload.write_bytes(subprocess.run(["gunzip", "-c", str(compressed)], check=True,
                                           capture_output=True).stdout)
    assert sha256(payload) == result.manifest["payload"]["sha256"]
    assert payload.stat().st_size == result.manifest["payload"]["size"]
    assert reads(payload, 0x11, "0", "1M")
    assert not reads(payload, 0x22, "1M", "512k")  # 'later' data is not in the 'base' backup


def test_age_d_refuses_a_qsnap_backup_with_the_wrong_passphrase(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.qcow2.zst.age"
    export_snapshot(image, snap(image, "base"), out, encrypt=EncryptionSpec("right"))
    rc, text = age_on_a_tty(["-d", "-o", str(tmp_path / "x"), str(out)], "wrong", prompts=1)
    assert rc != 0
    assert "incorrect passphrase" in text


def test_file_encrypted_by_age_p_decrypts_through_qsnap(tmp_path: Path) -> None:
    # 3 STREAM chunks of 64 KiB plus a partial one, so chunk counters and the last-chunk flag matter.
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(3 * 65536 + 1234))
    sealed = tmp_path / "plain.bin.age"
    age_ok(["-p", "-o", str(sealed), str(plain)], "pässphrase with spaces", prompts=2)
    assert sealed.read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")
    got = bytearray()
    with sealed.open("rb") as source:
        decrypt_stream(source, got.extend, "pässphrase with spaces")
    assert bytes(got) == plain.read_bytes()
    with sealed.open("rb") as source:
        assert b"".join(decrypted_chunks(source, "pässphrase with spaces")) == plain.read_bytes()
    with sealed.open("rb") as source, pytest.raises(AgeError, match="passphrase"):
        decrypt_stream(source, bytearray().extend, "pässphrase with space")


def test_qsnap_backup_stream_encrypted_by_age_p_decrypts_through_qsnap(image: Path, tmp_path: Path) -> None:
    backup = tmp_path / "b.qcow2.zst"
    export_snapshot(image, snap(image, "base"), backup)
    sealed = tmp_path / "b.qcow2.zst.age"
    age_ok(["-p", "-o", str(sealed), str(backup)], "s3cret", prompts=2)
    got = bytearray()
    with sealed.open("rb") as source:
        decrypt_stream(source, got.extend, "s3cret")
    assert bytes(got) == backup.read_bytes()


def test_damaged_age_header_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"payload")
    sealed = tmp_path / "plain.bin.age"
    age_ok(["-p", "-o", str(sealed), str(plain)], "pw", prompts=2)
    data = sealed.read_bytes()
    salt_at = data.index(b"-> scrypt ") + len(b"-> scrypt ")
    damaged = tmp_path / "damaged.age"
    damaged.write_bytes(data[:salt_at] + (b"B" if data[salt_at:salt_at + 1] == b"A" else b"A") + data[salt_at + 1:])
    with damaged.open("rb") as source, pytest.raises(AgeError):
        decrypt_stream(source, bytearray().extend, "pw")
    mac_at = data.index(b"\n--- ") + len(b"\n--- ")
    damaged.write_bytes(data[:mac_at] + (b"B" if data[mac_at:mac_at + 1] == b"A" else b"A") + data[mac_at + 1:])
    with damaged.open("rb") as source, pytest.raises(AgeError, match="MAC"):
        decrypt_stream(source, bytearray().extend, "pw")


def test_importing_agecrypt_does_not_load_cryptography() -> None:
    code = "import sys, qsnap.backup.agecrypt; print('cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
