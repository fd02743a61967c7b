"""``retrain drift``: data drift between a reference and a current data set, offline."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from workers.cli._common import console, fail, print_json

if TYPE_CHECKING:
    import pandas as pd
    from config.policy import Policy

_PARQUET = {".parquet", ".pq"}
_CSV = {".csv", ".tsv", ".txt"}


def read_table(path: Path, role: str) -> "pd.DataFrame":
    """Read Parquet or CSV (by extension, else Parquet then CSV); exit 2 with one line if unusable."""
    import pandas as pd

    if not path.exists():
        fail(f"{role} {path}: no such file")
    if path.is_dir():
        fail(f"{role} {path}: is a directory, not a file")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if any(s in _PARQUET for s in suffixes):
            df = pd.read_parquet(path)
        elif any(s in _CSV for s in suffixes):
            df = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",")
        else:
            try:
                df = pd.read_parquet(path)
            except Exception:
                df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        fail(f"{role} {path}: no data")
    except Exception as exc:  # any parser error is unusable input, one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fail(f"{role} {path}: cannot read as Parquet or CSV ({reason})")
    if df.shape[0] == 0 or df.shape[1] == 0:
        fail(f"{role} {path}: no data (0 rows or 0 columns)")
    return df


def _load_policy(path: Optional[Path]) -> "Policy | None":
    """The policy for this command: [drift] and [data] are enough, [model] may be absent."""
    from config.policy import PolicyError, load_policy, not_utf8, policy_from_dict

    if path is None:
        return None
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        fail(f"{path}: no such policy file")
    except tomllib.TOMLDecodeError as exc:
        fail(f"{path}: not valid TOML ({exc})")
    except OSError as exc:
        fail(f"{path}: cannot read ({exc.strerror})")
    except UnicodeDecodeError as exc:
        fail(f"{path}: {not_utf8(exc)}")
    try:
        if "model" in data:
            return load_policy(path)
        # A policy holding only the keys this command needs is valid for it.
        return policy_from_dict({**data, "model": {"name": "drift"}}, str(path))
    except PolicyError as exc:
        fail(str(exc))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _print_table(report: Any, reference: str, current: str) -> None:
    from rich.table import Table

    table = Table(title=f"Data drift: {reference} -> {current}", title_justify="left")
    for header, justify in (
        ("feature", "left"), ("kind", "left"), ("test", "left"), ("statistic", "right"),
        ("p-value", "right"), ("threshold", "right"), ("drifted", "center"),
    ):
        table.add_column(header, justify=justify, no_wrap=header != "feature")
    for f in report.features:
        drifted = "[bold red]yes[/]" if f.drifted else "no"
        if f.note:
            drifted += "*"
        test = f.test or f.status.replace("_", " ")
        table.add_row(
            f.name, f.kind[:3], test, _fmt(f.statistic), _fmt(f.p_value), _fmt(f.threshold), drifted
        )
    console.print(table)
    for f in report.features:
        if f.note:
            console.print(f"* {f.name}: {f.note}", highlight=False)
    verdict = "[bold red]DRIFT[/]" if report.dataset_drift else "[green]no drift[/]"
    counted = [f for f in report.features if f.status not in ("missing_column", "no_current_rows")]
    console.print(
        f"Dataset: {verdict} — drift score {report.drift_score:.3f} "
        f"({len(report.drifted_features)} of {len(counted)} features drifted; "
        f"dataset drift at >= {report.drift_share:.2f})"
    )
    if report.missing_columns:
        console.print(f"[yellow]Missing from current data (upstream problem):[/] {', '.join(report.missing_columns)}")
    if report.extra_columns:
        console.print(f"Extra columns ignored: {', '.join(report.extra_columns)}")
    for name, reason in report.skipped.items():
        console.print(f"Skipped {name}: {reason}")


def register(app: typer.Typer) -> None:
    @app.command("drift")
    def drift(
        reference: Path = typer.Option(
            ..., "--reference", "-r",
            help="Reference (training) data, Parquet or CSV, or a profile JSON saved with --save-profile.",
        ),
        current: Path = typer.Option(..., "--current", "-c", help="Current data, Parquet or CSV."),
        policy: Optional[Path] = typer.Option(
            None, "--policy", "-p", help="Policy TOML: its [drift] thresholds and [data] columns."
        ),
        save_profile: Optional[Path] = typer.Option(
            None, "--save-profile", help="Also write the reference profile as JSON here."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Compare current data with reference data, feature by feature (no server needed)."""
        from config.policy import DriftSection
        from events.monitors.drift import ReferenceProfile, build_profile, check_drift

        pol = _load_policy(policy)
        settings = pol.drift if pol is not None else DriftSection()
        if reference.suffix.lower() == ".json":
            if not reference.exists():
                fail(f"reference {reference}: no such file")
            try:
                profile = ReferenceProfile.from_dict(json.loads(reference.read_text()))
            except (ValueError, OSError) as exc:
                fail(f"reference {reference}: not a reference profile ({exc})")
        else:
            ref_df = read_table(reference, "reference")
            categorical: list[str] = []
            exclude: list[str] = []
            if pol is not None:
                categorical = list(pol.data.categorical)
                exclude = [pol.data.time_column, pol.model.target]
                if pol.data.features:
                    keep = set(pol.data.features)
                    exclude += [str(c) for c in ref_df.columns if str(c) not in keep]
            profile = build_profile(ref_df, categorical=categorical, exclude=exclude)
        if not profile.columns:
            fail(f"reference {reference}: no columns to compare")
        cur_df = read_table(current, "current")
        if save_profile is not None:
            try:
                profile.save(save_profile)
            except OSError as exc:
                fail(f"{save_profile}: cannot write ({exc.strerror})")
        report = check_drift(profile, cur_df, settings)
        if as_json:
            print_json(report.to_dict())
        else:
            _print_table(report, reference.name, current.name)
