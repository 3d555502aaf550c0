"""The monitor layer without QEMU: addresses, HMP byte streams (captured from QEMU 7.2),
text parsers, protocol detection, and image matching. Real-QEMU tests are in
test_monitor_live.py."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from qsnap.core.errors import InvalidName, MonitorError, UsageError
from qsnap.engines.monitor import match_image
from qsnap.monitor import BlockImage, MonitorAddress, address_from, parse_address
from qsnap.monitor.hmp import (
    HmpSession,
    TelnetStripper,
    parse_clock,
    parse_info_block,
    parse_info_snapshots,
    parse_size,
    parse_status,
    reply_error,
    split_reply,
    strip_telnet,
)
from qsnap.monitor.transport import detect_protocol

FIXTURES = Path(__file__).parent / "fixtures"


def captured(kind: str) -> dict[str, bytes]:
    data = json.loads((FIXTURES / f"hmp_{kind}_7.2.json").read_text())
    return {k: v.encode("latin-1") for k, v in data.items()}


# ---------------------------------------------------------------- addresses

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/vm/qmp.sock", MonitorAddress("unix", path="/run/vm/qmp.sock")),
        ("/run/vm/qmp.sock", MonitorAddress("unix", path="/run/vm/qmp.sock")),
        ("tcp:127.0.0.1:4444", MonitorAddress("tcp", host="127.0.0.1", port=4444)),
        ("telnet:0.0.0.0:9999,server,nowait", MonitorAddress("telnet", host="0.0.0.0", port=9999)),
        ("telnet::9999", MonitorAddress("telnet", host="localhost", port=9999)),
        ("vmhost:9999", MonitorAddress("tcp", host="vmhost", port=9999)),
        ("tcp:[::1]:4444", MonitorAddress("tcp", host="::1", port=4444)),
        ("9999", MonitorAddress("tcp", host="localhost", port=9999)),
    ],
)
def test_address_forms(text: str, expected: MonitorAddress) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "tcp:host", "tcp:host:http", "70000", "0", "host:99999", "udp:1.2.3.4:5", "a\nb:1", "::1:80",
             "unix:"],
)
def test_bad_address_is_a_usage_error_naming_its_source(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_address(text, "QSNAP_MONITOR")
    assert info.value.exit_code == 2
    assert "QSNAP_MONITOR" in str(info.value)
    assert "unix:/PATH" in str(info.value)  # the hint lists the accepted forms


def test_address_precedence_option_then_qsnap_monitor_then_monitor_port() -> None:
    env = {"QSNAP_MONITOR": "unix:/a.sock", "MONITOR_PORT": "9999"}
    assert address_from("tcp:h:1", env) == MonitorAddress("tcp", host="h", port=1, source="--monitor")
    assert address_from(None, env) == MonitorAddress("unix", path="/a.sock", source="QSNAP_MONITOR")
    assert address_from(None, {"MONITOR_PORT": "9999"}) == MonitorAddress(
        "tcp", host="localhost", port=9999, source="MONITOR_PORT"
    )
    assert address_from(None, {}) is None
    assert address_from("", {"QSNAP_MONITOR": " "}) is None
    with pytest.raises(UsageError, match="MONITOR_PORT"):
        address_from(None, {"MONITOR_PORT": "localhost:9999"})


def test_address_round_trips_through_str() -> None:
    for text in ("unix:/x.sock", "tcp:h:1", "telnet:h:2", "tcp:[::1]:3"):
        assert str(parse_address(text)) == text


# ---------------------------------------------------------------- protocol detection

def test_protocol_detected_from_first_byte_of_real_greetings() -> None:
    assert detect_protocol(captured("tcp")["greeting"]) == "hmp"
    assert detect_protocol(captured("telnet")["greeting"]) == "hmp"
    assert detect_protocol(b'{"QMP": {"version": {}}}') == "qmp"
    assert detect_protocol(b"SSH-2.0-OpenSSH_9.2\r\n") is None


# ---------------------------------------------------------------- telnet and framing

def test_telnet_negotiation_is_stripped_even_when_split_across_reads() -> None:
    greeting = captured("telnet")["greeting"]
    plain = captured("tcp")["greeting"]
    assert strip_telnet(greeting) == plain
    stripper = TelnetStripper()
    assert b"".join(stripper.feed(greeting[i : i + 1]) for i in range(len(greeting))) == plain
    assert strip_telnet(b"a\xff\xffb\xff\xfa\x18\x01\xff\xf0c") == b"a\xffbc"  # IAC IAC, SB..SE


@pytest.mark.parametrize("kind", ["tcp", "telnet"])
def test_replies_are_split_from_the_echo(kind: str) -> None:
    stream = captured(kind)
    assert split_reply(stream["info_status_running"])[1] == "VM status: running"
    # a failed loadvm leaves the VM paused, in run state restore-vm (the trap)
    assert split_reply(stream["info_status_paused"])[1] == "VM status: paused (restore-vm)"
    assert split_reply(stream["savevm_ok"])[1] == ""
    assert split_reply(stream["delvm_missing"])[1] == ""  # the trap: no error for a missing tag
    assert split_reply(stream["loadvm_missing"])[1] == (
        "Error: Snapshot 'nosuch' does not exist in one or more devices"
    )
    assert split_reply(stream["unknown_command"])[1] == "unknown command: 'nosuchcmd'"


def test_reply_error_treats_any_text_of_a_mutating_command_as_an_error() -> None:
    stream = captured("tcp")
    assert reply_error(split_reply(stream["savevm_ok"])[1]) is None
    assert "does not exist" in (reply_error(split_reply(stream["loadvm_missing"])[1]) or "")
    assert reply_error("Device 'pflash0' is writable but does not support snapshots") is not None


class FakeTransport:
    """A null transport: replays captured bytes in tiny chunks and records what was sent."""

    description = "fake"

    def __init__(self, chunks: list[bytes], chunk_size: int = 3) -> None:
        data = b"".join(chunks)
        self.pending = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
        self.sent = b""

    def send(self, data: bytes) -> None:
        self.sent += data

    def recv(self, timeout: float) -> bytes:
        if not self.pending:
            raise MonitorError("The QEMU monitor at fake closed the connection before answering.")
        return self.pending.pop(0)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("kind", ["tcp", "telnet"])
def test_session_over_a_null_transport_with_real_bytes(kind: str) -> None:
    stream = captured(kind)
    transport = FakeTransport([stream["greeting"], stream["info_status_running"], stream["info_snapshots"]])
    session = HmpSession(transport)
    assert session.read_greeting() == "7.2.22"
    assert session.command("info", "status") == "VM status: running"
    snaps = parse_info_snapshots(session.command("info", "snapshots"))
    assert [s.name for s in snaps] == ["snapA", "snapB"]
    assert transport.sent == b"info status\ninfo snapshots\n"  # \n only, never \r\n


def test_session_reports_a_hangup_mid_reply_as_monitor_error() -> None:
    stream = captured("tcp")
    transport = FakeTransport([stream["greeting"], stream["info_status_running"][:-4]])
    session = HmpSession(transport)
    session.read_greeting()
    with pytest.raises(MonitorError) as info:
        session.command("info", "status")
    assert info.value.exit_code == 12
    assert "'info status'" in str(info.value)


INJECTIONS = [
    "a\nquit", "a\rquit", "a\r\nquit", "a\x08\x08\x08quit", "a\x7f\x7fquit", "a\x1b[Aquit", "\x1bOA",
    "a\x00quit", 'a"b', "a'b", "a b", "a\\b", "a\tb", "a\x03", "é",
]


@pytest.mark.parametrize("name", INJECTIONS)
def test_session_refuses_unsafe_arguments_before_sending_a_byte(name: str) -> None:
    transport = FakeTransport([])
    session = HmpSession(transport)
    with pytest.raises(InvalidName) as info:
        session.command("savevm", name)
    assert info.value.exit_code == 6
    with pytest.raises(MonitorError):
        session.command(f"savevm {name}")  # the verb must be a plain word too
    if any(not 0x20 <= ord(c) <= 0x7E for c in name):  # even the test-only raw path refuses
        with pytest.raises(MonitorError):
            session.raw_command(f"savevm {name}")
    assert transport.sent == b""


# ---------------------------------------------------------------- text parsers

def test_info_snapshots_7_2_layout_has_no_ids() -> None:
    text = split_reply(captured("tcp")["info_snapshots"])[1]
    snaps = parse_info_snapshots(text)
    assert [(s.id, s.name) for s in snaps] == [("", "snapA"), ("", "snapB")]
    assert all(s.vm_state_size > 100_000 for s in snaps)  # '816 KiB': rounded, but not zero


def test_info_snapshots_old_layout_and_partial_tables() -> None:
    # Hand-written in the layout of QEMU 2.x (one table, real IDs, sizes like '228M').
    old = (
        "ID        TAG                 VM SIZE                DATE       VM CLOCK\n"
        "1         before-upgrade         228M 2019-01-02 03:04:05   00:10:00.123\n"
        "2         disk only                 0 2019-01-02 03:05:05   00:00:00.000\n"
    )
    snaps = parse_info_snapshots(old)
    assert [(s.id, s.name, s.vm_state_size) for s in snaps] == [
        ("1", "before-upgrade", 228 * 1024**2),
        ("2", "disk only", 0),
    ]
    assert snaps[0].vm_clock_ns == 600_123_000_000
    assert snaps[0].date == datetime(2019, 1, 2, 3, 4, 5).astimezone()
    # QEMU >= 5: snapshots missing on some disk are listed apart and are not loadable.
    new = (
        "List of snapshots present on all disks:\n"
        "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n"
        "--        full              816 KiB 2026-11-26 15:01:15 00:00:01.851           \n"
        "\n"
        "List of partial (non-loadable) snapshots on 'virtio1':\n"
        "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n"
        "3         half                  0 B 2026-11-26 15:01:15 00:00:01.851           \n"
    )
    assert [s.name for s in parse_info_snapshots(new)] == ["full"]
    assert parse_info_snapshots("There is no snapshot available.") == ()


def test_info_block_verbose_gives_nodes_sizes_and_real_ids() -> None:
    text = split_reply(captured("tcp")["info_block_v"])[1]
    entries = parse_info_block(text)
    assert [(e.device, e.filename, e.format, e.virtual_size) for e in entries] == [
        ("virtio0", "/TMP/d.qcow2", "qcow2", 64 * 1024**2),
        ("virtio1", "/TMP/e.qcow2", "qcow2", 32 * 1024**2),
    ]
    assert all(e.node_name.startswith("#block") for e in entries)
    assert [(s.id, s.name) for s in entries[0].snapshots] == [("1", "snapA"), ("2", "snapB")]
    assert entries[0].snapshots[0].vm_state_size > 0
    assert [s.vm_state_size for s in entries[1].snapshots] == [0, 0]  # RAM goes to the first disk


def test_status_sizes_and_clocks() -> None:
    assert parse_status("VM status: running") == "running"
    assert parse_status("VM status: paused") == "paused"
    assert parse_status("VM status: paused (prelaunch)") == "prelaunch"
    assert parse_status(split_reply(captured("tcp")["info_status_paused"])[1]) == "restore-vm"
    with pytest.raises(MonitorError):
        parse_status("unknown command: 'info'")
    assert parse_size("816 KiB") == 816 * 1024
    assert parse_size("0 B") == 0
    assert parse_size("1.5 GiB") == 1536 * 1024**2
    assert parse_clock("01:02:03.5") == 3723_500_000_000


# ---------------------------------------------------------------- image matching

def _img(filename: str, size: int = 1024, ro: bool = False) -> BlockImage:
    return BlockImage("#n", filename, "qcow2", size, ro, ())


def test_image_matches_by_path_mapping_or_name_and_size(tmp_path: Path) -> None:
    host = tmp_path / "debian-hurd-amd64.qcow2"
    host.touch()
    in_container = _img("/opt/hurd-image/debian-hurd-amd64.qcow2")
    assert match_image([_img(str(host))], host) == (_img(str(host)), "path")
    assert match_image([in_container], host) is None  # no size given, no mapping: no guess
    mapping = {str(host): "/opt/hurd-image/debian-hurd-amd64.qcow2"}
    assert match_image([in_container], host, path_map=mapping) == (in_container, "mapping")
    assert match_image([in_container], host, virtual_size=1024) == (in_container, "name+size")
    assert match_image([in_container], host, virtual_size=2048) is None
    assert match_image([_img(str(host), ro=True)], host) is None  # a read-only backing file
