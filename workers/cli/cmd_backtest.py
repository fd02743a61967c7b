"""``retrain backtest``: replay a policy over historical data against naive baselines, offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from workers.cli._common import console, fail, print_json
from workers.cli.cmd_drift import read_table

if TYPE_CHECKING:
    import pandas as pd

_GLOB_CHARS = set("*?[")
_SHORT = {"scheduled": "age", "data_drift": "drift", "performance_drop": "perf", "data_volume": "volume",
          "concept_drift": "concept", "upstream_change": "upstream", "manual": "manual"}
"""Trigger names as the table shows them (the JSON keeps the full names)."""
_OUTCOMES = {"gate_failed": "rejected", "validation_failed": "invalid data", "training_failed": "training failed"}


def _read_data(data: str) -> "pd.DataFrame":
    """One Parquet/CSV file (via ``read_table``), or every file of a glob or directory."""
    path = Path(data)
    if path.is_file() or (not path.is_dir() and not _GLOB_CHARS & set(data)):
        return read_table(path, "data")
    from workers.training.data import DataError, read_frame

    try:
        return read_frame(data)
    except DataError as exc:
        fail(str(exc))


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def _print(result: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Table

    metric = result["metric"]
    table = Table(title=f"Backtest of {result['model']}: live {metric} per batch", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    whole_days = all(row["start"][11:19] == "00:00:00" for row in result["timeline"])
    for header, justify in (
        ("batch start", "left"), ("rows", "right"), ("policy", "right"), ("never", "right"),
        ("periodic", "right"), ("every", "right"), ("drift", "right"),
    ):
        table.add_column(header, justify=justify, no_wrap=True)
    table.add_column("decision", overflow="fold")
    for row in result["timeline"]:
        base = row["baselines"]
        decision = row["action"]
        if row["triggers"]:
            decision += ": " + "+".join(_SHORT.get(t, t) for t in row["triggers"])
        outcome = row.get("outcome", "")
        if outcome == "promoted":
            decision += " [green]promoted[/]"
        elif outcome:
            decision += f" [red]{_OUTCOMES.get(outcome, outcome)}[/]"
            if row["gate_failed"]:
                decision += f" ({', '.join(row['gate_failed'])})"
        table.add_row(
            row["start"][:10] if whole_days else row["start"][:16].replace("T", " "), str(row["rows"]), _fmt(row["accuracy"]), _fmt(base["never"]),
            _fmt(base["periodic"]), _fmt(base["every_batch"]), f"{row['drift_score']:.2f}", decision,
        )
    console.print(table)
    summary = Table(title=f"Mean live {metric} (row-weighted) and cost", title_justify="left",
                    box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("strategy", metric, "retrains", "trainings", "compute s"):
        summary.add_column(header, justify="left" if header == "strategy" else "right")
    summary.add_row("[bold]policy[/]", _fmt(result["accuracy"]), str(result["retrains"]),
                    str(result["trainings_attempted"]), f"{result['compute_seconds']:.2f}")
    labels = {"never": "never", "periodic": f"periodic ({result['periodic']})", "every_batch": "every batch"}
    for name, b in result["baselines"].items():
        summary.add_row(labels[name], _fmt(b["accuracy"]), str(b["retrains"]), str(b["trainings_attempted"]),
                        f"{b['compute_seconds']:.2f}")
    console.print(summary)
    console.print(
        f"{result['batches']} batches after {result['warmup']} warm-up; gate rejections "
        f"{result['gate_rejections']}, validation failures {result['validation_failures']}, "
        f"training failures {result['training_failures']}; {result['elapsed_seconds']:.1f} s",
        highlight=False,
    )
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("backtest")
    def backtest(
        policy: Path = typer.Option(..., "--policy", "-p", help="Policy TOML of the model."),
        data: str = typer.Option(
            ..., "--data", "-d", help="Historical data: Parquet/CSV file, directory or glob, with time and target."
        ),
        batch: Optional[str] = typer.Option(
            None, "--batch", help="Batch length, e.g. '1d' (default), '6h'; batches align to the Unix epoch."
        ),
        batches: Optional[int] = typer.Option(
            None, "--batches", help="Cut the timeline into N equal time spans instead of --batch.", min=1
        ),
        warmup: int = typer.Option(1, "--warmup", help="Leading batches that train the initial model.", min=1),
        periodic: Optional[str] = typer.Option(
            None, "--periodic",
            help="When the periodic baseline retrains: a model age ('7d') or every N batches ('4'). "
                 "Default: [triggers] max_model_age_days.",
        ),
        concept_drift: bool = typer.Option(
            False, "--concept-drift",
            help="Also measure prediction-score drift (PSI/JS vs the model's holdout) for the concept_drift trigger.",
        ),
        threads: int = typer.Option(
            1, "--threads", min=0,
            help="Native BLAS/OpenMP threads during the replay (0 = the libraries' default).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Replay a policy over history: would it have kept the model good, and at what cost?

        Runs the decision, training and gate code of the workers batch by batch (no server) and
        compares the policy with never retraining, periodic retraining and retraining after
        every batch.
        """
        if batch is not None and batches is not None:
            fail("give --batch or --batches, not both")
        from config.policy import PolicyError, load_policy

        try:
            pol = load_policy(policy)
        except PolicyError as exc:
            fail(str(exc))
        frame = _read_data(data)
        for column, where in ((pol.data.time_column, "[data] time_column"), (pol.model.target, "[model] target")):
            if column not in frame.columns:
                fail(f"{data}: no column '{column}' (from {where})")
        from workers.backtest import BacktestError, run_backtest
        from workers.gate.checks import GateError
        from workers.training.fit import TrainingError

        try:
            result = run_backtest(frame, pol, batch=batch, batches=batches, warmup=warmup,
                                  periodic=periodic, concept_drift=concept_drift,
                                  threads=threads or None)
        except (BacktestError, GateError, TrainingError) as exc:
            fail(str(exc))
        out = result.to_dict()
        if as_json:
            print_json(out)
        else:
            _print(out)
