"""Drift statistics (events/monitors/drift.py), their scipy parity, and `retrain drift`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance

from config.policy import DriftSection, FeatureDrift
from events.monitors import drift_tests as dt
from events.monitors.drift import (
    LOW_CARDINALITY,
    ReferenceProfile,
    build_profile,
    check_drift,
    prediction_drift,
)

RETRAIN = Path(sys.executable).with_name("retrain")
if not RETRAIN.exists():  # pragma: no cover - a differently laid out environment
    RETRAIN = Path(shutil.which("retrain") or "retrain")


def feature(report, name):
    return next(f for f in report.features if f.name == name)


def rng(seed=0):
    return np.random.default_rng(seed)


def shares_in(x, edges):
    """Share of x in each [edge, next edge) bin, by pandas (independent of our binning)."""
    return pd.Series(pd.cut(x, edges, right=False)).value_counts(sort=False).to_numpy() / x.size


def cats(r, n, labels, p=None):
    return pd.Series(np.asarray(labels, dtype=object)[r.choice(len(labels), n, p=p)], dtype=object)


# ============================================================================ scipy parity


class TestScipyParity:
    def test_ks_statistic_and_p_value_equal_scipy(self):
        """Small reference: the KS statistic and p-value are scipy's ks_2samp on the finite values."""
        r = rng(1)
        ref = r.normal(0, 1, 800)
        cur = r.normal(0.15, 1, 1200)
        ref[::50] = np.nan
        cur[::70] = np.nan
        f = feature(check_drift(build_profile(pd.DataFrame({"x": ref})), pd.DataFrame({"x": cur})), "x")
        want = stats.ks_2samp(ref[~np.isnan(ref)], cur[~np.isnan(cur)])
        assert f.test == "ks"
        assert f.statistic == pytest.approx(want.statistic, rel=1e-12, abs=1e-15)
        assert f.p_value == pytest.approx(want.pvalue, rel=1e-9, abs=1e-15)

    def test_chisquare_equals_contingency_test_on_raw_crosstab(self):
        """Small reference: chi-square is scipy's two-sample chi2_contingency, unseen category included."""
        r = rng(2)
        ref = cats(r, 600, ["a", "b", "c", "d"])
        cur = cats(r, 900, ["a", "b", "c", "d", "e"], p=[0.3, 0.25, 0.2, 0.15, 0.1])
        f = feature(check_drift(build_profile(pd.DataFrame({"c": ref})), pd.DataFrame({"c": cur})), "c")
        side = np.r_[np.zeros(len(ref)), np.ones(len(cur))]
        table = pd.crosstab(side, pd.concat([ref, cur], ignore_index=True))
        want = stats.chi2_contingency(table.to_numpy(), correction=False)
        assert f.test == "chisquare"
        assert f.statistic == pytest.approx(want.statistic, rel=1e-12)
        assert f.p_value == pytest.approx(want.pvalue, rel=1e-9)

    def test_z_test_matches_scipy_two_by_two_contingency(self):
        """Binary column: z squared and the p-value equal scipy's uncorrected 2x2 chi-square."""
        r = rng(3)
        ref = cats(r, 500, ["yes", "no"], p=[0.3, 0.7])
        cur = cats(r, 700, ["yes", "no"], p=[0.36, 0.64])
        f = feature(check_drift(build_profile(pd.DataFrame({"b": ref})), pd.DataFrame({"b": cur})), "b")
        table = [[(ref == "yes").sum(), (ref == "no").sum()], [(cur == "yes").sum(), (cur == "no").sum()]]
        want = stats.chi2_contingency(table, correction=False)
        assert f.test == "z"
        assert f.statistic**2 == pytest.approx(want.statistic, rel=1e-12)
        assert f.p_value == pytest.approx(want.pvalue, rel=1e-9)

    def test_wasserstein_on_complete_reference_equals_scipy(self):
        """With the whole reference in the profile, Wasserstein is scipy's on raw data / np.std(ref)."""
        r = rng(4)
        ref, cur = r.lognormal(0, 0.7, 900), r.lognormal(0.1, 0.7, 1500)
        settings = DriftSection(features={"x": FeatureDrift(test="wasserstein")})
        f = feature(check_drift(build_profile(pd.DataFrame({"x": ref})), pd.DataFrame({"x": cur}), settings), "x")
        want = stats.wasserstein_distance(ref, cur) / np.std(ref)
        assert f.test == "wasserstein" and f.p_value is None
        assert f.statistic == pytest.approx(want, rel=1e-12)

    def test_jensenshannon_equals_scipy_on_raw_frequencies(self):
        """Large reference: JS distance is scipy's jensenshannon of both sides' frequencies."""
        r = rng(5)
        ref = cats(r, 5000, list("abcdef"))
        cur = cats(r, 4000, list("abcdefg"), p=[0.2, 0.2, 0.15, 0.15, 0.1, 0.1, 0.1])
        f = feature(check_drift(build_profile(pd.DataFrame({"c": ref})), pd.DataFrame({"c": cur})), "c")
        keys = sorted(set(ref) | set(cur))
        want = distance.jensenshannon(ref.value_counts().reindex(keys, fill_value=0).to_numpy(),
                                      cur.value_counts().reindex(keys, fill_value=0).to_numpy())
        assert f.test == "jensenshannon"
        assert f.statistic == pytest.approx(want, rel=1e-12)

    @pytest.mark.parametrize("family", ["normal", "lognormal", "poisson", "point_mass_mixture"])
    @pytest.mark.parametrize("shift", [0.0, 0.05, 0.3])
    def test_binned_wasserstein_is_within_1e3_of_scipy_on_raw_data(self, family, shift):
        """Large reference: the histogram Wasserstein is within 1e-3 of scipy's on the raw data."""
        r = rng(6)
        n = 200_000
        gen = {
            "normal": lambda s: r.normal(s, 1, n),
            "lognormal": lambda s: r.lognormal(s, 1, n),
            "poisson": lambda s: r.poisson(3 + 2 * s, n).astype(float),
            "point_mass_mixture": lambda s: np.where(r.random(n) < 0.3, 0.0, r.exponential(1 + s, n)),
        }[family]
        ref, cur = gen(0.0), gen(shift)
        ref[::97], cur[::89] = np.nan, np.nan  # missing values are in no bin
        f = feature(check_drift(build_profile(pd.DataFrame({"x": ref})), pd.DataFrame({"x": cur})), "x")
        ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
        want = stats.wasserstein_distance(ref, cur) / np.std(ref)
        assert f.test == "wasserstein" and f.n_current == cur.size
        assert abs(f.statistic - want) < 1e-3

    def test_binned_wasserstein_is_exact_for_a_clear_shift(self):
        """Where the CDFs never cross, the histogram Wasserstein equals scipy's to float precision."""
        r = rng(7)
        ref, cur = r.normal(0, 1, 100_000), r.normal(1.0, 1.3, 100_000) + 2.0
        f = feature(check_drift(build_profile(pd.DataFrame({"x": ref})), pd.DataFrame({"x": cur})), "x")
        assert f.statistic == pytest.approx(stats.wasserstein_distance(ref, cur) / np.std(ref), rel=1e-9)

    def test_psi_matches_the_textbook_formula_on_reference_deciles(self):
        """PSI on a numeric column is sum((c - r) ln(c / r)) over the reference's decile bins."""
        r = rng(8)
        ref, cur = r.normal(0, 1, 20_000), r.normal(0.2, 1.1, 15_000)
        settings = DriftSection(method="psi")
        f = feature(check_drift(build_profile(pd.DataFrame({"x": ref})), pd.DataFrame({"x": cur}), settings), "x")
        edges = [-np.inf, *np.quantile(ref, np.linspace(0, 1, 11)[1:-1]), np.inf]
        p, q = shares_in(ref, edges), shares_in(cur, edges)
        assert f.test == "psi" and f.threshold == settings.psi_threshold
        assert f.statistic == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-9)

    def test_psi_callable_is_symmetric_kl_with_epsilon_for_empty_bins(self):
        """An empty bin gets share PSI_EPSILON, so PSI is finite: sum((c - r) ln(c / r))."""
        ref, cur = np.array([50, 30, 20, 0]), np.array([40, 30, 20, 10])
        r = np.array([0.5, 0.3, 0.2, dt.PSI_EPSILON])
        c = np.array([0.4, 0.3, 0.2, 0.1])
        assert dt.psi(ref, cur).statistic == pytest.approx(np.sum((c - r) * np.log(c / r)), rel=1e-12)


# ============================================================================= test choice


class TestTestChoice:
    def small_frame(self, r, n):
        return pd.DataFrame({
            "num": r.normal(0, 1, n),
            "cat": cats(r, n, list("abc")),
            "bin": cats(r, n, ["y", "n"]),
            "few": r.integers(0, 3, n).astype(float),
        })

    def test_small_reference_uses_ks_chisquare_and_z(self):
        """Reference <= small_sample_size: KS numeric, chi-square categorical, z binary, chi-square few-valued."""
        r = rng(10)
        report = check_drift(build_profile(self.small_frame(r, 1000)), self.small_frame(r, 500))
        assert [feature(report, c).test for c in ("num", "cat", "bin", "few")] == ["ks", "chisquare", "z", "chisquare"]

    def test_large_reference_uses_wasserstein_and_jensenshannon(self):
        """Reference > small_sample_size: Wasserstein numeric, JS categorical and few-valued numeric."""
        r = rng(11)
        report = check_drift(build_profile(self.small_frame(r, 1001)), self.small_frame(r, 500))
        assert [feature(report, c).test for c in ("num", "cat", "bin", "few")] == [
            "wasserstein", "jensenshannon", "jensenshannon", "jensenshannon"]

    def test_few_valued_numeric_gets_numeric_test_when_current_adds_values(self):
        """Evidently's rule counts distinct values of both sides: more than LOW_CARDINALITY -> numeric test."""
        r = rng(12)
        ref = pd.DataFrame({"few": r.integers(0, LOW_CARDINALITY, 500).astype(float)})
        cur = pd.DataFrame({"few": r.integers(0, LOW_CARDINALITY + 3, 500).astype(float)})
        assert feature(check_drift(build_profile(ref), cur), "few").test == "ks"

    def test_per_feature_test_and_threshold_override_the_defaults(self):
        """features[name].test/threshold replace the automatic choice and the policy threshold."""
        r = rng(13)
        settings = DriftSection(features={
            "num": FeatureDrift(test="psi", threshold=0.5),
            "cat": FeatureDrift(test="jensenshannon"),
        })
        report = check_drift(build_profile(self.small_frame(r, 800)), self.small_frame(r, 800), settings)
        assert (feature(report, "num").test, feature(report, "num").threshold) == ("psi", 0.5)
        assert (feature(report, "cat").test, feature(report, "cat").threshold) == ("jensenshannon", 0.1)
        assert feature(report, "bin").test == "z"

    def test_numeric_test_requested_on_categorical_falls_back_with_a_note(self):
        """Asking KS for a categorical column gives the default test and says so."""
        r = rng(14)
        settings = DriftSection(features={"cat": FeatureDrift(test="ks")})
        f = feature(check_drift(build_profile(self.small_frame(r, 300)), self.small_frame(r, 300), settings), "cat")
        assert f.test == "chisquare" and "does not apply" in f.note

    def test_method_ks_on_large_reference_uses_the_stored_sample(self):
        """method = "ks" on a large reference runs KS against the profile's bounded sample."""
        r = rng(15)
        ref, cur = pd.DataFrame({"x": r.normal(0, 1, 20_000)}), pd.DataFrame({"x": r.normal(0, 1, 3000)})
        profile = build_profile(ref, sample_size=2000)
        f = feature(check_drift(profile, cur, DriftSection(method="ks")), "x")
        want = stats.ks_2samp(profile.columns["x"].sample, cur["x"].to_numpy())
        assert f.test == "ks" and "2000-value reference sample" in f.note
        assert f.p_value == pytest.approx(want.pvalue, rel=1e-9)


# =============================================================================== detection


class TestDetection:
    @pytest.mark.parametrize("n_ref", [500, 20_000], ids=["small", "large"])
    def test_known_shift_is_detected_and_unshifted_columns_are_not(self, n_ref):
        """A 0.5-std mean shift and a reweighted category are drifted; their untouched twins are not."""
        r = rng(20)
        n_cur = 2000

        def frame(n, shift):
            p = [0.55, 0.25, 0.2] if shift else [1 / 3] * 3
            return pd.DataFrame({
                "moved": r.normal(0.5 if shift else 0.0, 1, n),
                "still": r.normal(0, 1, n),
                "cat_moved": cats(r, n, list("abc"), p=p),
                "cat_still": cats(r, n, list("abc")),
            })

        report = check_drift(build_profile(frame(n_ref, False)), frame(n_cur, True))
        assert sorted(report.drifted_features) == ["cat_moved", "moved"]
        assert report.drift_score == 0.5 and report.dataset_drift

    def test_false_alarm_rate_of_the_tests_is_near_alpha(self):
        """Two samples of one distribution, 300 seeds: each test alarms at about alpha = 0.05."""
        alarms = {"ks": 0, "chisquare": 0, "z": 0}
        trials = 300
        for seed in range(trials):
            r = rng(1000 + seed)

            def frame():
                return pd.DataFrame({
                    "ks": r.normal(0, 1, 200),
                    "chisquare": cats(r, 200, list("abcd")),
                    "z": cats(r, 200, ["y", "n"], p=[0.4, 0.6]),
                })

            report = check_drift(build_profile(frame()), frame())
            for f in report.features:
                assert f.test == f.name
                alarms[f.name] += f.drifted
        rates = {k: v / trials for k, v in alarms.items()}
        for name, rate in rates.items():
            assert 0.015 <= rate <= 0.09, rates

    def test_two_samples_chisquare_keeps_alpha_where_goodness_of_fit_does_not(self):
        """The two-sample chi-square keeps alpha at small n; Evidently's exact-reference GOF inflates it."""
        ours = gof = 0
        trials = 200
        for seed in range(trials):
            r = rng(5000 + seed)
            p = [0.4, 0.3, 0.15, 0.1, 0.05]
            ref, cur = cats(r, 150, list("abcde"), p), cats(r, 1000, list("abcde"), p)
            ref_counts = ref.value_counts().reindex(list("abcde"), fill_value=0).to_numpy()
            cur_counts = cur.value_counts().reindex(list("abcde"), fill_value=0).to_numpy()
            ours += dt.chisquare(ref_counts, cur_counts).p_value < 0.05
            gof += stats.chisquare(cur_counts, ref_counts * len(cur) / len(ref)).pvalue < 0.05
        assert ours / trials <= 0.09 and gof / trials >= 2 * ours / trials

    def test_distances_stay_below_threshold_for_one_distribution(self):
        """Large samples of one distribution: normed Wasserstein and JS stay far below 0.1."""
        for seed in range(5):
            r = rng(2000 + seed)

            def frame():
                return pd.DataFrame({"x": r.gamma(2.0, 1.0, 20_000), "c": cats(r, 20_000, list("abcdefgh"))})

            report = check_drift(build_profile(frame()), frame())
            assert not report.drifted_features
            assert all(f.statistic < 0.05 for f in report.features)


# ============================================================================== messy data


class TestMessyData:
    def base(self, r, n=3000):
        return pd.DataFrame({"x": r.normal(0, 1, n), "c": cats(r, n, list("abc"))})

    @pytest.mark.parametrize("n", [3000, 20_000], ids=["whole-sample", "histogram"])
    def test_missing_rate_jump_is_its_own_signal(self, n):
        """30% NaNs in current: missing-rate drift reported and counted; the distribution did not move."""
        r = rng(30)
        cur = self.base(r, n)
        cur.loc[r.random(len(cur)) < 0.3, "x"] = np.nan
        cur.loc[r.random(len(cur)) < 0.3, "c"] = None
        report = check_drift(build_profile(self.base(r, n)), cur)
        for name in ("x", "c"):
            f = feature(report, name)
            assert f.missing_rate_drifted and f.drifted and not f.distribution_drifted
            assert f.missing_rate_change == pytest.approx(0.3, abs=0.03)
            assert "missing rate" in f.note

    def test_small_missing_rate_change_is_not_drift(self):
        """A missing-rate change below missing_rate_threshold is reported but not drift."""
        r = rng(31)
        cur = self.base(r)
        cur.loc[r.random(len(cur)) < 0.05, "x"] = np.nan
        f = feature(check_drift(build_profile(self.base(r)), cur), "x")
        assert f.missing_rate_change == pytest.approx(0.05, abs=0.02)
        assert not f.missing_rate_drifted and not f.drifted

    def test_infinite_and_non_numeric_values_count_as_missing(self):
        """inf and text in a numeric column are missing values, with a note, never an exception."""
        r = rng(32)
        cur = self.base(r).astype({"x": object})
        cur.loc[:9, "x"] = "n/a"
        cur.loc[10:19, "x"] = np.inf
        f = feature(check_drift(build_profile(self.base(r)), cur), "x")
        assert f.status == "ok" and f.n_current == len(cur) - 20
        assert "non-numeric" in f.note and "infinite" in f.note

    @pytest.mark.parametrize("n", [300, 3000], ids=["small", "large"])
    def test_unseen_categories_are_counted_and_tested(self, n):
        """Categories absent from the reference are counted, shared out, and part of the test."""
        r = rng(33)
        cur = self.base(r, n)
        cur.loc[: n // 4, "c"] = "brand-new"
        f = feature(check_drift(build_profile(self.base(r, n)), cur), "c")
        assert f.unseen_categories == 1
        assert f.unseen_share == pytest.approx((n // 4 + 1) / n)
        assert f.drifted and "unseen" in f.note

    def test_constant_columns_compare_cleanly(self):
        """A constant reference: same constant is no drift, another constant is drift, no exception."""
        ref = pd.DataFrame({"k": np.full(2000, 5.0), "s": ["on"] * 2000})
        same = check_drift(build_profile(ref), ref.copy())
        other = check_drift(build_profile(ref), pd.DataFrame({"k": np.full(500, 7.0), "s": ["off"] * 500}))
        assert not same.drifted_features and all(f.statistic == 0 for f in same.features)
        assert sorted(other.drifted_features) == ["k", "s"]

    def test_constant_reference_wasserstein_uses_the_std_floor(self):
        """Wasserstein against a constant reference is normed by the floor, finite and flagged."""
        ref = pd.DataFrame({"k": np.full(20_000, 5.0)})
        settings = DriftSection(features={"k": FeatureDrift(test="wasserstein")})
        f = feature(check_drift(build_profile(ref), pd.DataFrame({"k": np.full(100, 5.01)}), settings), "k")
        assert f.statistic == pytest.approx(0.01 / dt.WASSERSTEIN_STD_FLOOR, rel=1e-6)
        assert f.drifted

    def test_all_missing_current_column_is_empty_not_an_error(self):
        """A current column of only NaN: status empty_current, no statistic, missing-rate drift."""
        r = rng(34)
        cur = self.base(r)
        cur["x"] = np.nan
        cur["c"] = None
        report = check_drift(build_profile(self.base(r)), cur)
        for name in ("x", "c"):
            f = feature(report, name)
            assert f.status == "empty_current" and f.statistic is None
            assert f.missing_rate_current == 1.0 and f.drifted

    def test_current_without_rows_is_reported_not_scored(self):
        """Zero current rows: every feature says so and the dataset is not called drifted."""
        r = rng(35)
        report = check_drift(build_profile(self.base(r)), self.base(r).iloc[0:0])
        assert {f.status for f in report.features} == {"no_current_rows"}
        assert report.drift_score == 0.0 and not report.dataset_drift

    def test_missing_column_is_an_upstream_problem_not_drift(self):
        """A column absent from current data is reported as missing_column and left out of the score."""
        r = rng(36)
        cur = self.base(r).drop(columns=["c"])
        cur["x"] += 2.0
        report = check_drift(build_profile(self.base(r)), cur)
        f = feature(report, "c")
        assert f.status == "missing_column" and not f.drifted and f.statistic is None
        assert report.missing_columns == ["c"]
        assert report.drift_score == 1.0  # one judged feature, drifted
        assert "c" not in report.drifted_features

    def test_extra_columns_are_listed_and_ignored(self):
        """Columns only in current data are listed as extra, not tested; excluded ones are not extra."""
        r = rng(37)
        ref = self.base(r)
        ref["target"] = 1
        cur = self.base(r)
        cur["target"] = 0
        cur["surprise"] = 1.0
        report = check_drift(build_profile(ref, exclude=["target"]), cur)
        assert report.extra_columns == ["surprise"]
        assert {f.name for f in report.features} == {"x", "c"}

    def test_empty_reference_column_and_unsupported_types(self):
        """An all-NaN reference column is empty_reference; datetime and id columns are skipped."""
        r = rng(38)
        ref = self.base(r)
        ref["void"] = np.nan
        ref["when"] = pd.date_range("2024-01-01", periods=len(ref), freq="min")
        ref["id"] = [f"user-{i}" for i in range(len(ref))]
        profile = build_profile(ref)
        assert set(profile.skipped) == {"when", "id"}
        cur = self.base(r)
        cur["void"] = r.normal(0, 1, len(cur))
        cur["when"] = ref["when"]
        report = check_drift(profile, cur)
        assert feature(report, "void").status == "empty_reference"
        assert report.extra_columns == []

    def test_text_categories_against_numbers_are_compared_as_text(self):
        """A categorical reference of text against numeric current values compares them as text."""
        ref = pd.DataFrame({"code": pd.Series(["1", "2", "3"] * 400, dtype=object)})
        cur = pd.DataFrame({"code": [1, 2, 3] * 300})
        f = feature(check_drift(build_profile(ref), cur), "code")
        assert f.unseen_categories == 0 and not f.drifted and "as text" in f.note


# ============================================================================ dataset score


class TestReviewedEdges:
    def test_an_override_threshold_applies_only_to_its_own_test(self):
        """A p-value threshold set for z (or ks) is not read as a distance when the column needs another test: equal
        distributions do not drift (they did, at 0.01 against Wasserstein/JS distances)."""
        rng = np.random.default_rng(1)
        ref, cur = pd.DataFrame({"x": rng.normal(size=5000)}), pd.DataFrame({"x": rng.normal(size=5000)})
        report = check_drift(build_profile(ref), cur, DriftSection(features={"x": FeatureDrift(test="z", threshold=0.01)}))
        [f] = report.features
        assert f.test == "wasserstein" and f.threshold != 0.01 and not f.drifted
        ref = pd.DataFrame({"c": rng.choice(list("abcd"), 5000)})
        cur = pd.DataFrame({"c": rng.choice(list("abcd"), 5000)})
        report = check_drift(build_profile(ref), cur, DriftSection(features={"c": FeatureDrift(test="ks", threshold=0.01)}))
        assert not report.features[0].drifted

    def test_psi_sees_a_shift_away_from_a_constant_reference(self):
        """A constant reference has one quantile edge: everything at or above it was one bin and PSI stayed 0."""
        rng = np.random.default_rng(1)
        ref, cur = pd.DataFrame({"x": np.full(3000, 5.0)}), pd.DataFrame({"x": rng.normal(100, 10, 3000)})
        [f] = check_drift(build_profile(ref), cur, DriftSection(method="psi")).features
        assert f.test == "psi" and f.statistic > 1 and f.drifted

    def test_whole_floats_match_text_categories(self):
        """Reference "1","2","3"; current 1.0, 2.0, 3.0 (an integer column made float by missing values): the same
        categories, not three unseen ones."""
        rng = np.random.default_rng(1)
        ref = pd.DataFrame({"c": rng.choice(["1", "2", "3"], 500)})
        cur = pd.DataFrame({"c": rng.choice([1.0, 2.0, 3.0, np.nan], 500)})
        [f] = check_drift(build_profile(ref), cur).features
        assert not f.distribution_drifted and "unseen" not in f.note


class TestDatasetScore:
    def frames(self):
        r = rng(40)
        ref = pd.DataFrame({k: r.normal(0, 1, 3000) for k in "abcd"})
        cur = pd.DataFrame({k: r.normal(1.0 if k == "a" else 0.0, 1, 3000) for k in "abcd"})
        return build_profile(ref), cur

    def test_score_is_the_share_of_drifted_features(self):
        """One of four features drifted: score 0.25, dataset drift only once the share is reached."""
        profile, cur = self.frames()
        assert check_drift(profile, cur).drift_score == 0.25
        assert not check_drift(profile, cur, DriftSection(dataset_drift_share=0.5)).dataset_drift
        assert check_drift(profile, cur, DriftSection(dataset_drift_share=0.25)).dataset_drift

    def test_score_can_be_weighted_by_importance(self):
        """weight_by_importance: a drifted feature of importance 3 among 1s scores 3/6."""
        profile, cur = self.frames()
        settings = DriftSection(weight_by_importance=True, features={"a": FeatureDrift(importance=3)})
        report = check_drift(profile, cur, settings)
        assert report.drift_score == pytest.approx(0.5) and report.dataset_drift
        assert check_drift(profile, cur, DriftSection(features=settings.features)).drift_score == 0.25

    def test_to_dict_has_exactly_the_design_shape(self):
        """to_dict() is {dataset_drift, drift_score, features}; features carry the documented keys."""
        profile, cur = self.frames()
        out = json.loads(json.dumps(check_drift(profile, cur).to_dict(), allow_nan=False))
        assert set(out) == {"dataset_drift", "drift_score", "features"}
        for f in out["features"]:
            assert {"name", "kind", "test", "statistic", "p_value", "threshold", "drifted"} <= set(f)
            assert f["p_value"] is None and f["kind"] == "numeric"
        full = check_drift(profile, cur).to_dict(full=True)
        assert full["drifted_features"] == ["a"] and full["n_current"] == 3000


# ================================================================================= profile


class TestProfile:
    def mixed(self, n, seed):
        r = rng(seed)
        df = pd.DataFrame({
            "x": r.normal(0, 1, n), "y": r.exponential(1, n), "few": r.integers(0, 3, n),
            "c": cats(r, n, list("abcd")), "flag": r.random(n) < 0.3,
        })
        df.loc[df.index[::17], "y"] = np.nan
        return df

    @pytest.mark.parametrize("n", [600, 30_000], ids=["small", "large"])
    def test_profile_round_trips_through_json_to_the_same_report(self, n):
        """A profile saved as JSON and loaded back gives exactly the same drift report."""
        profile = build_profile(self.mixed(n, 50), categorical=["few"])
        text = json.dumps(profile.to_dict(), allow_nan=False)
        loaded = ReferenceProfile.from_dict(json.loads(text))
        cur = self.mixed(n // 2, 51)
        cur["x"] += 0.3
        assert check_drift(loaded, cur).to_dict(full=True) == check_drift(profile, cur).to_dict(full=True)
        assert loaded.columns["few"].kind == "categorical" and loaded.columns["flag"].kind == "categorical"

    def test_sample_is_sorted_bounded_and_complete_when_small(self):
        """The KS sample is sorted, capped at sample_size, and the whole column when it fits."""
        big = build_profile(self.mixed(30_000, 52), sample_size=1000).columns["x"]
        small = build_profile(self.mixed(800, 53)).columns["x"]
        assert big.sample.size == 1000 and not big.sample_complete
        assert np.all(np.diff(big.sample) >= 0)
        assert small.sample.size == 800 and small.sample_complete

    def test_save_and_load_via_file(self, tmp_path):
        """save()/load() write and read one JSON file."""
        profile = build_profile(self.mixed(500, 54))
        profile.save(tmp_path / "p.json")
        assert ReferenceProfile.load(tmp_path / "p.json").to_dict() == profile.to_dict()

    def test_from_dict_rejects_what_is_not_a_profile(self):
        """A dict that is not a profile raises ValueError with a reason."""
        with pytest.raises(ValueError):
            ReferenceProfile.from_dict({"format": 1, "columns": [{"kind": "numeric"}]})
        with pytest.raises(ValueError):
            ReferenceProfile.from_dict({"format": 99})


# ========================================================================== concept drift


class TestPredictionDrift:
    def test_psi_of_scores_is_small_for_one_distribution_and_large_for_a_shift(self):
        """Same score distribution: PSI near 0; shifted scores: PSI above the 0.2 threshold."""
        r = rng(60)
        ref = r.beta(2, 5, 20_000)
        same, _ = prediction_drift(ref, r.beta(2, 5, 10_000))
        moved, details = prediction_drift(ref, r.beta(3, 4, 10_000))
        assert same < 0.02 and moved > 0.2
        assert details["kind"] == "scores" and len(details["bins"]) == 9

    def test_psi_of_scores_matches_the_formula_on_reference_quantiles(self):
        """Score PSI equals sum((c - r) ln(c / r)) over the reference's quantile bins."""
        r = rng(61)
        ref, cur = r.beta(2, 5, 20_000), r.beta(2.5, 5, 8000)
        value, _ = prediction_drift(ref, cur, "psi", bins=5)
        edges = [-np.inf, *np.quantile(ref, np.linspace(0, 1, 6)[1:-1]), np.inf]
        p, q = shares_in(ref, edges), shares_in(cur, edges)
        assert value == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-9)

    def test_js_of_classes_equals_scipy_and_handles_unseen_classes(self):
        """Predicted classes: JS is scipy's on class frequencies; an unseen class is part of it."""
        r = rng(62)
        ref = cats(r, 5000, ["a", "b", "c"])
        cur = cats(r, 3000, ["a", "b", "c", "z"], p=[0.3, 0.3, 0.3, 0.1])
        value, details = prediction_drift(ref, cur, "js")
        keys = ["a", "b", "c", "z"]
        want = distance.jensenshannon(ref.value_counts().reindex(keys, fill_value=0),
                                      cur.value_counts().reindex(keys, fill_value=0))
        assert value == pytest.approx(want, rel=1e-12) and "z" in details["classes"]
        psi, psi_details = prediction_drift(ref, cur, "psi")
        assert np.isfinite(psi) and psi_details["classes"][-1] == "<unseen>"

    def test_no_current_scores_gives_nan_with_a_note(self):
        """Empty or all-missing current scores: NaN and a note, not an exception."""
        value, details = prediction_drift(np.linspace(0, 1, 100), np.array([np.nan, np.nan]))
        assert np.isnan(value) and details["missing_current"] == 2 and details["note"]


# ===================================================================================== CLI


def run_cli(*args):
    return subprocess.run([str(RETRAIN), "drift", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="class")
def data_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    r = rng(70)
    n = 2000
    ref = pd.DataFrame({"x": r.normal(0, 1, n), "c": cats(r, n, list("abc")), "timestamp": np.arange(n)})
    cur = pd.DataFrame({"x": r.normal(0.8, 1, n), "c": cats(r, n, list("abc")), "timestamp": np.arange(n)})
    ref.to_parquet(tmp / "ref.parquet")
    cur.to_csv(tmp / "cur.csv", index=False)
    (tmp / "empty.csv").write_text("")
    (tmp / "policy.toml").write_text("[drift]\ndistance_threshold = 0.9\n")
    return tmp


@pytest.mark.usefixtures("data_files")
class TestCli:
    def test_json_output_has_the_design_shape(self, data_files):
        """--json prints one object: dataset_drift, drift_score and per-feature results."""
        proc = run_cli("--reference", str(data_files / "ref.parquet"), "--current", str(data_files / "cur.csv"), "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert set(out) == {"dataset_drift", "drift_score", "features"}
        by_name = {f["name"]: f for f in out["features"]}
        assert set(by_name) == {"x", "c", "timestamp"}
        x = by_name["x"]
        assert (x["kind"], x["test"], x["p_value"], x["threshold"], x["drifted"]) == (
            "numeric", "wasserstein", None, 0.1, True)
        assert isinstance(x["statistic"], float) and by_name["c"]["kind"] == "categorical"

    def test_policy_thresholds_and_columns_apply(self, data_files):
        """A policy holding only [drift] is valid; its threshold changes the verdict; time column excluded."""
        proc = run_cli("-r", str(data_files / "ref.parquet"), "-c", str(data_files / "cur.csv"),
                       "--policy", str(data_files / "policy.toml"), "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert {f["name"] for f in out["features"]} == {"x", "c"}
        assert not any(f["drifted"] for f in out["features"]) and out["features"][0]["threshold"] == 0.9

    def test_table_output_and_saved_profile_reuse(self, data_files):
        """The table names features and verdicts; a saved profile as reference gives the same JSON."""
        prof = data_files / "profile.json"
        table = run_cli("-r", str(data_files / "ref.parquet"), "-c", str(data_files / "cur.csv"), "--save-profile", str(prof))
        assert table.returncode == 0, table.stderr
        assert "wasserstein" in table.stdout and "drift score" in table.stdout
        from_data = run_cli("-r", str(data_files / "ref.parquet"), "-c", str(data_files / "cur.csv"), "--json")
        from_profile = run_cli("-r", str(prof), "-c", str(data_files / "cur.csv"), "--json")
        assert json.loads(from_profile.stdout) == json.loads(from_data.stdout)

    @pytest.mark.parametrize("which", ["missing", "empty"])
    def test_unusable_input_exits_2_with_one_line(self, data_files, which):
        """A missing or empty data file: exit status 2 and one line on stderr, no traceback."""
        bad = data_files / ("nope.parquet" if which == "missing" else "empty.csv")
        proc = run_cli("--reference", str(data_files / "ref.parquet"), "--current", str(bad), "--json")
        assert proc.returncode == 2
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
        assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
