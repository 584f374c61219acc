"""Placement and node-address rules (environments/nodes.py), pure: no database, no engine."""

from __future__ import annotations

from environments.nodes import Load, choose, validate_url, why_not


def load(name: str, *, cpus: float = 8, memory_mb: int = 8192, reserved_cpus: float = 0, reserved_memory_mb: int = 0,
         labels: dict[str, str] | None = None, active: bool = True, available: bool = True) -> Load:
    return Load(name=name, cpus=cpus, memory_mb=memory_mb, reserved_cpus=reserved_cpus,
                reserved_memory_mb=reserved_memory_mb, labels=labels or {"arch": "amd64"}, active=active, available=available)


def test_it_spreads_by_the_share_left_free() -> None:
    nodes = [load("a", reserved_memory_mb=4096), load("b", reserved_memory_mb=1024)]
    chosen, refused = choose(nodes, cpus=1, memory_mb=1024, selector={})
    assert chosen is not None and chosen.name == "b" and refused == {}


def test_a_big_node_takes_more_than_a_small_one() -> None:
    # 2 GiB used of 64 leaves a larger share than 1 GiB of 8.
    nodes = [load("small", memory_mb=8192, reserved_memory_mb=1024), load("big", memory_mb=65536, reserved_memory_mb=2048)]
    assert choose(nodes, cpus=1, memory_mb=512, selector={})[0].name == "big"  # type: ignore[union-attr]


def test_ties_go_by_name_so_placement_is_deterministic() -> None:
    assert choose([load("b"), load("a")], cpus=1, memory_mb=1, selector={})[0].name == "a"  # type: ignore[union-attr]


def test_draining_unavailable_full_and_mismatched_nodes_are_refused_with_reasons() -> None:
    nodes = [load("drained", active=False), load("down", available=False), load("full", reserved_cpus=7.5),
             load("tight", reserved_memory_mb=8000), load("arm", labels={"arch": "arm64"})]
    chosen, refused = choose(nodes, cpus=1, memory_mb=512, selector={"arch": "amd64"})
    assert chosen is None
    assert refused == {"drained": "draining", "down": "not answering", "full": "0.5 of 8 CPUs free, 1 needed",
                       "tight": "192 of 8192 MiB free, 512 needed", "arm": "labels do not match arch=amd64"}


def test_the_selector_picks_the_matching_node() -> None:
    nodes = [load("cpu"), load("gpu", labels={"arch": "amd64", "gpu": "true"}, reserved_memory_mb=6000)]
    chosen, refused = choose(nodes, cpus=1, memory_mb=512, selector={"gpu": "true"})
    assert chosen is not None and chosen.name == "gpu" and "cpu" in refused


def test_an_unprobed_node_has_no_capacity_limit_yet() -> None:
    assert why_not(load("new", cpus=0, memory_mb=0, reserved_cpus=3), cpus=2, memory_mb=4096, selector={}) is None


def test_addresses_are_checked_field_by_field() -> None:
    assert validate_url("unix:///var/run/docker.sock") == {}
    assert validate_url("ssh://lsl@build-2") == {}
    assert "url" in validate_url("http://host:2375")
    assert "port" in validate_url("tcp://host")["url"][0]
    plain = validate_url("tcp://host:2375")
    assert "TLS client certificates" in plain["tls_cert"][0]
    half = validate_url("tcp://host:2376", tls_cert="/nonexistent/cert.pem")
    assert "a client certificate needs its key" in half["tls_key"][0] and "no such file" in half["tls_cert"][0]
    assert "tcp:// only" in validate_url("ssh://h", tls_ca="/etc/hostname")["url"][0]
