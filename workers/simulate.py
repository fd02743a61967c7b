"""Synthetic data for the demo, the tests and the benchmarks: a churn-like binary problem.

Rows have numeric and categorical features, a time column, and a label from a known rule, so
drift (shifted inputs, a changed rule) and corruption (label noise, broken columns) can be
dialled in and their effect is known.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = ["tenure", "monthly_spend", "support_calls", "plan", "region"]
CATEGORICAL = ["plan", "region"]
TARGET = "churned"
TIME = "event_time"
PLANS = ["basic", "plus", "pro"]
REGIONS = ["north", "south", "east", "west"]


def make_frame(n: int, *, start: datetime, end: datetime, shift: float = 0.0, concept: float = 0.0,
               label_noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """``n`` rows with times spread over ``[start, end)``.

    ``shift`` moves the input distributions (data drift); ``concept`` changes the rule that
    makes the label (concept drift: the old model gets worse); ``label_noise`` flips that share
    of labels (corrupted training data).
    """
    rng = np.random.default_rng(seed)
    span = (end - start).total_seconds()
    times = pd.to_datetime([start + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, span, n))], utc=True)
    tenure = rng.gamma(2.0 + shift * 2, 12.0, n)
    spend = rng.normal(60 + shift * 25, 15, n).clip(5, None)
    calls = rng.poisson(1.5 + shift * 2, n)
    plan = rng.choice(PLANS, n, p=[0.5 - shift * 0.2, 0.3, 0.2 + shift * 0.2])
    region = rng.choice(REGIONS, n)
    plan_effect = np.select([plan == "basic", plan == "plus"], [0.6, 0.0], -0.6)
    base = -0.04 * (tenure - 24) + 0.5 * (calls - 1.5) + 0.02 * (spend - 60) + plan_effect
    # A concept change: what support calls and the plan say about churn turns around.
    skew = -1.0 * (calls - 1.5) - 1.2 * plan_effect
    logit = base + concept * skew
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-3 * logit))).astype(int)
    if label_noise:
        flip = rng.uniform(size=n) < label_noise
        y = np.where(flip, 1 - y, y)
    return pd.DataFrame({TIME: times, "tenure": tenure, "monthly_spend": spend, "support_calls": calls,
                         "plan": plan, "region": region, TARGET: y})


def write_days(folder: str | Path, days: int, rows_per_day: int, *, end: datetime | None = None,
               seed: int = 0, **kwargs) -> list[Path]:
    """Write one Parquet file per day (``date=YYYY-MM-DD/part.parquet``), newest day ending at ``end``."""
    folder = Path(folder)
    end = end or datetime.now(timezone.utc)
    paths = []
    today = datetime(end.year, end.month, end.day, tzinfo=timezone.utc)
    for d in range(days):
        day_start = today - timedelta(days=days - 1 - d)
        day_end = min(day_start + timedelta(days=1), end)
        if day_end <= day_start:
            continue
        frame = make_frame(rows_per_day, start=day_start, end=day_end, seed=seed * 1000 + d, **kwargs)
        path = folder / f"date={day_start.date().isoformat()}" / "part.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
        paths.append(path)
    return paths
