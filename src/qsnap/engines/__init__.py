"""Engines that act on snapshots: qemu-img (VM stopped) and the QEMU monitor (VM running)."""
