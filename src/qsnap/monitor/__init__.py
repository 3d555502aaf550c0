"""Talking to a running QEMU's monitor (QMP or HMP): transport → protocol → operations.

    from qsnap.monitor import connect
    with connect("unix:/run/vm/qmp.sock") as mon:      # or "telnet:localhost:9999", "9999"
        mon.save("before-upgrade")
        mon.list_snapshots()

Knows nothing about image files on the host: matching a monitor's images to a file is the
engine adapter's job (:mod:`qsnap.engines.monitor`). ``qemu.qmp`` is imported lazily.
"""

from __future__ import annotations

from qsnap.core.errors import DiskOnlySnapshot
from qsnap.monitor.address import MonitorAddress, address_from, parse_address
from qsnap.monitor.operations import (
    BlockImage,
    HmpMonitor,
    Monitor,
    QmpMonitor,
    connect,
)

__all__ = [
    "BlockImage",
    "DiskOnlySnapshot",
    "HmpMonitor",
    "Monitor",
    "MonitorAddress",
    "QmpMonitor",
    "address_from",
    "connect",
    "parse_address",
]
