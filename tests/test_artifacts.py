"""skops artifacts: saved with a sha256, verified before loading, restricted to trusted types."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
)
from sklearn.feature_selection import SelectKBest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.tree import DecisionTreeClassifier

sys.path.insert(0, str(Path(__file__).parent))

from gate_helpers import SlowModel, make_frame  # noqa: E402

from workers.registry import artifacts  # noqa: E402
from workers.registry.artifacts import (  # noqa: E402
    ArtifactError,
    ArtifactTampered,
    UntrustedArtifact,
    default_trusted_prefixes,
    is_trusted,
    load_artifact,
    read_sidecar,
    save_artifact,
)
from workers.training.fit import build_pipeline, split_features  # noqa: E402

RETRAIN = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "retrain"
CORE = ("sklearn.", "numpy.", "scipy.")


def _json(value):
    return {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(value), "is_json": True}


def _tuple(*items):
    return {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode", "content": list(items)}


def _str_dict(**items):
    keys = [{"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"}] * len(items)
    return {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode",
            "content": {k: _json(v) for k, v in items.items()},
            "key_types": {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "content": keys}}


def crafted_artifact(path: Path, dotted: str, content: dict, loader: str = "ConstructorFromReduceNode") -> str:
    """Hand-build a .skops whose root node names ``dotted`` (what an attacker writes); returns its sha256.

    With ``ConstructorFromReduceNode`` skops calls the named object with the tuple in ``content``;
    with ``ObjectNode`` it makes an instance and hands ``content`` to its ``__setstate__``.
    """
    module, _, name = dotted.rpartition(".")
    schema = {"__class__": name, "__module__": module, "__loader__": loader, "content": content,
              "protocol": 2, "_skops_version": "0.16.0"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("schema.json", json.dumps(schema))
    path.write_bytes(buf.getvalue())
    return artifacts.sha256_hex(buf.getvalue())


@pytest.fixture(scope="module")
def data():
    return make_frame("binary", 600, seed=0)


@pytest.fixture(scope="module")
def hgb_pipeline(data):
    numeric, categorical = split_features(data, ["a", "b", "c"])
    pipe = build_pipeline(HistGradientBoostingClassifier(max_iter=20, random_state=0), numeric, categorical)
    return pipe.fit(data[["a", "b", "c"]], data["target"])


class TestRoundTrip:
    def test_pipeline_round_trips_with_default_prefixes(self, tmp_path, hgb_pipeline, data):
        """A ColumnTransformer + HistGradientBoosting pipeline (TreePredictor inside) loads and predicts the same."""
        ref = save_artifact(hgb_pipeline, tmp_path / "m.skops")
        assert ref.uri.startswith("file://") and ref.size_bytes == (tmp_path / "m.skops").stat().st_size
        model = load_artifact(ref.uri, ref.sha256, CORE)
        np.testing.assert_array_equal(model.predict_proba(data), hgb_pipeline.predict_proba(data))

    def test_sidecar_and_directory_destination(self, tmp_path, hgb_pipeline):
        """Saving into a directory names the file by its content hash and writes a matching sha256 sidecar."""
        for dest in (f"{tmp_path.as_uri()}/", tmp_path):
            ref = save_artifact(hgb_pipeline, dest)
            path = artifacts.uri_to_path(ref.uri)
            assert path.parent == tmp_path and path.name == f"{ref.sha256[:16]}.skops"
            assert read_sidecar(ref.uri) == ref.sha256 == artifacts.sha256_hex(path.read_bytes())

    def test_unsupported_scheme_and_missing_file(self, tmp_path):
        """Object-store URIs are refused for now; a missing file is an ArtifactError."""
        with pytest.raises(ArtifactError, match="scheme"):
            load_artifact("s3://bucket/m.skops", "0" * 64)
        with pytest.raises(ArtifactError, match="no such"):
            load_artifact(tmp_path / "none.skops", "0" * 64)


class TestHashVerification:
    def test_tampered_bytes_are_refused_before_deserializing(self, tmp_path, hgb_pipeline, monkeypatch):
        """One flipped byte raises ArtifactTampered and skops never sees the data."""
        ref = save_artifact(hgb_pipeline, tmp_path / "m.skops")
        path = tmp_path / "m.skops"
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
        calls = []
        monkeypatch.setattr(artifacts.sio, "loads", lambda *a, **k: calls.append(1))
        monkeypatch.setattr(artifacts.sio, "get_untrusted_types", lambda *a, **k: calls.append(1) or [])
        with pytest.raises(ArtifactTampered) as info:
            load_artifact(ref.uri, ref.sha256, CORE)
        assert calls == [] and info.value.expected == ref.sha256 and info.value.actual != ref.sha256

    def test_wrong_recorded_hash_is_refused(self, tmp_path, hgb_pipeline):
        """A registry record whose sha256 differs from the file refuses the load."""
        ref = save_artifact(hgb_pipeline, tmp_path / "m.skops")
        with pytest.raises(ArtifactTampered):
            load_artifact(ref.uri, "f" * 64, CORE)

    def test_missing_hash_needs_explicit_opt_in(self, tmp_path, hgb_pipeline):
        """Without a recorded hash the load is refused unless the caller opts in (offline tools)."""
        ref = save_artifact(hgb_pipeline, tmp_path / "m.skops")
        with pytest.raises(ArtifactError, match="unverified"):
            load_artifact(ref.uri, None, CORE)
        assert load_artifact(ref.uri, None, CORE, allow_unverified=True) is not None


class TestTrustedTypes:
    def test_type_outside_the_allowlist_is_refused(self, tmp_path, data):
        """An artifact holding a class from an untrusted module raises UntrustedArtifact naming it."""
        base = LogisticRegression().fit(data[["a", "b"]], data["target"])
        ref = save_artifact(SlowModel(base, delay=0.0), tmp_path / "slow.skops")
        with pytest.raises(UntrustedArtifact) as info:
            load_artifact(ref.uri, ref.sha256, CORE)
        assert "gate_helpers.SlowModel" in info.value.types
        # The same file loads once its module is explicitly allowed.
        model = load_artifact(ref.uri, ref.sha256, (*CORE, "gate_helpers."))
        assert type(model).__name__ == "SlowModel"

    def test_files_own_untrusted_list_is_not_trusted_wholesale(self, tmp_path, data):
        """Types reported by the file itself stay refused: only allowlisted prefixes are trusted."""
        base = LogisticRegression().fit(data[["a", "b"]], data["target"])
        ref = save_artifact(SlowModel(base, delay=0.0), tmp_path / "slow.skops")
        reported = sio.get_untrusted_types(file=artifacts.uri_to_path(ref.uri))
        assert "gate_helpers.SlowModel" in reported
        with pytest.raises(UntrustedArtifact):
            load_artifact(ref.uri, ref.sha256, ("numpy.",))  # sklearn types are now untrusted too

    @pytest.mark.parametrize(
        "name,prefixes,ok",
        [
            ("sklearn.tree._classes.DecisionTreeClassifier", ("sklearn",), True),
            ("sklearnx.Evil", ("sklearn.",), False),
            ("builtins.eval", ("builtins.",), False),
            ("os.system", ("os.",), False),
            ("builtins.slice", ("builtins.",), True),
            ("numpy.dtype", ("numpy.",), True),
            ("sklearn.utils.validation.check_array", ("sklearn.",), False),
            ("numpy.testing._private.utils.runstring", ("numpy.",), False),
            ("sklearn.tree.NoSuchTree", ("sklearn.",), False),
            ("sklearn.tree", ("sklearn.",), False),
            ("numpy.f2py.__main__.main", ("numpy.",), False),
        ],
    )
    def test_prefix_matching(self, name, prefixes, ok):
        """Only classes under an allowed prefix pass: never functions, modules, missing names, builtins like eval."""
        assert is_trusted(name, prefixes) is ok


class TestCraftedArtifacts:
    """Hand-built files naming callables under trusted prefixes: refused before anything runs."""

    def test_exec_function_is_refused_and_never_runs(self, tmp_path):
        """A reduce node naming numpy's runstring (exec) is refused even with a matching hash or unverified."""
        marker = tmp_path / "pwned"
        code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('code ran')"
        path = tmp_path / "evil.skops"
        digest = crafted_artifact(path, "numpy.testing._private.utils.runstring", _tuple(_json(code), _str_dict()))
        for kwargs in ({"sha256": digest}, {"sha256": None, "allow_unverified": True}):
            with pytest.raises(UntrustedArtifact) as info:
                load_artifact(path, trusted_prefixes=CORE, **kwargs)
            assert info.value.types == ["numpy.testing._private.utils.runstring"]
        assert not marker.exists()

    def test_plain_sklearn_function_is_refused(self, tmp_path):
        """A function under sklearn. (not a class) is refused, not called with the file's arguments."""
        path = tmp_path / "fn.skops"
        digest = crafted_artifact(path, "sklearn.utils.validation.check_array", _tuple(_json([[1.0, 2.0]])))
        with pytest.raises(UntrustedArtifact) as info:
            load_artifact(path, digest, default_trusted_prefixes())
        assert info.value.types == ["sklearn.utils.validation.check_array"]

    def test_class_whose_setstate_runs_file_code_is_refused(self, tmp_path):
        """scipy.stats distributions exec a template from their state on load: refused though they are classes."""
        marker = tmp_path / "pwned"
        code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('code ran')"
        path = tmp_path / "dist.skops"
        digest = crafted_artifact(path, "scipy.stats._continuous_distns.norm_gen",
                                  _str_dict(_parse_arg_template=code, numargs=0), loader="ObjectNode")
        with pytest.raises(UntrustedArtifact):
            load_artifact(path, digest, CORE)
        assert not marker.exists()

    @pytest.mark.parametrize(
        "dotted,extra",
        [
            ("numpy.memmap", (_json("uint8"), _json("w+"), _json(0), _tuple(_json(4)))),
            ("scipy.io.FortranFile", (_json("w"),)),
        ],
    )
    def test_classes_that_open_files_for_writing_are_refused(self, tmp_path, dotted, extra):
        """Classes whose constructor truncates a named file are refused; the file stays intact."""
        victim = tmp_path / "precious.txt"
        victim.write_text("keep me\n")
        path = tmp_path / "clobber.skops"
        digest = crafted_artifact(path, dotted, _tuple(_json(str(victim)), *extra))
        with pytest.raises(UntrustedArtifact):
            load_artifact(path, digest, CORE)
        assert victim.read_text() == "keep me\n"


class TestProjectModelsLoad:
    @pytest.mark.parametrize(
        "task,estimator",
        [
            ("binary", HistGradientBoostingClassifier(max_iter=10, random_state=0)),
            ("multiclass", HistGradientBoostingClassifier(max_iter=10, random_state=0)),
            ("regression", HistGradientBoostingRegressor(max_iter=10, random_state=0)),
            ("binary", RandomForestClassifier(n_estimators=3, random_state=0)),
            ("binary", GradientBoostingClassifier(n_estimators=3, random_state=0)),
            ("binary", DecisionTreeClassifier(random_state=0)),
            ("binary", LogisticRegression(class_weight="balanced")),
            ("regression", LinearRegression()),
            ("binary", KNeighborsClassifier()),
            ("binary", MLPClassifier(hidden_layer_sizes=(4,), max_iter=20, random_state=0)),
        ],
        ids=lambda v: v if isinstance(v, str) else type(v).__name__,
    )
    @pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
    def test_training_pipelines_load_with_default_prefixes(self, tmp_path, task, estimator):
        """Pipelines built like training's (features + model) load under the settings' prefixes, same predictions."""
        frame = make_frame(task, 200, seed=1)
        numeric, categorical = split_features(frame, ["a", "b", "c"])
        pipe = build_pipeline(estimator, numeric, categorical).fit(frame[["a", "b", "c"]], frame["target"])
        ref = save_artifact(pipe, tmp_path / "m.skops")
        model = load_artifact(ref.uri, ref.sha256, default_trusted_prefixes())
        np.testing.assert_array_equal(model.predict(frame), pipe.predict(frame))

    def test_allowlisted_function_loads(self, tmp_path, data):
        """SelectKBest keeps sklearn's default score function (f_classif): on the function allowlist."""
        pipe = make_pipeline(SelectKBest(k=1), LogisticRegression()).fit(data[["a", "b"]], data["target"])
        ref = save_artifact(pipe, tmp_path / "k.skops")
        model = load_artifact(ref.uri, ref.sha256, CORE)
        np.testing.assert_array_equal(model.predict(data[["a", "b"]]), pipe.predict(data[["a", "b"]]))


class TestCliArtifacts:
    def test_tampered_and_untrusted_artifacts_exit_2(self, tmp_path, hgb_pipeline, data):
        """`retrain gate` refuses a tampered artifact (sidecar mismatch) and an untrusted one with exit 2."""
        good = save_artifact(hgb_pipeline, tmp_path / "A.skops")
        tampered = tmp_path / "T.skops"
        tampered.write_bytes(Path(artifacts.uri_to_path(good.uri)).read_bytes() + b"\0")
        (tmp_path / "T.skops.sha256").write_text(f"{good.sha256}  T.skops\n")
        base = LogisticRegression().fit(data[["a", "b"]], data["target"])
        save_artifact(SlowModel(base, delay=0.0), tmp_path / "U.skops")
        data.to_parquet(tmp_path / "D.parquet")
        (tmp_path / "p.toml").write_text('[model]\nname = "m"\n')
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        for cand, expect in (("T.skops", "sha256 mismatch"), ("U.skops", "untrusted types")):
            proc = subprocess.run(
                [str(RETRAIN), "gate", "--policy", "p.toml", "--production", "A.skops", "--candidate", cand,
                 "--data", "D.parquet", "--json"],
                cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
            )
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1 and expect in proc.stderr
