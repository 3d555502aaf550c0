"""Backups to s3://BUCKET/KEY against a real S3 endpoint (moto's server, see conftest.py):
streamed multipart upload, manifest after the object, verify and import streamed back, listing,
archive with --keep-days, and the faults: a part rejected, the endpoint vanishing mid-upload,
wrong credentials, access denied, a missing bucket, an existing key, one flipped byte."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from offsite_testlib import Moto, random_image, s3_environ
from qsnap_testlib import (
    QSNAP,
    clean_environ,
    fingerprint,
    free_port,
    has_traceback,
    kill_popen,
    one_error_line,
    qemu_img,
    qemu_io,
    qsnap_main,
    run_qsnap,
)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return random_image(tmp_path)


def reference_raw(image: Path, snapshot: str, out: Path) -> Path:
    qemu_img("convert", "-U", "-l", f"snapshot.name={snapshot}", "-O", "raw", str(image), str(out))
    return out


def same_disk(image: Path, raw: Path) -> bool:
    return qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", str(image), str(raw), check=False).returncode == 0


def keys(moto: Moto, bucket: str, prefix: str = "") -> list[str]:
    reply = moto.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in reply.get("Contents", []))


def uploads(moto: Moto, bucket: str) -> list[dict[str, Any]]:
    return list(moto.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@pytest.mark.parametrize("suffix", [".qcow2.zst", ".qcow2.gz", ".qcow2", ".qcow2.zst.age"])
def test_backup_streams_to_s3_then_verify_and_import_stream_back(
    tmp_path: Path, disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str], suffix: str
) -> None:
    url = f"s3://{bucket}/vm/disk-base{suffix}"
    env = {**s3_env, "QSNAP_PASSPHRASE": "s3cret"}
    encrypt = ["--encrypt"] if suffix.endswith(".age") else []
    rc, out, err = qsnap_main(["-i", disk, "backup", "base", url, "--json", *encrypt], environ=env)
    assert rc == 0, err
    result = json.loads(out)
    assert result["output"] == url and result["manifest"] == url + ".json"
    assert keys(moto, bucket) == [f"vm/disk-base{suffix}", f"vm/disk-base{suffix}.json"]
    assert uploads(moto, bucket) == []
    head = moto.client().head_object(Bucket=bucket, Key=f"vm/disk-base{suffix}")
    assert head["ContentLength"] == result["size"]
    assert "-" in head["ETag"], "a multipart upload (the ETag of a single PUT has no part count)"
    manifest = json.loads(moto.client().get_object(Bucket=bucket, Key=f"vm/disk-base{suffix}.json")["Body"].read())
    assert manifest["tool"] == "qsnap" and manifest["file"] == f"disk-base{suffix}"
    assert manifest["source"]["snapshot"]["name"] == "base"

    rc, out, err = qsnap_main(["verify", url, "--against", disk, "--json"], environ=env)
    assert rc == 0, err
    checks = {c["name"]: c["ok"] for c in json.loads(out)["checks"]}
    assert checks["sha256"] and checks["payload sha256"] and checks["qemu-img check"] and checks["content"]

    restored = tmp_path / "restored.qcow2"
    rc, out, err = qsnap_main(["-i", restored, "import", url, "--yes"], environ=env)
    assert rc == 0, err
    assert same_disk(restored, reference_raw(disk, "base", tmp_path / "ref.raw"))
    assert qemu_img("check", str(restored), check=False).returncode == 0


def test_existing_key_exits_13_unless_force(disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str]) -> None:
    url = f"s3://{bucket}/disk.qcow2.zst"
    assert qsnap_main(["-i", disk, "backup", "base", url], environ=s3_env).rc == 0
    before = moto.client().head_object(Bucket=bucket, Key="disk.qcow2.zst")["ETag"]
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", url], environ=s3_env)
    assert rc == 13 and "already exists" in one_error_line(err)
    assert moto.client().head_object(Bucket=bucket, Key="disk.qcow2.zst")["ETag"] == before
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", url, "--force"], environ=s3_env)
    assert rc == 0, err


def test_missing_bucket_and_unreachable_endpoint_are_one_sentence(
    disk: Path, moto: Moto, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", "s3://no-such-bucket/disk.qcow2.zst"], environ=s3_env)
    assert rc == 7 and "bucket 'no-such-bucket' does not exist" in one_error_line(err)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", "s3://bkt/disk.qcow2.zst"],
                            environ={**s3_env, "AWS_ENDPOINT_URL": dead})
    assert rc == 7 and f"Cannot reach the S3 endpoint {dead}" in one_error_line(err)


def test_a_rejected_part_aborts_the_upload(
    disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str], s3_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = s3_proxy(reject_part=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", f"s3://{bucket}/disk.qcow2.zst"],
                            environ={**s3_env, "AWS_ENDPOINT_URL": proxy.url})
    assert rc == 7 and "Access denied" in one_error_line(err)
    assert keys(moto, bucket) == []  # no object, no manifest
    assert uploads(moto, bucket) == []  # the upload was aborted: no parts left billing anyone


def test_endpoint_gone_mid_upload_leaves_no_object_and_doctor_lists_the_upload(
    tmp_path: Path, disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str], s3_proxy: Any
) -> None:
    proxy = s3_proxy(vanish_after_parts=1)
    # a real process, so that nothing of the failed run survives in this one
    rc, out, err = run_qsnap("-i", disk, "backup", "base", f"s3://{bucket}/vm/disk.qcow2.zst",
                             env={**s3_env, "AWS_ENDPOINT_URL": proxy.url})
    assert rc == 7, err
    line = one_error_line(err)
    assert "Cannot reach the S3 endpoint" in line and "could not be aborted" in line
    assert f"qsnap doctor --target s3://{bucket}/vm/" in line
    assert keys(moto, bucket) == []  # neither object nor manifest is visible
    left = uploads(moto, bucket)
    assert [u["Key"] for u in left] == ["vm/disk.qcow2.zst"]
    rc, out, err = qsnap_main(["doctor", "--target", f"s3://{bucket}/vm/", "--json"], environ=s3_env,
                              cwd=tmp_path)
    report = json.loads(out)
    found = [c for c in report["checks"] if c["check"] == "target uploads"]
    assert found and found[0]["status"] == "warn" and "vm/disk.qcow2.zst" in found[0]["found"]
    assert left[0]["UploadId"] in json.dumps(found[0]["details"])


def test_ctrl_c_mid_upload_exits_130_and_aborts_the_upload(
    disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str], s3_proxy: Any
) -> None:
    proxy = s3_proxy(part_delay=1.0)  # a slow link: the upload is surely running when Ctrl-C comes
    proc = subprocess.Popen([str(QSNAP), "-i", str(disk), "backup", "base", f"s3://{bucket}/disk.qcow2.zst"],
                            env=clean_environ({**s3_env, "AWS_ENDPOINT_URL": proxy.url}), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proxy.first_part.wait(60), "no part was uploaded"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert not has_traceback(err)
    finally:
        kill_popen(proc)
    assert keys(moto, bucket) == []
    assert uploads(moto, bucket) == []


def test_one_flipped_byte_fails_verify_and_import_with_11(
    tmp_path: Path, disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str]
) -> None:
    url = f"s3://{bucket}/disk.qcow2.zst"
    assert qsnap_main(["-i", disk, "backup", "base", url], environ=s3_env).rc == 0
    s3 = moto.client()
    data = bytearray(s3.get_object(Bucket=bucket, Key="disk.qcow2.zst")["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key="disk.qcow2.zst", Body=bytes(data))
    rc, _, err = qsnap_main(["verify", url], environ=s3_env)
    assert rc == 11 and "failed verification" in one_error_line(err)
    before = fingerprint(disk)
    rc, _, err = qsnap_main(["-i", disk, "import", url, "--yes"], environ=s3_env)
    assert rc == 11, err
    assert fingerprint(disk) == before
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name or ".bak" in p.name]


def test_backups_list_shows_complete_and_incomplete(
    disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str]
) -> None:
    assert qsnap_main(["-i", disk, "backup", "base", f"s3://{bucket}/p/a.qcow2.zst"], environ=s3_env).rc == 0
    moto.client().put_object(Bucket=bucket, Key="p/b.qcow2.zst", Body=b"no manifest: an interrupted backup")
    rc, out, err = qsnap_main(["backups", "list", f"s3://{bucket}/p/", "--json"], environ=s3_env)
    assert rc == 0, err
    entries = {e["name"]: e for e in json.loads(out)["backups"]}
    assert entries["a.qcow2.zst"]["complete"] and entries["a.qcow2.zst"]["snapshot"] == "base"
    assert not entries["b.qcow2.zst"]["complete"]
    rc, out, _ = qsnap_main(["backups", "list", f"s3://{bucket}/p/"], environ=s3_env)
    assert "INCOMPLETE" in out and f"s3://{bucket}/p/a.qcow2.zst" in out


def test_archive_to_s3_prunes_only_old_qsnap_objects(
    disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str]
) -> None:
    s3 = moto.client()
    old = {"format_version": 1, "tool": "qsnap", "file": "old-20200101.qcow2.zst", "format": "qcow2.zst",
           "created_at": "2020-01-01T00:00:00Z", "size": 4, "sha256": "0" * 64,
           "source": {"image": str(disk.resolve()), "snapshot": None}}
    s3.put_object(Bucket=bucket, Key="arch/2020-01/old-20200101.qcow2.zst", Body=b"data")
    s3.put_object(Bucket=bucket, Key="arch/2020-01/old-20200101.qcow2.zst.json", Body=json.dumps(old).encode())
    s3.put_object(Bucket=bucket, Key="arch/notes.txt", Body=b"not qsnap's")
    rc, out, err = qsnap_main(["-i", disk, "archive", "--match", "b*", "--to", f"s3://{bucket}/arch/",
                               "--keep-days", "30", "--json"], environ=s3_env)
    assert rc == 0, err
    result = json.loads(out)
    assert len(result["created"]) == 1 and result["deleted"] == ["arch/2020-01/old-20200101.qcow2.zst"]
    left = keys(moto, bucket)
    assert "arch/notes.txt" in left and not any(k.startswith("arch/2020-01/") for k in left)
    made = [k for k in left if k.endswith(".qcow2.zst")]
    assert len(made) == 1 and made[0] + ".json" in left
    rc, out, err = qsnap_main(["-i", disk, "archive", "--match", "b*", "--to", f"s3://{bucket}/arch/", "--json"],
                              environ=s3_env)
    assert rc == 0 and len(json.loads(out)["skipped"]) == 1, err


@pytest.fixture
def moto_with_iam(tmp_path: Path) -> Any:
    """A moto server that checks credentials against its IAM: user 'backup' may use bucket
    'allowed' only. (Its own server: enabling authentication is server-wide.)"""
    setup_requests = 5  # the calls below; moto checks every request after them
    server = Moto(tmp_path / "moto-iam.log", {"INITIAL_NO_AUTH_ACTION_COUNT": str(setup_requests)})
    try:
        import boto3

        iam = boto3.client("iam", endpoint_url=server.url, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        iam.create_user(UserName="backup")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": [
            "arn:aws:s3:::allowed", "arn:aws:s3:::allowed/*"]}]}
        iam.put_user_policy(UserName="backup", PolicyName="only-allowed", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="backup")["AccessKey"]
        server.client().create_bucket(Bucket="allowed")
        server.client().create_bucket(Bucket="forbidden")
        yield server, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.stop()


def test_wrong_credentials_and_access_denied(
    disk: Path, moto_with_iam: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, key_id, secret = moto_with_iam
    good = s3_environ(server.url, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    cases = [
        ({**good, "AWS_SECRET_ACCESS_KEY": "wrong"}, "s3://allowed/d.qcow2.zst", "rejected the credentials"),
        ({**good, "AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"}, "s3://allowed/d.qcow2.zst", "rejected the credentials"),
        (good, "s3://forbidden/d.qcow2.zst", "Access denied"),
    ]
    for env, url, said in cases:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        rc, _, err = qsnap_main(["-i", disk, "backup", "base", url], environ=env)
        assert rc == 7 and said in one_error_line(err), (url, err)
    for key, value in good.items():
        monkeypatch.setenv(key, value)
    rc, _, err = qsnap_main(["-i", disk, "backup", "base", "s3://allowed/d.qcow2.zst"], environ=good)
    assert rc == 0, err


def test_credentials_never_appear_in_argv_or_output(disk: Path, bucket: str, s3_env: dict[str, str]) -> None:
    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": "very-secret-value"}
    rc, out, err = run_qsnap("-i", disk, "backup", "base", f"s3://{bucket}/x.qcow2.zst", "--json", env=env)
    assert rc == 0, err
    assert "very-secret-value" not in out + err


def test_incremental_to_s3_finds_its_base_by_manifest_and_verifies_and_imports_the_chain(
    tmp_path: Path, disk: Path, moto: Moto, bucket: str, s3_env: dict[str, str]
) -> None:
    full, later = f"s3://{bucket}/inc/full.qcow2", f"s3://{bucket}/inc/later.qcow2"
    assert qsnap_main(["-i", disk, "backup", "base", full], environ=s3_env).rc == 0
    qemu_io(disk, "write -P 0x77 2M 128k")
    qemu_img("snapshot", "-c", "later", str(disk))
    rc, out, err = qsnap_main(["-i", disk, "backup", "later", later, "--incremental", "--json"], environ=s3_env)
    assert rc == 0, err
    made = json.loads(out)
    assert made["incremental_base"] == "full.qcow2" and made["size"] < (2 << 20)
    rc, out, err = qsnap_main(["verify", later, "--json"], environ=s3_env)
    assert rc == 0, err
    report = json.loads(out)
    assert report["backup"] == later and report["chain"][:2] == ["later.qcow2", "inc/full.qcow2"]
    assert {c["name"] for c in report["checks"]} >= {"incremental base", "base full.qcow2", "qemu-img check"}
    restored = tmp_path / "restored.qcow2"
    rc, _, err = qsnap_main(["-i", restored, "import", later, "--yes"], environ=s3_env)
    assert rc == 0, err
    assert same_disk(restored, reference_raw(disk, "later", tmp_path / "later.raw"))
    assert qemu_img("info", "--output=json", str(restored)).stdout.count("backing-filename") == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qsnap-import-")]
    # a damaged base fails the incremental's verification
    s3 = moto.client()
    data = bytearray(s3.get_object(Bucket=bucket, Key="inc/full.qcow2")["Body"].read())
    data[-100] ^= 0x01
    s3.put_object(Bucket=bucket, Key="inc/full.qcow2", Body=bytes(data))
    rc, _, err = qsnap_main(["verify", later], environ=s3_env)
    assert rc == 11 and "base full.qcow2" in one_error_line(err)


def test_backups_list_of_a_local_directory(tmp_path: Path, disk: Path) -> None:
    out_dir = tmp_path / "backups"
    assert qsnap_main(["-i", disk, "backup", "base", out_dir / "a.qcow2.zst"]).rc == 0
    (out_dir / "stray.qcow2.zst").write_bytes(b"not a backup of qsnap's")
    rc, out, err = qsnap_main(["backups", "list", out_dir, "--json"])
    assert rc == 0, err
    [entry] = json.loads(out)["backups"]  # files without a qsnap manifest are not qsnap's
    assert entry["name"] == "a.qcow2.zst" and entry["complete"] and entry["snapshot"] == "base"
