"""Where the CLI keeps its server URL, token and client id.

The file is `$XDG_CONFIG_HOME/lsl/config.json` (default `~/.config/lsl/config.json`),
mode 0600 because it holds a bearer token. `LSL_URL` / `LSL_TOKEN` override it,
so CI jobs can run without a file.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lsl.errors import AuthError, LslError


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lsl" / "config.json"


@dataclass
class Config:
    url: str = ""
    token: str = ""
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def require_login(self) -> Config:
        """Fail with a hint (auth exit code) when there is no server or token to talk to."""
        if not self.url:
            raise AuthError("no server configured; run 'lsl init URL' (or set LSL_URL)")
        if not self.token:
            raise AuthError(f"not logged in to {self.url}; run 'lsl init' (or set LSL_TOKEN)")
        return self


def load_file() -> Config:
    """The stored config only (no env overrides): what `init`/`logout` rewrite."""
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, ValueError) as exc:
        raise LslError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise LslError(f"cannot read {path}: expected a JSON object")
    config = Config(url=str(data.get("url") or ""), token=str(data.get("token") or ""))
    if data.get("client_id"):
        config.client_id = str(data["client_id"])
    return config


def load() -> Config:
    """The effective config: the file, then LSL_URL / LSL_TOKEN on top."""
    config = load_file()
    config.url = normalize_url(os.environ.get("LSL_URL") or config.url)
    config.token = os.environ.get("LSL_TOKEN") or config.token
    return config


def save(config: Config) -> Path:
    """Write atomically with mode 0600 from the start (never world-readable, even briefly)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(config), handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o600)  # O_CREAT's mode is ignored when the file already existed
    os.replace(tmp, path)
    return path


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if url and "://" not in url:
        url = "http://" + url
    return url
