"""The ``retrain`` command line.

Each command lives in its own module ``workers/cli/cmd_<name>.py`` that defines
``register(app: typer.Typer) -> None``; this package imports them all, so adding a command
never edits a shared file. Errors are one line on stderr and exit status 2 (see ``_common``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

app = typer.Typer(
    name="retrain",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Automated model retraining: triggers, training, quality gate, registry, safe rollout."""


def _load_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            module.register(app)


_load_commands()


def main() -> None:
    import os

    from config.logs import configure_logging
    from config.settings import LOG_LEVELS
    from workers.cli._common import USAGE_ERROR, run_app

    # Commands talk on stdout; library logs go to stderr, quiet unless asked for (any case; unset or
    # empty means WARNING).
    asked = os.environ.get("RETRAIN_CLI_LOG_LEVEL", "")
    level = asked.strip().upper() or "WARNING"
    if level not in LOG_LEVELS:
        sys.stderr.write(f"error: invalid setting RETRAIN_CLI_LOG_LEVEL: {asked!r} is not one of "
                         f"{', '.join(LOG_LEVELS)}\n")
        sys.exit(USAGE_ERROR)
    configure_logging(level, os.environ.get("RETRAIN_LOG_FORMAT", "auto"))

    sys.exit(run_app(app))
