"""`manage.py lsl_node add|list|drain|activate|remove`: the Docker engines environments are placed on.

    lsl_node add b tcp://10.0.0.2:2376 --tls-ca ca.pem --tls-cert cert.pem --tls-key key.pem --label gpu=true
    lsl_node add c ssh://lsl@build-2 --cpus 16 --memory-mb 65536
    lsl_node list
    lsl_node drain b        # no new environments there; those there keep running
    lsl_node activate b
    lsl_node remove b       # only when nothing lives there any more
    lsl_node remove b --forget   # b is gone for good (and not answering): forget what lived there first
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Q

from environments import nodes
from environments.models import Node, NodeState
from lsl_site.errors import DomainError, InvalidInput


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CommandError(f"--label takes KEY=VALUE, not {text!r}")
    return key, value


class Command(BaseCommand):
    help = "Add, list, drain, activate or remove the Docker engines (nodes) environments are placed on."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="register an engine (it must answer, unless --no-check)")
        add.add_argument("name")
        add.add_argument("url", help="unix:///path/docker.sock, tcp://host:2376 (with TLS client certificates) or ssh://user@host")
        add.add_argument("--tls-ca", default="")
        add.add_argument("--tls-cert", default="")
        add.add_argument("--tls-key", default="")
        add.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE",
                         help="matched by templates' node_selector (repeatable); arch comes from the engine")
        add.add_argument("--cpus", type=float, default=0, help="CPUs environments may reserve (default: all the engine has)")
        add.add_argument("--memory-mb", type=int, default=0, help="memory environments may reserve (default: all)")
        add.add_argument("--shares-host", action="store_true",
                         help="the engine runs on this server's machine (keeper sockets and host-path mounts reach it)")
        add.add_argument("--no-check", action="store_true", help="register it even if it does not answer now")
        sub.add_parser("list", help="nodes, their health and what they hold")
        for action, text in (("drain", "place no new environments there"), ("activate", "place environments there again")):
            sub.add_parser(action, help=text).add_argument("name")
        remove = sub.add_parser("remove", help="forget an empty node")
        remove.add_argument("name")
        remove.add_argument("--forget", action="store_true",
                            help="the node is gone for good: first forget the records of its environments, team "
                                 "volumes and kept workspaces (their data went with the machine); only while it "
                                 "does not answer")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        try:
            getattr(self, f"_{action}")(**options)
        except InvalidInput as exc:
            raise CommandError("; ".join(exc.messages())) from None
        except DomainError as exc:
            raise CommandError(exc.detail) from None

    def _node(self, name: str) -> Node:
        node = Node.objects.filter(name=name).first()
        if node is None:
            known = ", ".join(Node.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"no node named {name!r} (nodes: {known})")
        return node

    def _add(self, *, name: str, url: str, tls_ca: str, tls_cert: str, tls_key: str, label: list[tuple[str, str]],
             cpus: float, memory_mb: int, shares_host: bool, no_check: bool, **_: Any) -> None:
        node = nodes.do_add_node(name=name, url=url, labels=dict(label), cpus=cpus, memory_mb=memory_mb, tls_ca=tls_ca,
                                 tls_cert=tls_cert, tls_key=tls_key, shares_host=shares_host, check=not no_check)
        engine = node.engine
        self.stdout.write(f"added node {node.name}: {url}" + (
            f" (Docker {engine.get('version')}, {engine.get('ncpu')} CPUs, {engine.get('mem_total', 0) // 2**20} MiB, "
            f"{engine.get('arch')})" if engine else " (not checked)"))

    def _list(self, **_: Any) -> None:
        rows = Node.objects.annotate(
            envs=Count("environments", distinct=True),
            running=Count("environments", filter=Q(environments__status="running"), distinct=True)).order_by("name")
        loads = {load.name: load for load in nodes.loads()}
        header = f"{'NAME':<16} {'STATE':<9} {'HEALTH':<12} {'ENVS':>5} {'RUN':>4} {'CPU RES':>10} {'MEM RES (MiB)':>16}  URL / LABELS"
        self.stdout.write(header)
        for node in rows:
            load = loads[node.name]
            health = "up" if node.available else "unavailable"
            labels = ",".join(f"{k}={v}" for k, v in sorted(node.effective_labels.items()))
            self.stdout.write(f"{node.name:<16} {node.state:<9} {health:<12} {node.envs:>5} {node.running:>4} "
                              f"{load.reserved_cpus:>4g}/{load.cpus:<5g} {load.reserved_memory_mb:>7}/{load.memory_mb:<8}  "
                              f"{node.url or '(local)'} {labels}")
            if not node.available and node.last_error:
                self.stdout.write(f"{'':<16} {node.last_error}")

    def _drain(self, *, name: str, **_: Any) -> None:
        nodes.do_set_node_state(self._node(name), NodeState.DRAINING)
        self.stdout.write(f"node {name}: draining (no new environments; those there keep running)")

    def _activate(self, *, name: str, **_: Any) -> None:
        nodes.do_set_node_state(self._node(name), NodeState.ACTIVE)
        self.stdout.write(f"node {name}: active")

    def _remove(self, *, name: str, forget: bool, **_: Any) -> None:
        node = self._node(name)
        if forget:
            forgotten = nodes.do_forget_node_contents(node)
            self.stdout.write(f"node {name}: forgot " + ", ".join(f"{n} {what}" for what, n in forgotten.items()))
        nodes.do_remove_node(node)
        self.stdout.write(f"node {name}: removed")
