"""Backups of a running guest's snapshot in every format, imported into fresh images that
boot and still hold the guest's files."""

from __future__ import annotations

import pytest
from qsnap_testlib import qemu_img, run_qsnap

from guest.builder import HELLO_TEXT
from guest.fixtures import Guest, GuestFactory

from .conftest import qsnap_ok

pytestmark = [pytest.mark.guest, pytest.mark.vm]

#: OUTPUT name -> extra `qsnap backup` options.
FORMATS: dict[str, tuple[str, ...]] = {
    "release.qcow2": (),
    "release.qcow2.gz": (),
    "release.qcow2.zst": (),
    "release.raw": (),
    "release-compressed.qcow2": ("--compress",),
}


def test_backup_every_format_imports_and_boots(running_guest: Guest, guest_factory: GuestFactory) -> None:
    guest, image = running_guest, running_guest.image
    work = image.parent
    guest.write_file("/mnt/release.txt", "release-1.0")
    guest.check("mkdir -p /mnt/etc; echo configured > /mnt/etc/app.conf; sync")
    assert "via qmp" in qsnap_ok("-i", image, "create", "release")
    guest.write_file("/mnt/release.txt", "after-the-release")  # not in the snapshot

    for output, options in FORMATS.items():  # while the VM runs: backups only read
        out = qsnap_ok("-i", image, "backup", "release", work / "backups" / output, *options)
        assert (work / "backups" / output).is_file(), out
        assert (work / "backups" / f"{output}.json").is_file()  # the manifest beside it
        assert " is OK " in qsnap_ok("verify", work / "backups" / output)
    assert guest.is_alive() and guest.read_file("/mnt/release.txt") == "after-the-release"

    imported = {}
    for n, output in enumerate(FORMATS):
        fresh = work / f"imported-{n}.qcow2"  # a new, empty image of another VM
        qemu_img("create", "-q", "-f", "qcow2", str(fresh), "64M")
        out = qsnap_ok("-i", fresh, "import", work / "backups" / output)
        assert f"Imported {work / 'backups' / output} into {fresh}" in out
        imported[output] = fresh
    # Every import holds the same guest data, byte for byte (qemu-img compare), and one cold
    # boot proves that data is the snapshot's guest (before the boot: booting writes to a disk).
    first, *others = FORMATS
    for output in others:
        same = qemu_img("compare", "-q", str(imported[first]), str(imported[output]), check=False)
        assert same.returncode == 0, f"{output}: {same.stdout}{same.stderr}"
    booted = guest_factory(disk=imported[first], name=imported[first].name)
    assert booted.read_file("/mnt/release.txt") == "release-1.0"
    assert booted.read_file("/mnt/etc/app.conf") == "configured\n"
    assert booted.read_file("/mnt/hello.txt") == HELLO_TEXT
    booted.kill()


def test_import_recreates_a_lost_image(running_guest: Guest, guest_factory: GuestFactory) -> None:
    """Disaster recovery: the image is gone, the backup is not. `qsnap -i IMAGE import BACKUP`
    writes IMAGE, and the guest boots from it."""
    guest, image = running_guest, running_guest.image
    guest.write_file("/mnt/release.txt", "release-1.0")
    qsnap_ok("-i", image, "create", "release")
    backup = image.parent / "release.qcow2.zst"
    qsnap_ok("-i", image, "backup", "release", backup)
    lost = image.parent / "lost.qcow2"
    rc, _, err = run_qsnap("-i", lost, "import", backup)
    assert rc == 0, err
    assert not list(image.parent.glob("lost.qcow2.bak-*"))  # nothing to keep: there was no image
    booted = guest_factory(disk=lost, name=lost.name)
    assert booted.read_file("/mnt/release.txt") == "release-1.0"
