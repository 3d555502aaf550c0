"""Build the tiny real Linux test guest from Debian packages (see spec/TEST-GUEST.md).

Ingredients: the kernel package that ``linux-image-amd64`` depends on and
``busybox-static``, fetched with ``apt-get download`` (no root needed). Output, in a cache
directory reused across runs (``~/.cache/qsnap-test-guest/`` or ``$QSNAP_GUEST_CACHE``):

- ``vmlinux``          the ELF kernel decompressed from the bzImage (QEMU boots it via PVH,
                       skipping the BIOS and the in-guest decompressor: ~3 s to a shell);
- ``initrd.gz``        busybox + the virtio/ext4 modules + ``/init`` (newc cpio, gzip);
- ``disk.qcow2``       a 64 MiB ext2 filesystem (``mke2fs -t ext2``) holding ``hello.txt``;
- ``disk-hurd.qcow2``  the same made with ``mke2fs -o hurd`` (GNU/Hurd-style ext2).

The guest's ``/init`` mounts the disk (``/dev/vda``, virtio) on ``/mnt`` and prints
:data:`READY_MARKER` on the serial console, then runs a shell on it forever.

Every failure raises :class:`GuestBuildError` naming the step and what the tool said:
a machine that cannot build the guest must fail loudly, never skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

READY_MARKER = "QSNAP-GUEST-READY"
HELLO_TEXT = "hello from the qsnap test guest\n"
DISK_SIZE = "64M"
KERNEL_APPEND = "console=ttyS0 quiet loglevel=3 panic=-1"

#: Modules in load order (Debian has no modules.dep in the package and the guest no kmod).
MODULES: tuple[str, ...] = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "lib/crc16.ko",
    "fs/mbcache.ko",
    "crypto/crc32c_generic.ko",
    "fs/jbd2/jbd2.ko",
    "fs/ext4/ext4.ko",
    "drivers/input/evdev.ko",  # with button.ko: the ACPI power button reaches busybox acpid,
    "drivers/acpi/button.ko",  # so `qsnap vm stop` (system_powerdown) shuts the guest down
)

#: Run by busybox acpid on the ACPI power button: sync, then power off (QEMU exits).
POWER_BUTTON_SCRIPT = "#!/bin/sh\nsync\nexec poweroff -f\n"

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>/dev/console
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root PS1='# '
mount -t proc proc /proc
mount -t sysfs sysfs /sys
dmesg -n 1
for m in {" ".join(os.path.basename(m) for m in MODULES)}; do insmod /lib/modules/$m; done
acpid -c /etc/acpi -l /tmp/acpid.log
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done
if mount -t ext2 /dev/vda /mnt; then
  echo {READY_MARKER}
else
  echo QSNAP-GUEST-MOUNT-FAILED
fi
while true; do
  stty cols 4096 2>/dev/null
  setsid cttyhack sh
done
"""

# Anything that changes the artifacts changes this key (and so the cache entry).
RECIPE_VERSION = "2"


class GuestBuildError(RuntimeError):
    """The test guest could not be built (the message names the step and the evidence)."""


@dataclass(frozen=True)
class GuestBuild:
    """The built guest: boot files and pristine disks (never boot these disks directly:
    copy them first)."""

    directory: Path
    kernel: Path
    initrd: Path
    disk: Path
    disk_hurd: Path
    kernel_package: str
    append: str = KERNEL_APPEND


def default_cache_dir() -> Path:
    configured = os.environ.get("QSNAP_GUEST_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "qsnap-test-guest"


def _run(argv: Sequence[str], step: str, *, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(list(argv), cwd=cwd, input=stdin, capture_output=True, timeout=600, check=False)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{step}: program {argv[0]!r} is not installed ({exc}).") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestBuildError(f"{step}: {' '.join(argv)} did not finish in 600 s.") from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise GuestBuildError(f"{step}: {' '.join(map(str, argv))} exited {done.returncode}: {said}")
    return done.stdout


def kernel_package() -> str:
    """The versioned kernel package linux-image-amd64 depends on (from apt's cache)."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"], "finding the kernel package").decode()
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip() == "Depends" and value.strip().startswith("linux-image-"):
            return value.strip()
    raise GuestBuildError(
        f"finding the kernel package: `apt-cache depends linux-image-amd64` names none:\n{out}"
        "\n(run `apt-get update` with a Debian mirror configured)"
    )


def _download(packages: Sequence[str], debs: Path) -> dict[str, Path]:
    """``apt-get download`` PACKAGES into DEBS (skipped for .debs already there)."""
    debs.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing = []
    for package in packages:
        matches = sorted(debs.glob(f"{package}_*.deb"))
        if matches:
            found[package] = matches[-1]
        else:
            missing.append(package)
    if missing:
        _run(["apt-get", "download", *missing], "downloading " + ", ".join(missing), cwd=debs)
        for package in missing:
            matches = sorted(debs.glob(f"{package}_*.deb"))
            if not matches:
                raise GuestBuildError(f"apt-get download {package} produced no .deb in {debs}.")
            found[package] = matches[-1]
    return found


def _extract(deb: Path, wanted: dict[str, Path]) -> None:
    """Extract members of DEB's data archive: WANTED maps a member-name suffix to a
    destination file (streams ``dpkg-deb --fsys-tarfile``: no full unpack)."""
    pending = dict(wanted)
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as tar_stream:
        assert tar_stream.stdout is not None
        with tarfile.open(fileobj=tar_stream.stdout, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                for suffix, destination in list(pending.items()):
                    if member.name.endswith(suffix):
                        source = archive.extractfile(member)
                        assert source is not None
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        destination.write_bytes(source.read())
                        del pending[suffix]
                        break
                if not pending:
                    break
        tar_stream.stdout.close()
        tar_stream.kill()
    if pending:
        raise GuestBuildError(f"extracting {deb.name}: not found in the package: {', '.join(pending)}")


def decompress_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (xz payload: find the magic, decompress in Python)."""
    magic = b"\xfd7zXZ\x00"
    start = bzimage.find(magic)
    while start != -1:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(magic, start + 1)
    raise GuestBuildError("decompressing the kernel: no xz-compressed ELF vmlinux in the bzImage.")


def _initramfs(root: Path, busybox: Path, output: Path) -> None:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = ("\n".join(names) + "\n").encode()
    archive = _run([str(busybox), "cpio", "-o", "-H", "newc"], "packing the initramfs", cwd=root, stdin=listing)
    output.write_bytes(gzip.compress(archive, compresslevel=6))


def _disk(output: Path, content: Path, work: Path, *, hurd: bool) -> None:
    raw = work / ("disk-hurd.raw" if hurd else "disk.raw")
    argv = ["mke2fs", "-q", "-t", "ext2", "-d", str(content), "-F"]
    if hurd:
        argv += ["-o", "hurd"]
    _run([*argv, str(raw), DISK_SIZE], "making the ext2 disk" + (" (-o hurd)" if hurd else ""))
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(output)], "converting the disk")
    raw.unlink()


def _recipe_key(kernel_pkg: str) -> str:
    text = "\n".join([RECIPE_VERSION, kernel_pkg, INIT_SCRIPT, POWER_BUTTON_SCRIPT, *MODULES, DISK_SIZE, HELLO_TEXT])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _load(directory: Path) -> GuestBuild | None:
    try:
        meta = json.loads((directory / "build.json").read_text())
    except (OSError, ValueError):
        return None
    build = GuestBuild(
        directory=directory,
        kernel=directory / "vmlinux",
        initrd=directory / "initrd.gz",
        disk=directory / "disk.qcow2",
        disk_hurd=directory / "disk-hurd.qcow2",
        kernel_package=str(meta.get("kernel_package", "")),
    )
    if all(p.is_file() for p in (build.kernel, build.initrd, build.disk, build.disk_hurd)):
        return build
    return None


def build_guest(cache_dir: Path | None = None) -> GuestBuild:
    """Build the guest into CACHE_DIR, or return the build already there (same recipe and
    kernel). Safe against concurrent builders (a lock file; a finished build is renamed into
    place)."""
    cache = (cache_dir or default_cache_dir()).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestBuildError(f"creating the cache directory {cache}: {exc}") from exc
    kernel_pkg = kernel_package()
    final = cache / f"guest-{kernel_pkg.removeprefix('linux-image-')}-{_recipe_key(kernel_pkg)}"
    existing = _load(final)
    if existing is not None:
        return existing
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = _load(final)  # built by someone else while we waited
        if existing is not None:
            return existing
        with tempfile.TemporaryDirectory(prefix=".building-", dir=cache) as tmp:
            work = Path(tmp)
            _build_into(work, cache / "debs", kernel_pkg)
            if final.exists():
                shutil.rmtree(final)
            os.replace(work / "out", final)
    built = _load(final)
    if built is None:
        raise GuestBuildError(f"the guest build in {final} is incomplete.")
    return built


def _build_into(work: Path, debs_dir: Path, kernel_pkg: str) -> None:
    out = work / "out"
    out.mkdir()
    debs = _download([kernel_pkg, "busybox-static"], debs_dir)
    version = kernel_pkg.removeprefix("linux-image-")

    # Kernel and modules.
    extracted = work / "extracted"
    wanted = {f"/boot/vmlinuz-{version}": extracted / "vmlinuz"}
    for module in MODULES:
        wanted[f"/lib/modules/{version}/kernel/{module}"] = extracted / "modules" / os.path.basename(module)
    _extract(debs[kernel_pkg], wanted)
    (out / "vmlinux").write_bytes(decompress_vmlinux((extracted / "vmlinuz").read_bytes()))

    # initramfs: busybox, modules, /init.
    busybox = extracted / "busybox"
    _extract(debs["busybox-static"], {"/bin/busybox": busybox})
    busybox.chmod(0o755)
    root = work / "initramfs"
    for sub in ("bin", "dev", "proc", "sys", "mnt", "tmp", "root", "lib/modules"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for module in MODULES:
        name = os.path.basename(module)
        shutil.copy2(extracted / "modules" / name, root / "lib" / "modules" / name)
    power_button = root / "etc" / "acpi" / "PWRF" / "00000080"
    power_button.parent.mkdir(parents=True)
    power_button.write_text(POWER_BUTTON_SCRIPT)
    power_button.chmod(0o755)
    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    _initramfs(root, busybox, out / "initrd.gz")

    # Disks.
    content = work / "disk-content"
    content.mkdir()
    (content / "hello.txt").write_text(HELLO_TEXT)
    _disk(out / "disk.qcow2", content, work, hurd=False)
    _disk(out / "disk-hurd.qcow2", content, work, hurd=True)

    (out / "build.json").write_text(
        json.dumps(
            {
                "kernel_package": kernel_pkg,
                "kernel_deb": debs[kernel_pkg].name,
                "busybox_deb": debs["busybox-static"].name,
                "recipe": _recipe_key(kernel_pkg),
                "modules": list(MODULES),
            },
            indent=2,
        )
    )
    with contextlib.suppress(OSError):
        shutil.rmtree(extracted)


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/guest/builder.py
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(build_guest(target))
