#!/bin/sh
# The container's healthcheck: healthy once the guest is ready. It runs every second for the life
# of the container, so it is plain sh (a Python start each time would cost more CPU than QEMU idling).
# QSNAP_READY_SERIAL=REGEX (grep -E): ready once the serial console printed it (QEMU's log of the
# console holds everything since boot). Otherwise ready once the guest's SSH server sends its
# banner: not merely when QEMU's port forward accepts a connection, which it does even with no
# SSH server in the guest. (`qsnap vm wait --ssh` / `--serial-log` check the same from anywhere.)
if [ -n "${QSNAP_READY_SERIAL:-}" ]; then
    exec grep -qE -- "$QSNAP_READY_SERIAL" /var/log/qemu/serial.log
fi
banner=$(socat -T 3 -u TCP:127.0.0.1:2222,connect-timeout=2 - 2>/dev/null | head -c 4)
[ "$banner" = "SSH-" ]
