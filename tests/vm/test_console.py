"""The serial console's telnet filter (pure). The console itself is tested on the real
guest in tests/guest/test_guest_smoke.py."""

from __future__ import annotations

from qsnap.vm.console import _TelnetFilter


def test_telnet_negotiation_is_stripped_even_when_split_across_reads() -> None:
    stream = b"\xff\xfb\x01\xff\xfb\x03\xff\xfd\x00# \xff\xfa\x18\x01\xff\xf0ok\xff\xff!"
    whole = _TelnetFilter().feed(stream)
    assert whole == b"# ok\xff!"
    for cut in range(1, len(stream)):
        telnet = _TelnetFilter()
        assert telnet.feed(stream[:cut]) + telnet.feed(stream[cut:]) == whole
