"""HTTP ingest over real HTTP (uvicorn on a free port, httpx): auth, limits, bad bodies,
single/batch/binary events, the Alertmanager and Evidently adapters end to end into the stream."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import httpx
import pytest
import redis
import uvicorn

from config.keys import keys_from_settings
from config.settings import Settings
from events.adapters import AdapterError, alertmanager_events, evidently_event
from events.bus import PAYLOAD_FIELD, EventBus, StreamConsumer
from events.envelope import new_event
from events.ingest import BATCH_TYPE, STRUCTURED_TYPE, IngestConfigError, create_app
from tests.support import ROOT, wait_for

TOKEN = "s3cret-ingest-token"
MAX_EVENT_BYTES = 4096
MAX_BATCH = 10
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Real Evidently 0.7.23 output (DataDriftPreset on 300 rows: "age" and "plan" shifted).
EVIDENTLY_07_SNAPSHOT = {"metrics": [
    {"id": "15e89f895b482f9b84ba7274ed18a106", "metric_name": "DriftedColumnsCount(drift_share=0.5)",
     "config": {"type": "evidently:metric_v2:DriftedColumnsCount", "drift_share": 0.5},
     "value": {"count": 2.0, "share": 0.6666666666666666}},
    {"id": "1cf7e5c2a8eb2a62a2667e70ee06d259", "metric_name": "ValueDrift(column=age,method=K-S p_value,threshold=0.05)",
     "config": {"type": "evidently:metric_v2:ValueDrift", "column": "age", "method": "K-S p_value", "threshold": 0.05},
     "value": 1.4582054786325707e-14},
    {"id": "f1b652827353876f3c5e8368707090da", "metric_name": "ValueDrift(column=income,method=K-S p_value,threshold=0.05)",
     "config": {"type": "evidently:metric_v2:ValueDrift", "column": "income", "method": "K-S p_value", "threshold": 0.05},
     "value": 0.584980918983971},
    {"id": "9623dba89938f10a3733f56990088016", "metric_name": "ValueDrift(column=plan,method=chi-square p_value,threshold=0.05)",
     "config": {"type": "evidently:metric_v2:ValueDrift", "column": "plan", "method": "chi-square p_value", "threshold": 0.05},
     "value": 8.730269545175342e-40}], "tests": []}

# The same data through the legacy Report (the 0.4-0.6 format, still in 0.7 as evidently.legacy);
# the per-column histograms are shortened, otherwise as produced.
EVIDENTLY_LEGACY_REPORT = {"version": "0.7.23", "metrics": [
    {"metric": "DatasetDriftMetric", "result": {"drift_share": 0.5, "number_of_columns": 3, "number_of_drifted_columns": 2,
                                                "share_of_drifted_columns": 0.6666666666666666, "dataset_drift": True}},
    {"metric": "DataDriftTable", "result": {
        "number_of_columns": 3, "number_of_drifted_columns": 2, "share_of_drifted_columns": 0.6666666666666666,
        "dataset_drift": True, "drift_by_columns": {
            "age": {"column_name": "age", "column_type": "num", "stattest_name": "K-S p_value", "stattest_threshold": 0.05,
                    "drift_score": 1.4582054786325707e-14, "drift_detected": True,
                    "current": {"small_distribution": {"x": [18.7, 40.4, 72.9], "y": [0.002, 0.042, 0.004]}},
                    "reference": {"small_distribution": {"x": [8.9, 39.8, 70.7], "y": [0.001, 0.037, 0.002]}}},
            "income": {"column_name": "income", "column_type": "num", "stattest_name": "K-S p_value",
                       "stattest_threshold": 0.05, "drift_score": 0.584980918983971, "drift_detected": False},
            "plan": {"column_name": "plan", "column_type": "cat", "stattest_name": "chi-square p_value",
                     "stattest_threshold": 0.05, "drift_score": 8.730269545175342e-40, "drift_detected": True}},
        "current_fi": None, "reference_fi": None}}], "timestamp": "2026-11-25 21:36:21.890900"}


def alert(model: str | None, signal: str, status: str = "firing", fingerprint: str = "f1", **values) -> dict:
    labels = {"alertname": f"{signal}_high", "severity": "warning", "signal": signal}
    if model is not None:
        labels["model"] = model
    return {"status": status, "labels": labels, "annotations": {k: str(v) for k, v in values.items()},
            "startsAt": "2024-05-01T10:00:00.123456789Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": fingerprint}


def webhook(*alerts: dict) -> dict:
    return {"version": "4", "groupKey": "{}:{alertname=\"x\"}", "truncatedAlerts": 0, "status": "firing",
            "receiver": "retrain", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": list(alerts)}


def event_json(model: str = "churn", etype: str = "drift.data", data: dict | None = None, **kw) -> dict:
    return json.loads(new_event(etype, model, data if data is not None else {"drift_score": 0.4}, **kw).to_json())


# ============================================================================ servers
class ServerThread:
    """A real uvicorn server on a free port, in a background thread."""

    def __init__(self, app, root_path: str = ""):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", root_path=root_path))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10, message="uvicorn to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def ingest_settings(redis_server):
    return Settings(redis_url=redis_server.url, ingest_token=TOKEN, max_event_bytes=MAX_EVENT_BYTES)


@pytest.fixture(scope="module")
def server(redis_server, ingest_settings):
    client = redis.Redis.from_url(redis_server.url)
    bus = EventBus(client, keys_from_settings(ingest_settings), max_event_bytes=MAX_EVENT_BYTES)
    with ServerThread(create_app(bus, ingest_settings, max_batch=MAX_BATCH)) as srv:
        yield srv
    client.close()


@pytest.fixture
def http(server, redis_client):
    """An httpx client to the server; the keyspace is clean (``redis_client``)."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def stream_events(redis_client, keys, model: str) -> list[dict]:
    return [json.loads(fields[PAYLOAD_FIELD.encode()]) for _, fields in redis_client.xrange(keys.events_for(model))]


def all_stream_events(redis_client, keys) -> list[dict]:
    out = []
    for stream in keys.all_event_streams():
        out += [json.loads(f[PAYLOAD_FIELD.encode()]) for _, f in redis_client.xrange(stream)]
    return out


# ============================================================================ tests
class TestAuth:
    def test_missing_token_is_401_and_nothing_is_published(self, http, redis_client, keys):
        """A request without a bearer token gets 401 with a Bearer challenge and publishes nothing."""
        r = http.post("/events", json=event_json())
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["error"]
        assert all_stream_events(redis_client, keys) == []

    def test_wrong_token_is_401(self, http, redis_client, keys):
        """A wrong token (and a non-Bearer scheme carrying the right one) is refused with 401."""
        assert http.post("/events", json=event_json(), headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.post("/events", json=event_json(), headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert http.post("/adapters/alertmanager", json=webhook(), headers={"Authorization": "Bearer x"}).status_code == 401
        assert http.post("/adapters/evidently?model=churn", json=EVIDENTLY_07_SNAPSHOT).status_code == 401
        assert all_stream_events(redis_client, keys) == []

    def test_no_configured_token_refuses_to_build_the_app(self, redis_server):
        """Without a token the app is not built unless unauthenticated mode is asked for explicitly."""
        with pytest.raises(IngestConfigError, match="--insecure-no-auth"):
            create_app(settings=Settings(redis_url=redis_server.url, ingest_token=None))
        assert create_app(settings=Settings(redis_url=redis_server.url, ingest_token=None), insecure_no_auth=True)

    def test_insecure_mode_accepts_without_a_token(self, redis_server, redis_client, keys):
        """With --insecure-no-auth and no token configured, events are accepted without a header."""
        s = Settings(redis_url=redis_server.url, ingest_token=None)
        bus = EventBus(redis_client, keys)
        with ServerThread(create_app(bus, s, insecure_no_auth=True)) as srv:
            r = httpx.post(f"{srv.url}/events", json=event_json("fraud"), timeout=10)
        assert r.status_code == 202
        assert [e["id"] for e in stream_events(redis_client, keys, "fraud")] == r.json()["accepted"]


class TestLimits:
    def test_content_length_over_the_limit_is_413(self, http, redis_client, keys):
        """A batch body larger than max_event_bytes x max_batch is refused with 413, unread."""
        body = json.dumps([event_json(data={"drift_score": 0.1, "pad": "x" * 3000}) for _ in range(15)])
        assert len(body) > MAX_EVENT_BYTES * MAX_BATCH
        r = http.post("/events", content=body, headers={**AUTH, "Content-Type": BATCH_TYPE})
        assert r.status_code == 413
        assert "limit" in r.json()["error"]
        assert all_stream_events(redis_client, keys) == []

    def test_chunked_body_over_the_limit_is_413(self, http, redis_client, keys):
        """A body without Content-Length is counted as it streams in and refused past the limit."""
        def chunks():
            yield b"["
            for i in range(12):
                yield (json.dumps(event_json(data={"drift_score": 0.1, "pad": "y" * 3500})) + ",").encode()
            yield b"{}]"

        r = http.post("/events", content=chunks(), headers={**AUTH, "Content-Type": BATCH_TYPE})
        assert r.status_code == 413
        assert all_stream_events(redis_client, keys) == []

    def test_single_event_over_the_event_limit_is_413(self, http, redis_client, keys):
        """One structured-mode event larger than max_event_bytes is refused with 413."""
        body = json.dumps(event_json(data={"drift_score": 0.1, "pad": "z" * MAX_EVENT_BYTES}))
        r = http.post("/events", content=body, headers={**AUTH, "Content-Type": STRUCTURED_TYPE})
        assert r.status_code == 413
        r = http.post("/events", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 413
        assert all_stream_events(redis_client, keys) == []

    def test_a_body_limit_below_the_event_limit_holds_for_single_events_too(self, redis_server, redis_client, keys,
                                                                            ingest_settings):
        """--max-body-bytes 1000: a 3 KB event is refused in every mode (structured and binary were read against the
        64 KiB event limit and accepted)."""
        bus = EventBus(redis_client, keys, max_event_bytes=MAX_EVENT_BYTES)
        big = event_json(data={"drift_score": 0.1, "pad": "q" * 3000})
        binary = {"ce-specversion": "1.0", "ce-id": "b-1", "ce-source": "urn:x", "ce-type": "drift.data",
                  "ce-subject": "churn", "ce-time": "2024-05-01T10:00:00Z", "Content-Type": "application/json"}
        with ServerThread(create_app(bus, ingest_settings, max_batch=MAX_BATCH, max_body_bytes=1000)) as srv:
            for content_type in (STRUCTURED_TYPE, "application/json", "binary"):
                headers = {**AUTH, **binary} if content_type == "binary" else {**AUTH, "Content-Type": content_type}
                body = json.dumps(big["data"] if content_type == "binary" else big)
                r = httpx.post(f"{srv.url}/events", content=body, headers=headers, timeout=10)
                assert r.status_code == 413, (content_type, r.text)
        assert all_stream_events(redis_client, keys) == []

    def test_too_many_events_in_a_batch_is_413(self, http, redis_client, keys):
        """A batch with more than max_batch (small) events is refused with 413."""
        batch = [event_json() for _ in range(MAX_BATCH + 1)]
        r = http.post("/events", content=json.dumps(batch), headers={**AUTH, "Content-Type": BATCH_TYPE})
        assert r.status_code == 413
        assert str(MAX_BATCH) in r.json()["error"]
        assert all_stream_events(redis_client, keys) == []


class TestBadBodies:
    def post(self, http, body, content_type=STRUCTURED_TYPE):
        return http.post("/events", content=body, headers={**AUTH, "Content-Type": content_type})

    def test_malformed_json_is_400_with_the_reason(self, http):
        """Unparseable JSON gets 400 naming the JSON problem."""
        r = self.post(http, b'{"specversion": "1.0", ')
        assert r.status_code == 400
        assert r.json()["error"].startswith("malformed JSON")
        assert r.json()["rejected"][0]["index"] == 0

    def test_unknown_type_is_400_with_the_reason(self, http, redis_client, keys):
        """An event of an undeclared type gets 400 saying the type is unknown."""
        bad = event_json()
        bad["type"] = "drift.imaginary"
        r = self.post(http, json.dumps(bad))
        assert r.status_code == 400
        assert "unknown event type 'drift.imaginary'" in r.json()["error"]
        assert all_stream_events(redis_client, keys) == []

    def test_missing_field_is_400_with_the_field_named(self, http):
        """A missing envelope field or typed data field is named in the reason."""
        bad = event_json()
        del bad["subject"]
        r = self.post(http, json.dumps(bad))
        assert r.status_code == 400 and "missing field 'subject'" in r.json()["error"]
        perf = event_json(etype="performance.measured", data={"metric": "accuracy", "value": 0.8, "n_labeled": 10})
        del perf["data"]["n_labeled"]
        r = self.post(http, json.dumps(perf))
        assert r.status_code == 400 and "missing field 'data.n_labeled'" in r.json()["error"]

    def test_invalid_batch_is_rejected_whole_with_every_reason(self, http, redis_client, keys):
        """One bad event in a batch: 400 listing each bad index and reason, and nothing published."""
        good = event_json("churn")
        no_type = event_json("churn")
        del no_type["type"]
        bad_data = event_json("churn")
        bad_data["data"]["drift_score"] = 7
        r = self.post(http, json.dumps([good, no_type, "not an object", bad_data]), BATCH_TYPE)
        assert r.status_code == 400
        body = r.json()
        assert [x["index"] for x in body["rejected"]] == [1, 2, 3]
        assert "missing field 'type'" in body["rejected"][0]["reason"]
        assert "JSON object" in body["rejected"][1]["reason"]
        assert "drift_score" in body["rejected"][2]["reason"]
        assert body["accepted"] == [] and "none was published" in body["error"]
        assert all_stream_events(redis_client, keys) == []

    @pytest.mark.parametrize("etype, data", [
        ("rollout.completed", {"version": 2, "traffic": 100}),
        ("retrain.decided", {"decision_id": "d1", "urgency": "high"}),
        ("alert.raised", {"severity": "critical", "title": "forged"}),
    ])
    def test_lifecycle_events_are_refused_with_the_allowed_types(self, etype, data, http, redis_client, keys):
        """The system's own lifecycle events are a 400 naming the signal types ingest takes, alone, in a batch or in binary mode."""
        forged = event_json("churn", etype=etype, data=data)
        r = self.post(http, json.dumps(forged))
        assert r.status_code == 400
        reason = r.json()["error"]
        assert f"{etype!r} is not accepted over HTTP" in reason and "drift.data, drift.concept" in reason
        r = self.post(http, json.dumps([event_json("churn"), forged]), BATCH_TYPE)
        assert r.status_code == 400 and [x["index"] for x in r.json()["rejected"]] == [1]
        headers = {**AUTH, "ce-specversion": "1.0", "ce-id": "forged-1", "ce-source": "urn:x", "ce-type": etype,
                   "ce-subject": "churn", "ce-time": "2024-05-01T10:00:00Z", "Content-Type": "application/json"}
        r = http.post("/events", content=json.dumps(data), headers=headers)
        assert r.status_code == 400 and "signals only" in r.json()["error"]
        assert all_stream_events(redis_client, keys) == []

    def test_every_signal_type_is_accepted(self, http, redis_client, keys):
        """Each type in SIGNAL_TYPES (what monitors and adapters send) still gets in."""
        from events.types import SIGNAL_TYPES
        from tests.test_bus import SAMPLE_DATA

        batch = [event_json("churn", etype=t, data=SAMPLE_DATA[t]) for t in SIGNAL_TYPES]
        r = self.post(http, json.dumps(batch), BATCH_TYPE)
        assert r.status_code == 202 and r.json()["count"] == len(SIGNAL_TYPES)

    @pytest.mark.parametrize("route, content_type", [
        ("/events", STRUCTURED_TYPE), ("/events", "application/json"), ("/events", BATCH_TYPE),
        ("/events", "binary"), ("/adapters/alertmanager", "application/json"),
        ("/adapters/evidently?model=churn", "application/json"),
    ])
    def test_deeply_nested_body_is_400_not_500(self, route, content_type, http, redis_client, keys):
        """A body of nested brackets that overflows the JSON parser's recursion is a 400 with the reason."""
        body = "[" * (MAX_EVENT_BYTES - 10) if content_type in (STRUCTURED_TYPE, "binary") else "[" * 30_000
        headers = {**AUTH, "Content-Type": content_type}
        if content_type == "binary":
            headers = {**AUTH, "ce-specversion": "1.0", "ce-id": "deep", "ce-source": "urn:x", "ce-type": "drift.data",
                       "ce-subject": "churn", "ce-time": "2024-05-01T10:00:00Z", "Content-Type": "application/json"}
        r = http.post(route, content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["error"]
        assert all_stream_events(redis_client, keys) == []

    def test_an_evidently_report_parsed_but_too_deep_to_hash_is_400(self, http, redis_client, keys):
        """A report nested just under the parser's limit parses, then overflows the report hash: 400, not 500. (Where
        exactly the two limits fall depends on the stack, so a range of depths around them is tried.)"""
        codes = {}
        for depth in range(930, 980):
            body = ('{"metrics":[{"metric":"x","result":{"share_of_drifted_columns":0.5}}],"junk":'
                    + "[" * depth + "]" * depth + "}")
            r = http.post("/adapters/evidently?model=churn", content=body,
                          headers={**AUTH, "Content-Type": "application/json"})
            codes[depth] = r.status_code
            assert r.status_code in (202, 400), (depth, r.text)
            if r.status_code == 400:
                assert "nested too deeply" in r.json()["error"]
        assert 202 in codes.values() and 400 in codes.values()

    @pytest.mark.parametrize("depth, reason", [(250, "would not read back"), (900, "cannot be written as JSON")])
    def test_event_nested_deeper_than_the_consumer_reads_is_400(self, depth, reason, http, redis_client, keys):
        """A valid-JSON event whose data nests deeper than the stream's reader takes is refused, not accepted and dead-lettered."""
        deep = event_json("churn")
        deep["data"]["shape"] = json.loads("[" * depth + "]" * depth)
        r = self.post(http, json.dumps([event_json("churn"), deep]), BATCH_TYPE)
        assert r.status_code == 400 and reason in r.json()["rejected"][0]["reason"]
        assert all_stream_events(redis_client, keys) == []

    @pytest.mark.parametrize("etype, data, reason", [
        ("performance.measured", '{"metric": "accuracy", "value": NaN, "n_labeled": 500}', "NaN is not valid JSON"),
        ("drift.concept", '{"value": Infinity}', "Infinity is not valid JSON"),
        ("drift.concept", '{"value": "Infinity"}', "finite number"),
        ("performance.measured", '{"metric": "accuracy", "value": "NaN", "n_labeled": 500}', "finite number"),
        ("drift.concept", '{"value": 1e999}', "number 1e999 is out of range"),
    ])
    def test_non_finite_numbers_are_400_with_the_reason(self, etype, data, reason, http, redis_client, keys):
        """NaN/Infinity (as a JSON literal or a string) is refused with 400 and the reason, in structured and binary mode."""
        envelope = json.dumps(event_json("churn", etype=etype, data={"value": 0.1, "metric": "psi"} if etype == "drift.concept"
                                         else {"metric": "accuracy", "value": 0.1, "n_labeled": 500}))
        body = envelope[:envelope.index('"data": ')] + '"data": ' + data + "}"
        r = self.post(http, body)
        assert r.status_code == 400 and reason in r.json()["error"], r.text
        headers = {**AUTH, "ce-specversion": "1.0", "ce-id": "nan-1", "ce-source": "urn:x", "ce-type": etype,
                   "ce-subject": "churn", "ce-time": "2024-05-01T10:00:00Z", "Content-Type": "application/json"}
        r = http.post("/events", content=data, headers=headers)
        assert r.status_code == 400 and reason in r.json()["error"], r.text
        assert all_stream_events(redis_client, keys) == []

    def test_batch_content_type_requires_an_array(self, http):
        """A single object sent with the batch content type is a 400, not a silent single event."""
        r = self.post(http, json.dumps(event_json()), BATCH_TYPE)
        assert r.status_code == 400 and "array" in r.json()["error"]

    def test_unsupported_content_type_is_415(self, http):
        """A body that is not JSON by its content type is refused with 415."""
        r = self.post(http, "hello", "text/plain")
        assert r.status_code == 415


class TestBusRefusal:
    def test_a_bus_out_of_memory_is_503_and_nothing_is_acknowledged(self, http, redis_server, redis_client, keys):
        """Redis refusing the write (OOM under noeviction, READONLY after a failover) is a 503 to retry, not a 500."""
        admin = redis.Redis.from_url(redis_server.url)
        old = admin.config_get("maxmemory*")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            r = http.post("/events", json=event_json("churn"), headers=AUTH)
        finally:
            admin.config_set("maxmemory", old["maxmemory"])
            admin.config_set("maxmemory-policy", old["maxmemory-policy"])
            admin.close()
        assert r.status_code == 503, r.text
        assert "refused the write (OOM" in r.json()["error"] and "retry" in r.json()["error"]
        assert all_stream_events(redis_client, keys) == []


class TestAccepted:
    def test_single_event_is_202_and_lands_in_the_model_stream(self, http, redis_client, keys):
        """A valid event gets 202 with its id, and the stream of its model holds exactly it."""
        sent = event_json("churn", etype="performance.measured",
                          data={"metric": "accuracy", "value": 0.81, "baseline": 0.9, "n_labeled": 400})
        r = http.post("/events", json=sent, headers=AUTH)
        assert r.status_code == 202
        assert r.json() == {"accepted": [sent["id"]], "count": 1}
        got = stream_events(redis_client, keys, "churn")
        assert len(got) == 1
        assert got[0]["id"] == sent["id"] and got[0]["data"] == sent["data"] and got[0]["type"] == "performance.measured"

    def test_batch_is_202_with_ids_in_order_and_every_event_in_its_stream(self, http, redis_client, keys):
        """A batch of events for several models is published whole; each lands in its model's shard."""
        batch = [event_json(m, data={"drift_score": i / 10}) for i, m in enumerate(["churn", "fraud", "churn", "ltv"])]
        r = http.post("/events", content=json.dumps(batch), headers={**AUTH, "Content-Type": BATCH_TYPE})
        assert r.status_code == 202
        assert r.json()["accepted"] == [e["id"] for e in batch]
        for model in ("churn", "fraud", "ltv"):
            ids = [e["id"] for e in stream_events(redis_client, keys, model) if e["subject"] == model]
            assert ids == [e["id"] for e in batch if e["subject"] == model]

    def test_json_array_as_application_json_is_a_batch(self, http, redis_client, keys):
        """A JSON array posted as application/json is read as a batch."""
        batch = [event_json("churn"), event_json("churn")]
        r = http.post("/events", json=batch, headers=AUTH)
        assert r.status_code == 202 and r.json()["count"] == 2
        assert len(stream_events(redis_client, keys, "churn")) == 2

    def test_binary_mode_event_is_accepted(self, http, redis_client, keys):
        """CloudEvents binary mode (ce-* headers, data as the body) is accepted and stored."""
        headers = {**AUTH, "ce-specversion": "1.0", "ce-id": "bin-1", "ce-source": "urn:test", "ce-type": "volume.accumulated",
                   "ce-subject": "churn", "ce-time": "2024-05-01T10:00:00Z", "Content-Type": "application/json"}
        r = http.post("/events", content=json.dumps({"new_samples": 1234}), headers=headers)
        assert r.status_code == 202 and r.json()["accepted"] == ["bin-1"]
        (got,) = stream_events(redis_client, keys, "churn")
        assert got["type"] == "volume.accumulated" and got["data"]["new_samples"] == 1234


class TestAlertmanager:
    def test_firing_alerts_become_events_in_the_stream(self, http, redis_client, keys):
        """Firing alerts map by labels to typed events; resolved ones are counted; label-less ones rejected."""
        payload = webhook(
            alert("churn", "drift", fingerprint="a1", value=0.42, drifted_features="age, plan"),
            alert("churn", "performance", fingerprint="a2", value=0.81, baseline=0.9, n_labeled=512),
            alert("churn", "volume", status="resolved", fingerprint="a3", value=100),
            alert(None, "drift", fingerprint="a4", value=0.5),
        )
        r = http.post("/adapters/alertmanager", json=payload, headers=AUTH)
        assert r.status_code == 202
        body = r.json()
        assert body["count"] == 2 and body["ignored_resolved"] == 1
        assert len(body["rejected"]) == 1 and body["rejected"][0]["fingerprint"] == "a4"
        assert "no 'model' label" in body["rejected"][0]["reason"]
        got = {e["type"]: e for e in stream_events(redis_client, keys, "churn")}
        assert set(got) == {"drift.data", "performance.measured"}
        assert got["drift.data"]["data"]["drift_score"] == 0.42
        assert got["drift.data"]["data"]["drifted_features"] == ["age", "plan"]
        perf = got["performance.measured"]["data"]
        assert (perf["value"], perf["baseline"], perf["n_labeled"], perf["metric"]) == (0.81, 0.9, 512, "accuracy")
        assert got["drift.data"]["time"].startswith("2024-05-01T10:00:00.123456")
        assert sorted(e["id"] for e in got.values()) == sorted(body["accepted"])

    def test_retried_webhook_has_the_same_ids_and_one_effect(self, http, redis_client, keys):
        """The same alerts posted twice get the same event ids, and a consumer applies them once."""
        payload = webhook(alert("churn", "drift", fingerprint="b1", value=0.3),
                          alert("churn", "concept_drift", fingerprint="b2", value=0.25))
        first = http.post("/adapters/alertmanager", json=payload, headers=AUTH).json()["accepted"]
        second = http.post("/adapters/alertmanager", json=payload, headers=AUTH).json()["accepted"]
        assert first == second and len(set(first)) == 2
        effects = "retrain:test:ingest-effects"

        def handler(events, pipe):
            for e in events:
                pipe.hincrby(effects, e.id, 1)

        consumer = StreamConsumer(redis_client, keys, "g", "c1", handler, block_ms=10)
        consumer.ensure_group()
        while consumer.poll(block_ms=10):
            pass
        counts = {k.decode(): int(v) for k, v in redis_client.hgetall(effects).items()}
        assert counts == {first[0]: 1, first[1]: 1}
        assert consumer.stats.duplicates == 2

    def test_a_firing_alert_whose_values_changed_is_a_new_event(self):
        """Alertmanager re-sends a firing alert: new values (a drop that now has enough labels) are a new
        event, while the same values keep the same id whatever the receiver metadata says."""
        low = alert("churn", "performance", value=0.88, baseline=0.9, n_labeled=40, metric="accuracy")
        high = alert("churn", "performance", value=0.70, baseline=0.9, n_labeled=5000, metric="accuracy")
        first, again, changed = (alertmanager_events(webhook(a)).events[0] for a in (low, low, high))
        assert first.id == again.id and first.id != changed.id
        moved = {**webhook(low), "externalURL": "http://elsewhere:9093", "receiver": "other"}
        assert alertmanager_events(moved).events[0].id == first.id

    def test_new_firing_of_the_same_alert_is_a_new_event(self):
        """A new startsAt (the alert fired again after resolving) gives a new event id."""
        a = alert("churn", "drift", value=0.3)
        b = {**a, "startsAt": "2024-05-02T10:00:00Z"}
        ids = [alertmanager_events(webhook(x)).events[0].id for x in (a, b)]
        assert ids[0] != ids[1]

    def test_only_unmappable_alerts_is_400_with_reasons(self, http, redis_client, keys):
        """When no alert maps, the answer is 400 listing why (unknown signal, missing value)."""
        payload = webhook(alert("churn", "weather", value=1), alert("churn", "performance", value=0.8))
        r = http.post("/adapters/alertmanager", json=payload, headers=AUTH)
        assert r.status_code == 400
        reasons = [x["reason"] for x in r.json()["rejected"]]
        assert "'signal' label is 'weather'" in reasons[0]
        assert "'n_labeled'" in reasons[1]
        assert all_stream_events(redis_client, keys) == []

    def test_not_a_webhook_payload_is_400(self, http):
        """A JSON body that is not an Alertmanager payload is a 400 with the reason."""
        r = http.post("/adapters/alertmanager", json={"hello": 1}, headers=AUTH)
        assert r.status_code == 400 and "alerts" in r.json()["error"]
        r = http.post("/adapters/alertmanager", json={**webhook(), "version": "3"}, headers=AUTH)
        assert r.status_code == 400 and "version" in r.json()["error"]

    def test_every_signal_maps_to_its_type(self):
        """Each signal label maps to its event type with values from annotations."""
        result = alertmanager_events(webhook(
            alert("m", "drift", fingerprint="1", value=0.2),
            alert("m", "concept_drift", fingerprint="2", value=0.3, metric="js"),
            alert("m", "performance", fingerprint="3", value=0.7, n_labeled=50),
            alert("m", "volume", fingerprint="4", new_samples=60000),
            alert("m", "upstream", fingerprint="5", removed="age", breaking="true", feature_version="v7"),
            alert("m", "retrain", fingerprint="6", summary="labels refreshed"),
        ))
        assert not result.rejected
        by_type = {e.type: e.data for e in result.events}
        assert by_type["drift.concept"]["metric"] == "js"
        assert by_type["volume.accumulated"]["new_samples"] == 60000
        assert by_type["upstream.changed"]["removed"] == ["age"] and by_type["upstream.changed"]["breaking"] is True
        assert by_type["retrain.requested"]["reason"] == "labels refreshed"
        assert len(by_type) == 6


class TestEvidently:
    @pytest.mark.parametrize("report", [EVIDENTLY_LEGACY_REPORT, EVIDENTLY_07_SNAPSHOT], ids=["legacy", "v0.7"])
    def test_report_lands_as_drift_data(self, http, redis_client, keys, report):
        """A DataDriftPreset report becomes one drift.data event: share of drifted columns, features, stats."""
        r = http.post("/adapters/evidently", params={"model": "churn"}, json=report, headers=AUTH)
        assert r.status_code == 202, r.text
        (got,) = stream_events(redis_client, keys, "churn")
        assert got["id"] == r.json()["accepted"][0]
        data = got["data"]
        assert got["type"] == "drift.data"
        assert data["drift_score"] == pytest.approx(2 / 3)
        assert data["drifted_features"] == ["age", "plan"]
        assert data["dataset_drift"] is True and data["dataset_drift_share"] == 0.5
        by_name = {f["name"]: f for f in data["features"]}
        assert by_name["income"]["p_value"] == pytest.approx(0.584980918983971)
        assert by_name["income"]["drifted"] is False
        assert by_name["plan"]["kind"] == "categorical" and by_name["plan"]["test"] == "chi-square p_value"

    def test_same_report_twice_has_the_same_id(self, http):
        """Re-posting a report (a retry) yields the same event id; another model gets another."""
        ids = [http.post("/adapters/evidently", params={"model": m}, json=EVIDENTLY_07_SNAPSHOT, headers=AUTH).json()["accepted"][0]
               for m in ("churn", "churn", "fraud")]
        assert ids[0] == ids[1] != ids[2]

    def test_distance_tests_drift_at_or_above_the_threshold(self):
        """For distance methods (0.7 format) a column drifts when the score reaches the threshold."""
        def value_drift(col, score):
            return {"metric_name": f"ValueDrift(column={col},method=Wasserstein distance (normed),threshold=0.1)",
                    "config": {"type": "evidently:metric_v2:ValueDrift", "column": col,
                               "method": "Wasserstein distance (normed)", "threshold": 0.1}, "value": score}

        event = evidently_event({"metrics": [value_drift("a", 0.25), value_drift("b", 0.05)]}, "churn")
        assert event.data["drifted_features"] == ["a"]
        assert event.data["drift_score"] == 0.5
        assert event.data["features"][1]["p_value"] is None

    def test_bad_reports_and_missing_model_are_400(self, http):
        """No model parameter, an invalid model name, or a report without drift results are 400s."""
        assert http.post("/adapters/evidently", json=EVIDENTLY_07_SNAPSHOT, headers=AUTH).status_code == 400
        assert http.post("/adapters/evidently", params={"model": "bad name!"}, json=EVIDENTLY_07_SNAPSHOT,
                         headers=AUTH).status_code == 400
        r = http.post("/adapters/evidently", params={"model": "churn"}, json={"metrics": []}, headers=AUTH)
        assert r.status_code == 400 and "no data drift metric" in r.json()["error"]
        with pytest.raises(AdapterError):
            evidently_event([1, 2], "churn")

    @pytest.mark.parametrize("body", [
        '{"metrics": [{"metric": "DatasetDriftMetric", "result": {"number_of_drifted_columns": 1e999, '
        '"number_of_columns": 3, "dataset_drift": true}}]}',
        '{"metrics": [{"metric_id": "DriftedColumnsCount(drift_share=0.5)", "value": {"count": Infinity, "share": 0.5}}]}',
    ])
    def test_overflowing_numbers_in_a_report_are_400_not_500(self, body, http, redis_client, keys):
        r = http.post("/adapters/evidently", params={"model": "churn"}, content=body,
                      headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and "unreadable Evidently metric" in r.json()["error"], r.text
        assert all_stream_events(redis_client, keys) == []


def metric_samples(text: str, family: str) -> dict[str, float]:
    """The samples of one metric family in a Prometheus exposition: ``name{labels}`` -> value."""
    out = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


class TestHealthAndOpenAPI:
    def test_metrics_count_accepted_events(self, http):
        """/metrics exposes retrain_ingest_events_total, which grows with accepted events."""
        def accepted():
            return metric_samples(http.get("/metrics").text, "retrain_ingest_events_total").get(
                'retrain_ingest_events_total{outcome="accepted",source="http"}', 0.0)

        before = accepted()
        assert http.post("/events", json=event_json(), headers=AUTH).status_code == 202
        assert accepted() == before + 1

    def test_metrics_count_rejected_events_by_source(self, http):
        """Refused events count as rejected, under the path they came in by (http, alertmanager, evidently)."""
        def counts():
            return metric_samples(http.get("/metrics").text, "retrain_ingest_events_total")

        def key(outcome, source):
            return f'retrain_ingest_events_total{{outcome="{outcome}",source="{source}"}}'

        before = counts()
        bad_batch = [event_json(), {**event_json(), "type": "drift.nope"}]
        assert http.post("/events", json=bad_batch, headers=AUTH).status_code == 400
        assert http.post("/events", content=b"{broken", headers={**AUTH, "Content-Type": STRUCTURED_TYPE}).status_code == 400
        am = webhook(alert("churn", "drift", fingerprint="r1", value=0.3), alert("churn", "weather", value=1))
        assert http.post("/adapters/alertmanager", json=am, headers=AUTH).status_code == 202
        assert http.post("/adapters/evidently", params={"model": "churn"}, json={"metrics": []},
                         headers=AUTH).status_code == 400
        after = counts()
        grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert grew[key("rejected", "http")] == 3  # the batch of two, refused whole, and the malformed body
        assert grew[key("rejected", "alertmanager")] == 1 and grew[key("accepted", "alertmanager")] == 1
        assert grew[key("rejected", "evidently")] == 1

    def test_metrics_count_requests_by_route_and_status_refusals_before_reading_included(self, http):
        """Every answer is counted by route and code: 202, and the refusals that read no event (401, 413, 415)."""
        def counts():
            return metric_samples(http.get("/metrics").text, "retrain_ingest_requests_total")

        def key(route, code):
            return f'retrain_ingest_requests_total{{code="{code}",route="{route}"}}'

        before = counts()
        assert http.post("/events", json=event_json(), headers=AUTH).status_code == 202
        assert http.post("/events", json=event_json()).status_code == 401
        too_big = b"x" * (Settings().max_event_bytes + 1)
        assert http.post("/events", content=too_big, headers={**AUTH, "Content-Type": STRUCTURED_TYPE}).status_code == 413
        assert http.post("/events", content=b"a,b", headers={**AUTH, "Content-Type": "text/csv"}).status_code == 415
        assert http.post("/adapters/evidently", json={}, headers=AUTH).status_code == 400  # no ?model=
        assert http.post("/nowhere", json={}).status_code == 404
        after = counts()
        grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert grew[key("/events", 202)] == grew[key("/events", 401)] == 1
        assert grew[key("/events", 413)] == grew[key("/events", 415)] == 1
        assert grew[key("/adapters/evidently", 400)] == 1 and grew[key("other", 404)] == 1

    def test_requests_are_counted_by_route_under_a_proxy_prefix(self, redis_server, ingest_settings, keys):
        """Served under a root path (a proxy's prefix), a request still counts under its route, not as ``other``."""
        bus = EventBus(redis.Redis.from_url(redis_server.url), keys)
        with ServerThread(create_app(bus, ingest_settings), root_path="/ingest") as srv:
            def accepted():
                return metric_samples(httpx.get(f"{srv.url}/metrics").text, "retrain_ingest_requests_total").get(
                    'retrain_ingest_requests_total{code="202",route="/events"}', 0.0)

            before = accepted()
            assert httpx.post(f"{srv.url}/events", json=event_json(), headers=AUTH, timeout=10).status_code == 202
            assert accepted() == before + 1

    def test_healthz_reports_redis(self, http, redis_server, keys):
        """/healthz is 200 with Redis up (no token needed) and 503 when Redis is unreachable."""
        r = http.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok", "redis": True}
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        s = Settings(redis_url="redis://127.0.0.1:1/0", ingest_token=TOKEN)
        with ServerThread(create_app(EventBus(dead, keys), s)) as srv:
            r = httpx.get(f"{srv.url}/healthz", timeout=10)
            assert r.status_code == 503 and r.json()["redis"] is False
            r = httpx.post(f"{srv.url}/events", json=event_json(), headers=AUTH, timeout=10)
            assert r.status_code == 503 and "retry" in r.json()["error"]

    def test_openapi_lists_the_routes_and_the_bearer_scheme(self, http):
        """The OpenAPI document lists every route, the content types of /events and bearer auth."""
        doc = http.get("/openapi.json").json()
        assert {"/events", "/adapters/alertmanager", "/adapters/evidently", "/healthz"} <= set(doc["paths"])
        content = doc["paths"]["/events"]["post"]["requestBody"]["content"]
        assert BATCH_TYPE in content and STRUCTURED_TYPE in content
        assert {"202", "400", "401", "413"} <= set(doc["paths"]["/events"]["post"]["responses"])
        assert any(s.get("scheme") == "bearer" for s in doc["components"]["securitySchemes"].values())


class TestCli:
    def test_retrain_ingest_serves_and_refuses_without_token(self, redis_server, redis_client, keys, tmp_path):
        """`retrain ingest` exits 2 with one line without a token, and serves events with one."""
        env = {**os.environ, "RETRAIN_REDIS_URL": redis_server.url, "RETRAIN_STATE_DIR": str(tmp_path)}
        env.pop("RETRAIN_INGEST_TOKEN", None)
        exe = str(ROOT / ".venv" / "bin" / "retrain")
        refused = subprocess.run([exe, "ingest", "--port", "0"], env=env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1 and "RETRAIN_INGEST_TOKEN" in refused.stderr

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([exe, "ingest", "--port", str(port), "--log-level", "warning"],
                                env={**env, "RETRAIN_INGEST_TOKEN": TOKEN}, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"

            def healthy():
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode())
                try:
                    return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
                except httpx.TransportError:
                    time.sleep(0.1)
                    return False

            wait_for(healthy, timeout=30, message="retrain ingest to answer /healthz")
            sent = event_json("churn")
            r = httpx.post(f"{url}/events", json=sent, headers=AUTH, timeout=10)
            assert r.status_code == 202
            assert [e["id"] for e in stream_events(redis_client, keys, "churn")] == [sent["id"]]
        finally:
            proc.terminate()
            proc.wait(timeout=15)
