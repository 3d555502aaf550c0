"""Fixtures for the real-guest tests: see fixtures.py."""

from .fixtures import guest_booted_image, guest_build, guest_factory, running_guest

__all__ = ["guest_booted_image", "guest_build", "guest_factory", "running_guest"]
