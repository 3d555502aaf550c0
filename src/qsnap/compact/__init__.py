"""Compaction: rebuild a qcow2 image with QEMU's tools, keeping every internal snapshot.

plan.py (what each state writes, from the reader's tables), writer.py (qemu-img / qemu-io),
table.py (the snapshot table entries, the one structure written by hand), build.py (the
steps, the size prediction, the verification). The service (qsnap.service.compact) adds the
lock, the VM, the free-space check, the partial file and the atomic swap.
"""
