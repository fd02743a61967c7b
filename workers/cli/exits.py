"""One line saying why a child of a local system (``retrain up``, ``retrain demo``) stopped.

A child's reason is in its own log (the router's ``error: ...`` line, a worker's last
complaint); a user should read it in the one error line rather than open the log.
"""

from __future__ import annotations

from pathlib import Path

from workers.cli._common import one_line

_TAIL_BYTES = 64 * 1024
_MAX_REASON = 500


def log_sizes(logs: Path) -> dict[Path, int]:
    """The size of every log in ``logs`` now: what a child writes later starts past it."""
    return {path: path.stat().st_size for path in Path(logs).glob("*.log")}


def last_log_line(path: Path, since: int = 0) -> str | None:
    """The last non-empty line written to ``path`` after byte ``since`` (all of it if it shrank)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            start = since if since <= size else 0
            handle.seek(max(start, size - _TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    return one_line(lines[-1]) if lines else None


def exited_child(system, since: dict[Path, int] | None = None) -> str | None:
    """``"<name> exited with status <n>: <its last log line>"`` for the first child of ``system``
    that has exited, or None while all run. ``since`` (from :func:`log_sizes`) skips what earlier
    runs left in the same log."""
    for child in system.children:
        code = child.proc.poll()
        if code is None:
            continue
        last = last_log_line(child.log_path, (since or {}).get(child.log_path, 0))
        if last is None:
            return f"{child.name} exited with status {code} and wrote nothing to {child.log_path}"
        reason = last.removeprefix("error: ")
        if len(reason) > _MAX_REASON:
            reason = reason[:_MAX_REASON] + "..."
        return f"{child.name} exited with status {code}: {reason} (log {child.log_path})"
    return None
