"""Review: one image reached by two spellings (symlink, `..`) must still be one image.

Every test here runs the real qemu-img / qsnap and fails on the code as reviewed.
"""

from __future__ import annotations

import json
from pathlib import Path

from qsnap_testlib import has_pattern, make_image, qemu_io, run_qsnap, snapshot_names


def test_backup_output_spelled_with_dotdot_does_not_replace_the_image(tmp_path: Path) -> None:
    """`backup NAME sub/../disk.qcow2 --force` is the image itself: refusing (exit 2) is
    what export.py:91 means to do, but it compares unresolved paths, so the image is
    replaced by a one-snapshot-less copy and every snapshot is lost."""
    image = make_image(tmp_path, snapshots=["keep1", "keep2"])
    (tmp_path / "sub").mkdir()
    rc, out, err = run_qsnap("-i", image, "backup", "keep1", "sub/../disk.qcow2", "--force", cwd=tmp_path)
    assert snapshot_names(image) == ["keep1", "keep2"], "the image's snapshots were destroyed"
    assert rc == 2, (rc, out, err)


def test_backup_output_symlinked_image_does_not_replace_the_image(tmp_path: Path) -> None:
    """-i through a symlink, OUTPUT the real file: still the image itself."""
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    image = make_image(real_dir, snapshots=["keep1", "keep2"])
    link = tmp_path / "link.qcow2"
    link.symlink_to(image)
    rc, out, err = run_qsnap("-i", link, "backup", "keep1", image, "--force", cwd=tmp_path)
    assert snapshot_names(image) == ["keep1", "keep2"], "the image's snapshots were destroyed"
    assert rc == 2, (rc, out, err)


def test_lock_is_shared_between_symlink_and_real_path(tmp_path: Path) -> None:
    """'One qsnap at a time per image': a qsnap working through a symlink must wait for one
    working through the real path. lock.py:lock_path keys the lock on the unresolved path,
    so the second command runs concurrently."""
    from qsnap.service.lock import image_lock

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    image = make_image(real_dir)
    link = tmp_path / "link.qcow2"
    link.symlink_to(image)
    with image_lock(image, "review test holds the lock", 1):
        rc, out, err = run_qsnap("-i", link, "create", "x", env={"QSNAP_LOCK_TIMEOUT": "1"}, cwd=tmp_path)
    assert rc == 8, (rc, out, err)
    assert snapshot_names(image) == []


def test_description_survives_symlink_spelling(tmp_path: Path) -> None:
    """The sidecar (descriptions) is keyed on the unresolved path: a description given
    through a symlink is invisible through the real path (and a stray sidecar, audit log
    and lock file appear beside the symlink)."""
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    image = make_image(real_dir)
    link = tmp_path / "link.qcow2"
    link.symlink_to(image)
    rc, out, err = run_qsnap("-i", link, "create", "a", "-m", "before upgrade", cwd=tmp_path)
    assert rc == 0, err
    rc, out, err = run_qsnap("-i", image, "list", "--json")
    assert rc == 0, err
    [entry] = json.loads(out)["snapshots"]
    assert entry["description"] == "before upgrade"


def test_import_through_symlink_replaces_the_real_image(tmp_path: Path) -> None:
    """`qsnap -i LINK import BACKUP` replaced the symlink itself with a regular file
    (importer.py: os.link/os.replace on the link): the real image — the one the VM boots —
    keeps its old content while qsnap says 'Imported ... into LINK' and names a .bak that is
    just another symlink to the unchanged real image."""
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    image = make_image(real_dir, snapshots=["s"], patterns={"s": 0x11})
    rc, _, err = run_qsnap("-i", image, "backup", "s", tmp_path / "bk.qcow2")
    assert rc == 0, err
    qemu_io(image, "write -P 0x22 0 1M")
    link = tmp_path / "link.qcow2"
    link.symlink_to(image)
    rc, _out, err = run_qsnap("-i", link, "import", tmp_path / "bk.qcow2", "--yes", cwd=tmp_path)
    assert rc == 0, err
    assert link.is_symlink(), "the symlink was replaced by a regular file"
    assert has_pattern(image, 0x11), "the real image was not imported into"
