"""Drift check speed: our profile + histogram check against Evidently's DataDriftPreset.

1M reference rows x 1M current rows (``--rows``), 40 numeric and 10 categorical columns, a few
of them shifted. The reference profile is built once (timed on its own), then the check is timed.
The same data goes, as Parquet, to Evidently 0.7.23 ``DataDriftPreset`` in its own virtualenv
(``bench/.venv-evidently``, created on first use: Evidently does not import with pandas 3 and is
not a project dependency) as a subprocess with a time limit. Reports both times, the ratio, and
whether the per-column verdicts agree (plus the largest difference of the statistics where both
ran the same test).

Bar (issue 4): check <= 5 s and >= 50x faster than Evidently on a 2-core machine, verdicts agree.

    .venv/bin/python bench/drift_speed.py --json                      # full size, minutes
    .venv/bin/python bench/drift_speed.py --rows 100000 --skip-evidently
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config.policy import DriftSection  # noqa: E402
from events.monitors.drift import build_profile, check_drift  # noqa: E402

EVIDENTLY_VENV = ROOT / "bench" / ".venv-evidently"
EVIDENTLY_REQUIREMENTS = ["evidently==0.7.23", "pandas<3", "pyarrow"]
N_NUMERIC, N_CATEGORICAL = 40, 10
SHIFTED_NUMERIC = {0: 0.3, 5: 0.5, 10: 0.25, 15: 0.4, 20: 0.3, 25: 0.6, 30: 0.35, 35: 0.5}
"""Numeric column -> shift in reference standard deviations."""
SHIFTED_CATEGORICAL = {0: 2.5, 4: 4.0, 7: 3.0}
"""Categorical column -> ratio between its most and least frequent category after the shift."""
CHECK_BAR_S = 5.0
SPEEDUP_BAR = 50.0

EVIDENTLY_RUNNER = r'''
import json, resource, sys, time
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

src = sys.argv[1]
t0 = time.perf_counter()
ref = pd.read_parquet(src + "/reference.parquet")
cur = pd.read_parquet(src + "/current.parquet")
num = json.loads(open(src + "/columns.json").read())
definition = DataDefinition(numerical_columns=num["numeric"], categorical_columns=num["categorical"])
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
snapshot = Report([DataDriftPreset()]).run(
    current_data=Dataset.from_pandas(cur, data_definition=definition),
    reference_data=Dataset.from_pandas(ref, data_definition=definition),
)
run_s = time.perf_counter() - t0
columns = {}
for metric in snapshot.dict()["metrics"]:
    config = metric.get("config", {})
    if not config.get("type", "").endswith("ValueDrift"):
        continue
    method, threshold, value = config["method"], config["threshold"], metric["value"]
    is_p_value = "p_value" in method or "p-value" in method
    drifted = value < threshold if is_p_value else value >= threshold
    columns[config["column"]] = {"method": method, "threshold": threshold, "value": value, "drifted": bool(drifted)}
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load_s, "run_s": run_s, "peak_rss_mb": peak_mb, "columns": columns}))
'''

SAME_TEST = {"wasserstein": "Wasserstein", "jensenshannon": "Jensen-Shannon", "ks": "K-S", "psi": "PSI"}


def make_data(rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    """Reference and current frames: mixed distributions, a few shifted columns, ~1% NaN in some."""
    rng = np.random.default_rng(seed)
    ref: dict[str, object] = {}
    cur: dict[str, object] = {}
    numeric = [f"num_{i:02d}" for i in range(N_NUMERIC)]
    categorical = [f"cat_{i}" for i in range(N_CATEGORICAL)]
    for i, name in enumerate(numeric):
        shift = SHIFTED_NUMERIC.get(i, 0.0)
        family = i % 5
        if family == 0:
            draw = lambda s: rng.normal(10.0 + s, 1.0, rows)  # noqa: E731
        elif family == 1:
            draw = lambda s: rng.lognormal(0.0, 0.5, rows) + s * 0.6  # std of lognormal(0, .5) ~ 0.6
        elif family == 2:
            draw = lambda s: rng.uniform(0.0, 1.0, rows) + s * 0.289
        elif family == 3:
            draw = lambda s: rng.exponential(2.0, rows) + s * 2.0
        else:
            draw = lambda s: rng.poisson(20, rows).astype(float) + np.round(s * 4.47)
        ref[name], cur[name] = draw(0.0), draw(shift)
        if i % 7 == 3:  # a little missing data on both sides
            for side in (ref[name], cur[name]):
                side[rng.random(rows) < 0.01] = np.nan
    for i, name in enumerate(categorical):
        k = 4 + i
        labels = np.array([f"{name}_v{j}" for j in range(k)], dtype=object)
        p_ref = np.ones(k) / k
        ratio = SHIFTED_CATEGORICAL.get(i)
        p_cur = np.geomspace(ratio, 1.0, k) if ratio else np.ones(k)
        p_cur = p_cur / p_cur.sum()
        ref[name] = pd.Series(labels[rng.choice(k, rows, p=p_ref)], dtype="str")
        cur[name] = pd.Series(labels[rng.choice(k, rows, p=p_cur)], dtype="str")
    return pd.DataFrame(ref), pd.DataFrame(cur), numeric, categorical


def ensure_evidently_venv() -> Path:
    """The Evidently virtualenv's python, creating the venv on first use."""
    python = EVIDENTLY_VENV / "bin" / "python"
    probe = [str(python), "-c", "import evidently, pandas; assert evidently.__version__ == '0.7.23'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run(["python3", "-m", "venv", str(EVIDENTLY_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *EVIDENTLY_REQUIREMENTS],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900,
    )
    return python


def run_evidently(ref: pd.DataFrame, cur: pd.DataFrame, numeric: list[str], categorical: list[str],
                  timeout: float) -> dict:
    try:
        python = ensure_evidently_venv()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return {"error": f"cannot set up {EVIDENTLY_VENV}: {exc}"}
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        ref.to_parquet(f"{tmp}/reference.parquet")
        cur.to_parquet(f"{tmp}/current.parquet")
        Path(tmp, "columns.json").write_text(json.dumps({"numeric": numeric, "categorical": categorical}))
        Path(tmp, "runner.py").write_text(EVIDENTLY_RUNNER)
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "DO_NOT_TRACK": "1"}
        try:
            proc = subprocess.run([str(python), f"{tmp}/runner.py", tmp], capture_output=True, text=True,
                                  timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(report, evidently: dict) -> dict:
    """Per-column verdict agreement and the largest statistic difference on shared tests."""
    disagreements, diffs = [], []
    for f in report.features:
        ev = evidently["columns"].get(f.name)
        if ev is None:
            disagreements.append({"name": f.name, "ours": f.distribution_drifted, "evidently": None})
            continue
        if ev["drifted"] != f.distribution_drifted:
            disagreements.append({"name": f.name, "ours": f.distribution_drifted, "evidently": ev["drifted"],
                                  "our_test": f.test, "our_statistic": f.statistic,
                                  "evidently_method": ev["method"], "evidently_value": ev["value"]})
        label = SAME_TEST.get(f.test or "")
        if label and label in ev["method"] and f.statistic is not None:
            diffs.append(abs(f.statistic - ev["value"]))
    return {
        "verdicts_agree": not disagreements,
        "disagreements": disagreements,
        "columns_compared": len(report.features),
        "max_statistic_diff": max(diffs) if diffs else None,
        "drifted_evidently": sorted(n for n, c in evidently["columns"].items() if c["drifted"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in each of reference and current")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--skip-evidently", action="store_true", help="time our check only")
    parser.add_argument("--evidently-timeout", type=float, default=1500.0, help="seconds before giving up on Evidently")
    parser.add_argument("--repeat", type=int, default=3, help="check repetitions (the best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ref, cur, numeric, categorical = make_data(args.rows, args.seed)
    t0 = time.perf_counter()
    profile = build_profile(ref)
    build_s = time.perf_counter() - t0
    profile_json_mb = len(json.dumps(profile.to_dict())) / 1e6
    settings = DriftSection()
    times = []
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        report = check_drift(profile, cur, settings)
        times.append(time.perf_counter() - t0)
    check_s = min(times)
    result: dict = {
        "rows": args.rows,
        "numeric_columns": len(numeric),
        "categorical_columns": len(categorical),
        "profile_build_s": round(build_s, 3),
        "profile_json_mb": round(profile_json_mb, 2),
        "check_s": round(check_s, 3),
        "check_s_all": [round(t, 3) for t in times],
        "drifted_ours": sorted(f.name for f in report.features if f.distribution_drifted),
        "tests_ours": sorted({f.test for f in report.features if f.test}),
        "bar": {"check_s_max": CHECK_BAR_S, "speedup_min": SPEEDUP_BAR},
    }
    expected = sorted([numeric[i] for i in SHIFTED_NUMERIC] + [categorical[i] for i in SHIFTED_CATEGORICAL])
    result["detected_the_shifted_columns"] = result["drifted_ours"] == expected
    meets = check_s <= CHECK_BAR_S and result["detected_the_shifted_columns"]
    if not args.skip_evidently:
        evidently = run_evidently(ref, cur, numeric, categorical, args.evidently_timeout)
        if "error" in evidently:
            result["evidently_error"] = evidently["error"]
            meets = False
        else:
            result.update(
                evidently_s=round(evidently["run_s"], 2),
                evidently_load_s=round(evidently["load_s"], 2),
                evidently_peak_rss_mb=round(evidently["peak_rss_mb"]),
                speedup=round(evidently["run_s"] / check_s, 1),
                speedup_incl_profile_build=round(evidently["run_s"] / (check_s + build_s), 1),
                **compare(report, evidently),
            )
            meets = meets and result["speedup"] >= SPEEDUP_BAR and result["verdicts_agree"]
    result["meets_bar"] = meets
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0 if meets else 1


if __name__ == "__main__":
    sys.exit(main())
