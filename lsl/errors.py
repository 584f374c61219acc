"""Exceptions carrying the exit code the CLI ends with (documented in `lsl --help`)."""

from __future__ import annotations

GENERIC, USAGE, AUTH, NOT_FOUND, CONFLICT, UNREACHABLE, SERVER_ERROR = 1, 2, 3, 4, 5, 6, 7

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  other error, e.g. an environment could not be created or started (the engine's reason is printed)
  2  usage error, or input the server rejected
  3  not logged in, bad or revoked token, permission denied
  4  not found (environment, session, user...)
  5  conflict (e.g. the environment is not running)
  6  server unreachable (lsl shell: lost, and not back within 120 s)
  7  server error
  lsl exec and lsl shell exit with the remote command's own code.
Errors are one line on stderr ("lsl: error: ..."); --debug adds the traceback."""


class LslError(Exception):
    """An error reported as one `lsl: error: ...` line; `exit_code` is what the process exits with."""

    exit_code = GENERIC

    def __init__(self, message: str, exit_code: int | None = None, fields: dict | None = None, code: str = "") -> None:
        super().__init__(message)
        self.fields: dict = fields or {}
        self.code = code  # the server's error code (`engine_error`, `not_running`...), when it sent one
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class EnvironmentFailed(LslError):
    """An environment ended up `error` (or stopped at once) instead of running, or the engine could
    not start it (`lsl start`/`restart`): the engine's reason.

    Exit 1, as docs/cli.md has always documented "the environment failed to start": it is not a
    conflict with the request (5) nor a broken server (7), and scripts already test for it.
    """

    exit_code = GENERIC


class UsageFailure(LslError):
    exit_code = USAGE


class AuthError(LslError):
    exit_code = AUTH


class NotFound(LslError):
    exit_code = NOT_FOUND


class Conflict(LslError):
    exit_code = CONFLICT


class Unreachable(LslError):
    exit_code = UNREACHABLE


class ServerError(LslError):
    exit_code = SERVER_ERROR
