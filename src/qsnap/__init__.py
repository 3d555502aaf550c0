"""qsnap: manage the internal snapshots of QEMU qcow2 images, safely.

The library API lives in :mod:`qsnap.service` (the CLI is a thin shell over it)::

    from qsnap import service
    snaps = service.list_snapshots("disk.qcow2")
"""

__version__ = "0.1.0"
