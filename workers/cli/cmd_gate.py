"""``retrain gate``: run the quality gate offline on two skops artifacts and a data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from workers.cli._common import console, fail, print_json

GATE_FAILED = 1
"""Exit status when the gate ran and the candidate failed it (0 = passed, 2 = unusable input)."""


def _load_model(path: Path, role: str, trust: list[str]) -> tuple[Any, int, bool]:
    if not path.is_file():
        fail(f"{path}: no such {role} artifact")
    from workers.registry.artifacts import ArtifactError, default_trusted_prefixes, load_artifact, read_sidecar

    try:
        digest = read_sidecar(path)
        prefixes = (*default_trusted_prefixes(), *trust) if trust else None
        model = load_artifact(path, digest, prefixes, allow_unverified=digest is None)
    except ArtifactError as exc:
        fail(str(exc))
    if not hasattr(model, "predict"):
        fail(f"{path}: the {role} artifact holds a {type(model).__name__}, not an estimator with predict()")
    return model, path.stat().st_size, digest is not None


def _print_table(result: dict[str, Any], name: str) -> None:
    from rich.table import Table

    verdict = "[bold green]PASSED[/]" if result["passed"] else "[bold red]FAILED[/]"
    table = Table(title=f"quality gate for {name}: {verdict}", title_justify="left")
    table.add_column("check")
    table.add_column("status")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("detail", overflow="fold")
    style = {"passed": "green", "failed": "red", "skipped": "dim"}
    for c in result["checks"]:
        value = "" if c["value"] is None else f"{c['value']:.4g}"
        threshold = "" if c["threshold"] is None else f"{c['threshold']:.4g}"
        table.add_row(c["name"], f"[{style[c['status']]}]{c['status']}[/]", value, threshold, c["detail"])
    console.print(table)
    if result.get("note"):
        console.print(f"[dim]{result['note']}[/]")


def register(app: typer.Typer) -> None:
    @app.command("gate")
    def gate(
        policy: Path = typer.Option(..., "--policy", help="Policy TOML ([model] and [gate] are read)."),
        candidate: Path = typer.Option(..., "--candidate", help="Candidate model (.skops)."),
        data: str = typer.Option(..., "--data", help="Holdout data: Parquet/CSV file or glob, with the target column."),
        production: Optional[Path] = typer.Option(
            None, "--production", help="Production model (.skops); omit for the first model of a name."
        ),
        trust: list[str] = typer.Option(
            [], "--trust", help="Extra module prefix to trust in artifacts (repeatable), e.g. 'mypkg.'."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Run the quality gate: candidate vs production on a holdout.

        Artifacts are verified against a '<file>.sha256' sidecar when one exists and may only
        hold types from the trusted module prefixes. Exit status: 0 passed, 1 failed, 2 unusable input.
        """
        for path, role in ((candidate, "candidate"), (production, "production")):
            if path is not None and not path.is_file():
                fail(f"{path}: no such {role} artifact")
        from config.policy import PolicyError, load_policy

        try:
            pol = load_policy(policy)
        except PolicyError as exc:
            fail(str(exc))
        from workers.gate.checks import GateError, model_columns, run_gate
        from workers.training.data import DataError, read_frame
        from workers.training.validate import validate_frame

        cand, cand_size, cand_verified = _load_model(candidate, "candidate", trust)
        prod, prod_verified = None, None
        if production is not None:
            prod, _, prod_verified = _load_model(production, "production", trust)
        try:
            frame = read_frame(data)
        except DataError as exc:
            fail(str(exc))
        target = pol.model.target
        if target not in frame.columns:
            fail(f"{data}: no target column '{target}' (from [model] target)")
        exclude = [pol.data.time_column]
        for role, model in (("candidate", cand), ("production", prod)):
            if model is None:
                continue
            missing = [c for c in model_columns(model, frame, target, exclude) if c not in frame.columns]
            if missing:
                fail(f"{data}: lacks the {role} model's feature columns {missing[:6]}")
        validation = validate_frame(
            frame,
            target=target,
            task=pol.model.task,
            min_rows=1,
            max_null_rate=pol.data.max_null_rate,
            features=model_columns(cand, frame, target, exclude),
            categorical=pol.data.categorical,
            time_column=pol.data.time_column if pol.data.time_column in frame.columns else None,
        )
        try:
            report = run_gate(cand, prod, frame, pol, validation=validation, candidate_size_bytes=cand_size)
        except GateError as exc:
            fail(str(exc))
        result = report.to_dict()
        result["model"] = pol.model.name
        result["artifacts"] = {
            "candidate": {"path": str(candidate), "sha256_verified": cand_verified},
            "production": None if production is None else {"path": str(production), "sha256_verified": prod_verified},
        }
        if as_json:
            print_json(result)
        else:
            _print_table(result, pol.model.name)
        if not report.passed:
            raise typer.Exit(GATE_FAILED)

