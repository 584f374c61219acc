"""Pure logic of ports: /proc/net/tcp parsing, port and token checks, the keeper's tunnel frames.

No engine, no database: the real-container side is tests/test_tunnel.py.
"""

from __future__ import annotations

import re

import pytest

from environments import keeper, ports
from lsl_site.errors import InvalidInput

TCP4 = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4379968 1 0000 100 0 0 10 0
   1: 00000000:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4379971 1 0000 100 0 0 10 0
   2: 0100007F:1F40 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 4379999 1 0000 20 4 30 10 -1
   3: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4379972 1 0000 100 0 0 10 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F46 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
"""


def test_it_finds_listening_ports_and_which_are_loopback_only() -> None:
    found = ports.parse_proc_net_tcp(TCP4 + TCP6)
    assert [(p.port, p.loopback_only) for p in found] == [
        (3000, False),  # 127.0.0.1 and [::]: reachable on every address
        (7000, False),  # 0.0.0.0
        (8000, True),   # 127.0.0.1 only (the established connection on it is not a listener)
        (8006, True),   # ::1 only
        (9000, True),   # ::ffff:127.0.0.1
    ]
    assert found[2].as_json() == {"port": 8000, "loopback_only": True}


def test_either_file_alone_or_garbage_parses() -> None:
    assert [p.port for p in ports.parse_proc_net_tcp(TCP4)] == [3000, 7000, 8000]
    assert [p.port for p in ports.parse_proc_net_tcp(TCP6)] == [3000, 8006, 9000]
    assert ports.parse_proc_net_tcp("") == []
    # a truncated read, a bad hex port, a port 0 listener: skipped, never an exception
    assert ports.parse_proc_net_tcp("   0: 0100007F:ZZZZ 00000000:0000 0A\n   1: 00000000:0000 00000000:0000 0A\n   2: 0100") == []


@pytest.mark.parametrize("value, port", [(1, 1), (65535, 65535), ("8080", 8080), ("03000", 3000)])
def test_check_port_accepts_ports(value: object, port: int) -> None:
    assert ports.check_port(value) == port


@pytest.mark.parametrize("value", [0, 65536, -1, "-1", "80a", "", " 80", 8.0, None, True, [80], "1e3"])
def test_check_port_refuses_anything_else_naming_the_field(value: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        ports.check_port(value, field="remote")
    assert list(caught.value.fields or {}) == ["remote"]


def test_tokens_are_dns_labels_and_unique() -> None:
    tokens = {ports.new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert re.fullmatch(r"[a-z2-7]{32}", token), token
    assert ports.hash_token("a") != ports.hash_token("b") and len(ports.hash_token("a")) == 64


def test_tunnel_request_frame() -> None:
    assert keeper.tunnel_request(8000) == b"T\x00\x00\x00\x048000"
    assert keeper.tunnel_request(1) == b"T\x00\x00\x00\x011"
    for bad in (0, 65536, -5, True, "80", 80.0):
        with pytest.raises(ValueError):
            keeper.tunnel_request(bad)  # type: ignore[arg-type]
    assert keeper.frame(b"N") == b"N\x00\x00\x00\x00"


def test_tunnel_refusals_map_to_errors_a_user_can_act_on() -> None:
    closed = keeper.tunnel_refusal(b"E", b"nothing is listening on port 3000 in this environment", 3000)
    assert isinstance(closed, ports.PortClosed) and closed.status == 409 and closed.code == "port_closed"
    assert "3000" in closed.detail
    old = keeper.tunnel_refusal(b"E", b"expected O, L, K or F", 3000)
    assert isinstance(old, keeper.KeeperError) and "restart the environment" in str(old)
    other = keeper.tunnel_refusal(b"E", b"cannot connect to port 3000 in this environment: Connection timed out", 3000)
    assert isinstance(other, keeper.KeeperError) and not isinstance(other, ports.PortClosed)
    assert "timed out" in str(other)
    assert isinstance(keeper.tunnel_refusal(b"H", b"", 3000), keeper.KeeperError)
