"""Where a browser preview lives: URL builders and parsers for the preview proxy (environments.preview).

Pure functions (settings are read, nothing else): the API and pages build links with them, the
proxy parses requests with them, and both agree on one spelling.

Two modes:
* path mode (always available on LSL's own host): `/preview/<env uuid>/<port>/...` and
  `/preview/link/<token>/...` (a public link);
* subdomain mode (when LSL_PREVIEW_DOMAIN is set, e.g. `preview.example.com` with a wildcard DNS
  record): `p<port>-<env uuid hex>.<domain>` and `l-<token>.<domain>`. Each preview is then its
  own origin, isolated from LSL's and from other previews; links point there.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from django.conf import settings

PREFIX = "/preview/"
AUTH_PATH = "/preview/auth/"  # main site: hands a signed-in user over to a preview subdomain
TICKET_PATH = "/__lsl_preview_auth"  # preview subdomain: turns a ticket into the preview cookie
MIN_PORT, MAX_PORT = 1, 65535

_TOKEN = r"[a-z2-7]{16,64}"  # ports.new_token(): lowercase base32
_HOST_PORT_RE = re.compile(r"^p(\d{1,5})-([0-9a-f]{32})$")
_HOST_LINK_RE = re.compile(rf"^l-({_TOKEN})$")
_PATH_PORT_RE = re.compile(r"^/preview/([0-9a-fA-F-]{32,36})/([0-9]{1,12})(/.*)?$", re.DOTALL)
_PATH_LINK_RE = re.compile(rf"^/preview/link/({_TOKEN})(/.*)?$", re.DOTALL)
# A personal, signed, expiring address for a sandboxed path-mode preview (environments.preview
# explains when one is used): django.core.signing output, base64url plus ":" separators.
_PATH_TICKET_RE = re.compile(r"^/preview/t/([A-Za-z0-9_:-]{20,400})(/.*)?$", re.DOTALL)


class BadPreviewPath(ValueError):
    """A path under /preview/ that names no possible preview (a 400/404 with this message)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PreviewPath:
    """A parsed path-mode request path."""

    kind: Literal["port", "link", "ticket", "auth"]
    prefix: str  # "/preview/<env>/<port>" or "/preview/link/<token>" (no trailing slash); "" for auth
    rest: str  # what the upstream app sees: the raw path after the prefix, always starting with "/"; "" = no slash
    env_id: uuid.UUID | None = None
    port: int | None = None
    token: str | None = None  # the public link's token, or the ticket


def preview_domain(domain: str | None = None) -> str:
    return (settings.LSL_PREVIEW_DOMAIN if domain is None else domain).strip().strip(".").lower()


def split_host(host: str) -> tuple[str, str]:
    """("name", ":port" or "") of a Host header value; IPv6 literals keep their brackets."""
    host = (host or "").strip()
    if host.startswith("["):
        end = host.find("]")
        if end != -1:
            rest = host[end + 1:]
            return host[:end + 1].lower(), rest if rest.startswith(":") and rest[1:].isdigit() else ""
        return host.lower(), ""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and name:
        return name.lower(), ":" + port
    return host.lower(), ""


def _env_uuid(env_id: Any) -> uuid.UUID:
    return env_id if isinstance(env_id, uuid.UUID) else uuid.UUID(str(env_id))


def port_host(env_id: Any, port: int, domain: str | None = None) -> str:
    """`p<port>-<env hex>.<domain>`: one DNS label (at most 63 characters) per preview."""
    return f"p{int(port)}-{_env_uuid(env_id).hex}.{preview_domain(domain)}"


def link_host(token: str, domain: str | None = None) -> str:
    return f"l-{token}.{preview_domain(domain)}"


def preview_url(env_id: Any, port: int, request_host: str, scheme: str = "http", domain: str | None = None) -> str:
    """The URL a user opens to preview `port` of an environment. `request_host` is the Host the
    main site was reached by (its port is reused for the preview subdomain: one listener serves both)."""
    scheme = scheme if scheme in ("http", "https") else "http"
    base = preview_domain(domain)
    if base:
        return f"{scheme}://{port_host(env_id, port, base)}{split_host(request_host)[1]}/"
    return f"{scheme}://{request_host}{PREFIX}{_env_uuid(env_id)}/{int(port)}/"


def preview_url_template(env_id: Any, request_host: str, scheme: str = "http", domain: str | None = None) -> str:
    """preview_url with `{port}` where the port goes: a page fills it in for ports an event names."""
    return preview_url(env_id, 1, request_host, scheme, domain).replace(
        "p1-" if preview_domain(domain) else "/1/", "p{port}-" if preview_domain(domain) else "/{port}/", 1)


def public_link_url(token: str, request_host: str, scheme: str = "http", domain: str | None = None) -> str:
    """The URL of a public preview link (anyone holding it may open the preview, no login)."""
    scheme = scheme if scheme in ("http", "https") else "http"
    base = preview_domain(domain)
    if base:
        return f"{scheme}://{link_host(token, base)}{split_host(request_host)[1]}/"
    return f"{scheme}://{request_host}{PREFIX}link/{quote(token, safe='')}/"


def is_preview_host(host: str, domain: str | None = None) -> bool:
    """Whether a Host header is under the preview domain (subdomain mode; never the domain itself)."""
    base = preview_domain(domain)
    name = split_host(host)[0]
    return bool(base) and name.endswith("." + base)


def parse_preview_host(host: str, domain: str | None = None) -> tuple[str, uuid.UUID, int] | tuple[str, str] | None:
    """("port", env_id, port) for `p<port>-<env hex>.<domain>`, ("link", token) for
    `l-<token>.<domain>`, None for anything else (other hosts, several labels, a port out of range)."""
    base = preview_domain(domain)
    name = split_host(host)[0]
    if not base or not name.endswith("." + base):
        return None
    label = name[: -len(base) - 1]
    if "." in label:
        return None
    if m := _HOST_PORT_RE.match(label):
        port = int(m.group(1))
        if not MIN_PORT <= port <= MAX_PORT or m.group(1).startswith("0"):
            return None
        return ("port", uuid.UUID(hex=m.group(2)), port)
    if m := _HOST_LINK_RE.match(label):
        return ("link", m.group(1))
    return None


def is_preview_path(path: str) -> bool:
    return path == PREFIX.rstrip("/") or path.startswith(PREFIX)


def parse_preview_path(raw_path: str) -> PreviewPath | None:
    """Parse a path-mode request path (the RAW path as sent, percent-escapes intact, so the upstream
    app gets exactly what the browser sent after the prefix). None: not under /preview/.
    BadPreviewPath: under /preview/ but names no preview (bad id, port out of range)."""
    if not is_preview_path(raw_path):
        return None
    if raw_path == AUTH_PATH or raw_path == AUTH_PATH.rstrip("/"):
        return PreviewPath("auth", "", "")
    if m := _PATH_LINK_RE.match(raw_path):
        token = m.group(1)
        return PreviewPath("link", f"{PREFIX}link/{token}", m.group(2) or "", token=token)
    if m := _PATH_TICKET_RE.match(raw_path):
        return PreviewPath("ticket", f"{PREFIX}t/{m.group(1)}", m.group(2) or "", token=m.group(1))
    if m := _PATH_PORT_RE.match(raw_path):
        try:
            env_id = uuid.UUID(m.group(1))
        except ValueError:
            raise BadPreviewPath("No such preview: the environment id is not a UUID.") from None
        port = int(m.group(2))
        if not MIN_PORT <= port <= MAX_PORT:
            raise BadPreviewPath(f"A port is a whole number from {MIN_PORT} to {MAX_PORT}; {port} is not.", status=400)
        return PreviewPath("port", f"{PREFIX}{m.group(1)}/{m.group(2)}", m.group(3) or "", env_id=env_id, port=port)
    raise BadPreviewPath("No such preview: the address is /preview/<environment id>/<port>/ "
                         "or /preview/link/<token>/.")


__all__ = ["AUTH_PATH", "BadPreviewPath", "PREFIX", "PreviewPath", "TICKET_PATH", "is_preview_host", "is_preview_path",
           "link_host", "parse_preview_host", "parse_preview_path", "port_host", "preview_domain", "preview_url",
           "public_link_url", "split_host"]
