"""The real test guest (tests/guest): its disk is GNU/Hurd-style ext2 (``mke2fs -o hurd``), mounted by
the guest's Linux on /mnt. Files changed in the running guest between two live snapshots show up in
`qsnap diff --files`, read from the image while the VM still holds it (no root, no mount)."""

from __future__ import annotations

import json

import pytest
from qsnap_testlib import run_qsnap

from guest.fixtures import GuestFactory

pytestmark = [pytest.mark.guest, pytest.mark.vm, pytest.mark.timeout(600)]


def qsnap_ok(*args: object) -> str:
    result = run_qsnap(*args, timeout=240)
    assert result.rc == 0, f"qsnap {' '.join(map(str, args))} exited {result.rc}:\n{result.out}{result.err}"
    return result.out


def test_file_changed_in_the_guest_shows_in_diff_files(guest_factory: GuestFactory) -> None:
    guest = guest_factory(hurd=True)  # cold boot of the mke2fs -o hurd disk
    image = guest.image
    guest.write_file("/mnt/notes.txt", "first-version")  # printf > file; sync
    guest.write_file("/mnt/gone.txt", "to-be-removed")
    assert "via qmp" in qsnap_ok("-i", image, "create", "s1")
    guest.write_file("/mnt/notes.txt", "second-version-longer")
    guest.write_file("/mnt/new.txt", "brand-new")
    guest.check("rm /mnt/gone.txt; sync")
    assert "via qmp" in qsnap_ok("-i", image, "create", "s2")
    assert guest.is_alive()

    report = json.loads(qsnap_ok("-i", image, "diff", "s1", "s2", "--files", "--json"))
    changes = {c["path"]: c for c in report["changes"]}
    assert changes["/notes.txt"]["kind"] == "modified"
    assert {"content", "size"} <= set(changes["/notes.txt"]["changes"])
    assert changes["/new.txt"]["kind"] == "added"
    assert changes["/gone.txt"]["kind"] == "removed"
    assert set(changes) == {"/notes.txt", "/new.txt", "/gone.txt"}, changes

    listing = json.loads(qsnap_ok("-i", image, "ls", "s2:/", "--json"))
    assert listing["filesystem"]["creator_os"] == "Hurd"
    assert qsnap_ok("-i", image, "cat", "s1:/notes.txt") == "first-version"
    assert qsnap_ok("-i", image, "cat", "s2:/notes.txt") == "second-version-longer"
    assert qsnap_ok("-i", image, "fsck", "s2").count("is clean") == 1

    # the running VM's current state: read as it is on disk, with a warning saying so
    guest.write_file("/mnt/current.txt", "now")
    current = run_qsnap("-i", image, "ls", "@current:/", timeout=240)
    assert current.rc == 0, current.err
    assert "current.txt" in current.out.split()
    assert "mid-write" in current.err
