"""Settings, the policy schema and the Celery configuration."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from config.celery_config import ROLE_QUEUES, celery_config
from config.durations import format_duration, parse_duration
from config.policy import PolicyError, load_policy, policy_from_dict
from config.settings import Settings
from tests.support import ROOT, retrain_cli

EXAMPLE = ROOT / "config" / "policies" / "example-churn.toml"


class TestDurations:
    @pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800),
                                               ("1h30m", 5400), ("0.5s", 0.5), (" 2 h ", 7200), (45, 45)])
    def test_parse(self, text, seconds):
        """Operator-style durations parse to the right number of seconds."""
        assert parse_duration(text).total_seconds() == seconds

    @pytest.mark.parametrize("bad", ["", "5", "5x", "m5", "1h 2q", -3, True, None, "99999999999d", 1e300,
                                     float("inf"), float("nan")])
    def test_bad_durations_are_refused(self, bad):
        """Anything that is not a number followed by a unit is an error, never a silent default."""
        with pytest.raises(ValueError):
            parse_duration(bad)

    def test_round_trip(self):
        """format_duration is the inverse of parse_duration for whole seconds."""
        assert format_duration(timedelta(seconds=5400)) == "1h30m"
        assert parse_duration(format_duration(timedelta(days=2, seconds=61))) == timedelta(days=2, seconds=61)


class TestPolicy:
    def test_example_policy_is_valid_and_keeps_the_seed_defaults(self):
        """The shipped example validates; the seed's trigger and gate defaults are the defaults."""
        p = load_policy(EXAMPLE)
        assert p.name == "churn"
        bare = policy_from_dict({"model": {"name": "m"}})
        t, g = bare.triggers, bare.gate
        assert (t.max_model_age_days, t.drift_threshold, t.performance_drop_threshold, t.new_data_threshold) == \
            (30, 0.15, 0.03, 50000)
        assert (g.min_accuracy, g.max_regression, g.min_prediction_correlation, g.max_latency_p99_ms,
                g.max_model_size_mb) == (0.85, 0.02, 0.8, 50, 500)
        assert [ph.traffic for ph in bare.rollout.phases] == [0, 5, 25, 50, 100]

    def test_a_retired_key_is_dropped_with_a_warning_and_the_policy_loads(self, tmp_path, capsys):
        """``[rollout] tick`` (accepted and never used by earlier versions, in the old example): the policy
        still loads, with a warning naming the key and what to use instead."""
        from config.logs import configure_logging

        configure_logging("INFO", "json", force=True)
        path = tmp_path / "p.toml"
        path.write_text('[model]\nname="m"\n[rollout]\ntick = "10s"\nmax_wait = "1h"\n')
        policy = load_policy(path)
        assert policy.rollout.max_wait == timedelta(hours=1)
        err = capsys.readouterr().err
        assert "policy.retired_key_ignored" in err and "rollout.tick" in err and "RETRAIN_ROLLOUT_TICK" in err

    @pytest.mark.parametrize("toml, message", [
        ('[model]\nname="m"\n[triggers]\ndrift_treshold = 0.2\n', "unknown key 'triggers.drift_treshold'"),
        ('[model]\nname="m"\n[triggers]\ncooldown = "6 hours"\n', "triggers.cooldown: bad duration"),
        ('[model]\nname="m"\n[gate]\nmin_accuracy = -0.1\n', "gate.min_accuracy: Input should be greater than or equal to 0"),
        ('[model]\nname="m"\n[rollout]\n[[rollout.phases]]\nname="a"\ntraffic=50\n[[rollout.phases]]\nname="b"\ntraffic=5\n',
         "must not decrease traffic"),
        ('[data]\nsource="x"\n', "missing key 'model'"),
        ('[model\nname="m"', "not valid TOML"),
        ('[model]\nname="' + "m" * 129 + '"\n', "model.name: String should match pattern"),
        ('[model]\nname="m"\n[triggers]\ncooldown = "99999999999d"\n', "triggers.cooldown: duration '99999999999d' is too long"),
    ])
    def test_bad_policy_gives_one_clear_error(self, tmp_path, toml, message):
        """A typo'd key, a bad duration, a negative threshold, ... each give one line naming the problem."""
        path = tmp_path / "p.toml"
        path.write_text(toml)
        with pytest.raises(PolicyError) as err:
            load_policy(path)
        text = str(err.value)
        assert message in text and "\n" not in text and str(path) in text

    def test_bad_policy_on_the_cli_is_exit_2_with_one_line(self, tmp_path):
        """The CLI answers a bad policy with exit status 2 and one line on stderr, no traceback."""
        path = tmp_path / "p.toml"
        path.write_text('[model]\nname="m"\n[triggers]\ndrift_treshold = 0.2\n')
        snap = tmp_path / "s.json"
        snap.write_text('{"last_training_date": "2026-01-01T00:00:00Z", "now": "2026-01-02T00:00:00Z"}')
        out = retrain_cli("decide", "--policy", str(path), "--snapshot", str(snap), "--json")
        assert out.returncode == 2
        assert out.stderr.strip().count("\n") == 0 and "drift_treshold" in out.stderr
        assert "Traceback" not in out.stderr

    def test_a_non_utf8_policy_is_one_policy_error(self, tmp_path):
        """A Latin-1 policy file raises PolicyError (one line naming the file), not UnicodeDecodeError."""
        path = tmp_path / "latin1.toml"
        path.write_bytes('[model]\nname = "caf\xe9"\n'.encode("latin-1"))
        with pytest.raises(PolicyError) as err:
            load_policy(path)
        assert str(path) in str(err.value) and "not UTF-8" in str(err.value) and "\n" not in str(err.value)

    def test_the_store_records_a_non_utf8_file_and_serves_the_others(self, tmp_path):
        """One undecodable file in the policy folder is recorded as an error; other models keep their policy."""
        from workers.policies import PolicyStore

        (tmp_path / "good.toml").write_text('[model]\nname = "good"\n')
        bad = tmp_path / "bad.toml"
        bad.write_bytes('[model]\nname = "caf\xe9"\n'.encode("latin-1"))
        store = PolicyStore(tmp_path)
        assert store.get("good").name == "good"
        assert set(store.all()) == {"good"}
        assert "not UTF-8" in store.errors[str(bad)]


class TestCelery:
    def test_json_only_and_reliable_delivery(self):
        """The broker speaks JSON only; tasks ack late, are re-queued on worker loss, prefetch 1."""
        conf = celery_config(Settings(), "redis://127.0.0.1:1/0")
        assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
        assert conf["result_accept_content"] == ["json"]
        assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
        assert conf["worker_prefetch_multiplier"] == 1
        assert conf["broker_connection_retry_on_startup"] is True
        assert conf["broker_transport_options"]["visibility_timeout"] == \
            conf["result_backend_transport_options"]["visibility_timeout"] == 7200
        assert {q.name for q in conf["task_queues"]} >= {"training.high", "training.low", "gate", "rollout"}
        tick = conf["beat_schedule"]["rollout-tick"]["schedule"]
        assert tick < conf["broker_transport_options"]["visibility_timeout"]

    @pytest.mark.parametrize("visibility", [timedelta(hours=2), timedelta(minutes=10), timedelta(seconds=30)])
    def test_a_task_is_stopped_before_the_broker_would_redeliver_it(self, visibility):
        """Soft limit < hard limit < visibility timeout, and a timed-out task is acked (never run twice)."""
        conf = celery_config(Settings(visibility_timeout=visibility), "redis://127.0.0.1:1/0")
        seconds = visibility.total_seconds()
        assert 0 < conf["task_soft_time_limit"] < conf["task_time_limit"] < seconds
        assert conf["task_time_limit"] >= 0.8 * seconds
        assert conf["task_acks_on_failure_or_timeout"] and conf["task_acks_late"]

    def test_library_keys_come_from_the_key_schema(self):
        """redbeat's prefix follows RETRAIN_KEY_PREFIX through Keys; no module but config/keys.py spells
        the redbeat or kombu priority-queue key formats."""
        from config.keys import Keys

        conf = celery_config(Settings(key_prefix="acme"), "redis://127.0.0.1:1/0")
        assert conf["redbeat_key_prefix"] == Keys(prefix="acme").redbeat_prefix() == "acme:redbeat:"
        assert Keys().redbeat_entry("schedule-tick:churn") == "retrain:redbeat:schedule-tick:churn"
        assert Keys().celery_queue("training.low", 3) == "training.low\x06\x163"
        assert Keys().celery_queue("gate", 0) == "gate"
        spelled = []
        for folder in ("config", "events", "workers"):
            for path in (ROOT / folder).rglob("*.py"):
                if path == ROOT / "config" / "keys.py":
                    continue
                text = path.read_text()
                if ":redbeat:" in text or "\\x06\\x16" in text or "\x06\x16" in text or \
                        "key_prefix + " in text:
                    spelled.append(str(path.relative_to(ROOT)))
        assert spelled == []

    def test_a_training_worker_drains_training_high_before_training_low(self, celery_app, start_worker):
        """Low-urgency messages queued before three high-urgency ones: a free training worker takes every
        high one first (queue_order_strategy "priority"), not in arrival order nor in turns."""
        low = [celery_app.send_task("retrain.echo", args=[i], kwargs={"label": "low"}, queue="training.low")
               for i in range(4)]
        high = [celery_app.send_task("retrain.echo", args=[i], kwargs={"label": "high"}, queue="training.high")
                for i in range(3)]
        start_worker("training", concurrency=1)
        for result in [*low, *high]:
            result.get(timeout=30)
        done = sorted([(r.date_done, "low") for r in low] + [(r.date_done, "high") for r in high])
        assert [label for _, label in done] == ["high"] * 3 + ["low"] * 4, done

    def test_roles_cover_the_pipeline_queues(self):
        """Every role has its queues; training consumes high before low."""
        assert ROLE_QUEUES["training"] == ("training.high", "training.low")
        assert set(ROLE_QUEUES["all"]) == {"decision", "training.high", "training.low", "gate", "rollout"}


class TestSettings:
    def test_env_prefix_and_secrets_are_hidden(self, monkeypatch):
        """RETRAIN_* variables configure the settings; secrets never show in a repr."""
        monkeypatch.setenv("RETRAIN_REDIS_URL", "rediss://:s3cret@redis.example:6380/0")
        monkeypatch.setenv("RETRAIN_INGEST_TOKEN", "tok-123")
        monkeypatch.setenv("RETRAIN_STREAM_SHARDS", "8")
        s = Settings()
        assert s.stream_shards == 8
        assert s.redis_url.get_secret_value().startswith("rediss://")
        assert "s3cret" not in repr(s) and "tok-123" not in repr(s)

    def test_secrets_are_redacted_from_logs(self, capsys):
        """A log line carrying a token or password field shows *** instead."""
        from config.logs import configure_logging

        configure_logging("INFO", "json", force=True)
        import structlog

        structlog.get_logger("t").info("connect", password="hunter2", api_token="abc", model="m")
        err = capsys.readouterr().err
        assert "hunter2" not in err and "abc" not in err and '"model": "m"' in err

    @pytest.mark.parametrize("env, reason", [
        ({"RETRAIN_LOG_LEVEL": "verbose"}, "unknown log level 'verbose'"),
        ({"RETRAIN_BUS_CLAIM_IDLE": "0s"}, "must be at least 1s"),
        ({"RETRAIN_VISIBILITY_TIMEOUT": "2s"}, "must be at least 10s"),
        ({"RETRAIN_DEDUP_RETENTION": "2m"}, "must cover an entry's redeliveries"),
        ({"RETRAIN_ROLLOUT_TICK": "3h"}, "must be shorter than RETRAIN_VISIBILITY_TIMEOUT"),
        ({"RETRAIN_STREAM_RETENTION": "99999999999d"}, "too long"),
        ({"RETRAIN_RESULT_EXPIRES": "500ms"}, "must be at least 60s"),  # Celery read it as 0: results kept for ever
        ({"RETRAIN_ARTIFACT_ROOT": "s3://bucket/models"}, "unsupported artifact URI scheme 's3'"),
        ({"RETRAIN_ARTIFACT_ROOT": "file://nas/models"}, "another host"),
    ])
    def test_settings_that_would_break_a_guarantee_are_refused(self, monkeypatch, env, reason):
        """A claim idle of 0 s (live batches stolen), a dedup window shorter than the redeliveries, an
        unknown log level: refused when the settings are read, with the reason."""
        from pydantic import ValidationError

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError) as info:
            Settings()
        assert reason in str(info.value)

    def test_a_file_uri_artifact_root_is_parsed_as_a_uri(self, monkeypatch):
        """file://localhost/... and %-escapes are a URI's, not text to strip a prefix from."""
        from pathlib import Path

        monkeypatch.setenv("RETRAIN_ARTIFACT_ROOT", "file://localhost/srv/my%20models")
        assert Settings().artifact_dir == Path("/srv/my models")
        monkeypatch.setenv("RETRAIN_ARTIFACT_ROOT", "/var/lib/retrain/artifacts")
        assert Settings().artifact_dir == Path("/var/lib/retrain/artifacts")

    def test_log_level_is_case_insensitive(self, monkeypatch):
        monkeypatch.setenv("RETRAIN_LOG_LEVEL", "debug")
        assert Settings().log_level == "DEBUG"
