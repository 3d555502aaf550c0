#!/bin/sh
# qsnap's container entrypoint: QEMU runs the guide's Debian GNU/Hurd image the way the guide's
# container does (image bind-mounted at /opt/hurd-image/, HMP monitor on 9999, serial console on
# 5555, SSH forwarded from 2222), as a child of this script, which turns `docker stop` (SIGTERM)
# into an ACPI power-button press so the guest syncs its disk and powers off.
#
# Settings (environment): QEMU_IMAGE, QEMU_RAM (MiB), QEMU_SMP, QEMU_DISK_INTERFACE (ide|virtio),
# QEMU_ACCEL (auto|kvm|tcg), QEMU_KERNEL, QEMU_INITRD, QEMU_APPEND (a guest booted from a kernel
# file, e.g. qsnap's test guest), QEMU_EXTRA_ARGS (split on blanks), QEMU_POWERDOWN_TIMEOUT (s).
set -eu

image=${QEMU_IMAGE:-/opt/hurd-image/debian-hurd-amd64.qcow2}
if [ ! -f "$image" ]; then
    echo "qsnap-entrypoint: no image at $image: bind-mount the directory holding" \
         "debian-hurd-amd64.qcow2 on /opt/hurd-image (or set QEMU_IMAGE)" >&2
    exit 1
fi

# KVM only when /dev/kvm is the real KVM device (char 10:232) and not the software "PVM"
# module some hosts load (stock guest kernels fail or crawl under it): TCG otherwise.
accel=${QEMU_ACCEL:-auto}
if [ "$accel" = auto ]; then
    accel=tcg
    if [ -c /dev/kvm ] && [ -w /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ] \
        && [ "$(stat -L -c %t:%T /dev/kvm)" = "a:e8" ]; then
        accel=kvm
    fi
fi
cpu=max
[ "$accel" = kvm ] && cpu=host

mkdir -p /run/qemu /var/log/qemu
rm -f /run/qemu/qmp.sock /run/qemu/control.sock

set -- qemu-system-x86_64 \
    -name hurd-x86_64-qemu \
    -machine "pc,accel=$accel" -cpu "$cpu" \
    -m "${QEMU_RAM:-2048}" -smp "${QEMU_SMP:-2}" \
    -nodefaults -display none \
    -drive "file=$image,if=${QEMU_DISK_INTERFACE:-ide},format=qcow2" \
    -netdev user,id=net0,hostfwd=tcp::2222-:22 -device e1000,netdev=net0 \
    -chardev socket,id=serial0,host=0.0.0.0,port=5555,telnet=on,server=on,wait=off,logfile=/var/log/qemu/serial.log \
    -serial chardev:serial0 \
    -monitor telnet:0.0.0.0:9999,server,nowait \
    -qmp unix:/run/qemu/qmp.sock,server=on,wait=off \
    -qmp unix:/run/qemu/control.sock,server=on,wait=off
# 0.0.0.0 here is the container's own network namespace: the compose file publishes 9999 on the
# host's 127.0.0.1 only. qmp.sock is for qsnap inside the container (QSNAP_MONITOR);
# control.sock is this script's own (powerdown), so a user's session never blocks a clean stop.
[ -n "${QEMU_KERNEL:-}" ] && set -- "$@" -kernel "$QEMU_KERNEL"
[ -n "${QEMU_INITRD:-}" ] && set -- "$@" -initrd "$QEMU_INITRD"
[ -n "${QEMU_APPEND:-}" ] && set -- "$@" -append "$QEMU_APPEND"
# shellcheck disable=SC2086 # QEMU_EXTRA_ARGS is split on purpose
[ -n "${QEMU_EXTRA_ARGS:-}" ] && set -- "$@" $QEMU_EXTRA_ARGS

qmp() {  # qmp COMMAND: one QMP command on this script's control socket
    printf '{"execute":"qmp_capabilities"}\n{"execute":"%s"}\n' "$1" \
        | socat -t 2 - UNIX-CONNECT:/run/qemu/control.sock >/dev/null 2>&1 || true
}

qemu_pid=
stopping=
powerdown() {
    stopping=1
    [ -n "$qemu_pid" ] || exit 143
    echo "qsnap-entrypoint: stop requested: ACPI powerdown (the guest syncs and powers off)" >&2
    qmp system_powerdown
    limit=$(( ${QEMU_POWERDOWN_TIMEOUT:-45} * 10 ))
    i=0
    while kill -0 "$qemu_pid" 2>/dev/null && [ "$i" -lt "$limit" ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if kill -0 "$qemu_pid" 2>/dev/null; then
        echo "qsnap-entrypoint: the guest did not power off in time: quit" >&2
        qmp quit
        sleep 2
        kill -9 "$qemu_pid" 2>/dev/null || true
    fi
}
trap powerdown TERM INT

echo "qsnap-entrypoint: $* " >&2
"$@" &
qemu_pid=$!
status=0
# `wait` returns early when a trapped signal arrives: wait again until QEMU is gone.
while kill -0 "$qemu_pid" 2>/dev/null; do
    wait "$qemu_pid" && status=0 || status=$?
done
if [ -n "$stopping" ]; then
    exit 0
fi
exit "$status"
