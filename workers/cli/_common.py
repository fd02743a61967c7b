"""Helpers every command shares: one-line errors, JSON output, rich console."""

from __future__ import annotations

import json
import sys
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


def run_app(app: typer.Typer, args: list[str] | None = None) -> int:
    """Run the typer app; turn CliError and usage errors into one line on stderr."""
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
    # typer returns the code of an explicit ``typer.Exit(code)`` in non-standalone mode.
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def connect():
    """A Redis client (pinged) and the key schema, or one clear error line and exit 2."""
    from config.keys import keys_from_settings
    from config.settings import get_settings
    from workers.connections import NoRedisConfigured, get_redis

    try:
        client = get_redis()
        client.ping()
    except NoRedisConfigured as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - connection problems are one line
        fail(f"cannot reach Redis: {exc}")
    return client, keys_from_settings(get_settings())
