"""Helpers every command shares: one-line errors, JSON output, rich console."""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from typing import Any, NoReturn

import typer
from typer._click import exceptions as click_exc
from rich.console import Console

USAGE_ERROR = 2
"""Exit status for unusable input (missing file, bad policy, wrong columns)."""

console = Console()
err_console = Console(stderr=True)


class CliError(Exception):
    """Raised by commands for bad input; printed as one line, exit status 2."""

    def __init__(self, message: str, code: int = USAGE_ERROR):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    raise CliError(message, code)


UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def check_server_options(host: str, port: int, log_level: str) -> None:
    """One clear line (exit 2) for a log level uvicorn does not know or an address nothing can listen on, before
    anything starts (uvicorn would raise a KeyError or log and exit 3)."""
    import socket

    if log_level.lower() not in UVICORN_LOG_LEVELS:
        fail(f"unknown log level {log_level!r}; use one of {', '.join(UVICORN_LOG_LEVELS)}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        fail(f"cannot resolve host {host!r}: {exc.strerror}")
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror}")


def _default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (NaN/inf become null)."""
    sys.stdout.write(json.dumps(_sanitize(obj), default=_default) + "\n")
    sys.stdout.flush()


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


_SETTINGS_FIELD = re.compile(r'field "([A-Za-z0-9_]+)"')


def settings_problem(exc: BaseException) -> str | None:
    """One line naming each bad ``RETRAIN_*`` variable if ``exc`` comes from reading the settings.

    The offending values are not repeated: a secret may be among them.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from config.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        parts = []
        for err in exc.errors():
            message = one_line(err["msg"].removeprefix("Value error, "))
            # A check across settings has no location: its message names the variables itself.
            parts.append(f"{prefix}{str(err['loc'][0]).upper()}: {message}" if err["loc"] else message)
        return "invalid setting " + "; ".join(parts)
    if isinstance(exc, SettingsError):
        found = _SETTINGS_FIELD.search(str(exc))
        name = f"{prefix}{found.group(1).upper()}" if found else "a RETRAIN_* variable"
        reason = f" ({one_line(exc.__cause__)})" if exc.__cause__ else ""
        return f"invalid setting {name}: cannot parse the value{reason}"
    return None


def describe_unexpected(exc: Exception) -> tuple[str, int]:
    """The one line and exit status for an error no command turned into a ``CliError``.

    Bad settings and undecodable input are the user's to fix (exit 2); anything else is exit 1.
    """
    problem = settings_problem(exc)
    if problem is not None:
        return problem, USAGE_ERROR
    message = one_line(exc)
    line = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    from config.keys import StreamLayoutError

    return line, USAGE_ERROR if isinstance(exc, (UnicodeDecodeError, StreamLayoutError)) else 1


def run_app(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run the typer app; every error becomes one line on stderr, never a traceback.

    ``CliError`` and usage errors exit 2; anything unexpected is a last-resort one line
    (``RETRAIN_CLI_LOG_LEVEL=DEBUG`` adds the traceback). ``SystemExit`` passes through.
    """
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="retrain", standalone_mode=False)
    except CliError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.code
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()
        return USAGE_ERROR
    except click_exc.ClickException as exc:  # usage errors, bad parameters
        sys.stderr.write(f"error: {exc.format_message()}\n")
        return USAGE_ERROR
    except typer.Abort:
        sys.stderr.write("aborted\n")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        line, code = describe_unexpected(exc)
        sys.stderr.write(f"error: {line}\n")
        if os.environ.get("RETRAIN_CLI_LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        return code
    # typer returns the code of an explicit ``typer.Exit(code)`` in non-standalone mode.
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def load_settings():
    """The process settings, or one line naming the bad ``RETRAIN_*`` variable and exit 2."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from config.settings import get_settings

    try:
        return get_settings()
    except (ValidationError, SettingsError) as exc:
        fail(settings_problem(exc) or one_line(exc))


def ping_redis(settings=None):
    """A pinged Redis client, or one line saying what went wrong (never the URL) and exit 2."""
    import redis

    from workers.connections import NoRedisConfigured, get_redis

    settings = settings or load_settings()
    try:
        client = get_redis(settings)
        client.ping()
    except NoRedisConfigured as exc:
        fail(str(exc))
    except redis.AuthenticationError as exc:
        fail(f"Redis refused the credentials in the Redis URL: {one_line(exc)}")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"cannot reach Redis ({type(exc).__name__}): {one_line(exc)}")
    except redis.RedisError as exc:
        fail(f"Redis answered the connection check with an error ({type(exc).__name__}): {one_line(exc)}")
    except ValueError as exc:  # redis-py's URL parser; its messages never echo the URL
        fail(f"the Redis URL is not usable: {one_line(exc)}")
    except OSError as exc:  # the URL file written by 'retrain up'
        fail(f"cannot read the Redis URL file {exc.filename}: {exc.strerror}")
    return client


def connect():
    """A Redis client (pinged) and the key schema, or one clear error line and exit 2."""
    from config.keys import keys_from_settings

    settings = load_settings()
    return ping_redis(settings), keys_from_settings(settings)
