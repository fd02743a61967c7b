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
    from workers.cli._common import run_app

    # Commands talk on stdout; library logs go to stderr, quiet unless asked for.
    configure_logging(os.environ.get("RETRAIN_CLI_LOG_LEVEL", "WARNING"), os.environ.get("RETRAIN_LOG_FORMAT", "auto"))

    sys.exit(run_app(app))
