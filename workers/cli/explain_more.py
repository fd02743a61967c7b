"""Look up records other than decisions for ``retrain explain``: pipelines (``p-...``) and
rollouts (``rollout:MODEL``: every analysis record, transition and manual action)."""

from __future__ import annotations

import json


def find_other(client, keys, record_id: str):
    """A pipeline record by id, searched across models, or a model's rollout (None if unknown)."""
    if record_id.startswith("rollout:"):
        model = record_id.split(":", 1)[1]
        raw = client.hget(keys.rollout(model), "state")
        if raw is None:
            return None
        state = json.loads(raw)
        return {"rollout": model, "candidate": state["candidate"], "production": state["production"],
                "status": state["status"], "phase": state["phase"], "reason": state["reason"],
                "last_analysis": state.get("last_analysis"), "history": state.get("history", [])}
    if not record_id.startswith("p-"):
        return None
    for model in client.smembers(keys.models()):
        m = model.decode()
        raw = client.hgetall(keys.pipeline(m, record_id))
        if raw:
            out = {k.decode(): v.decode() for k, v in raw.items()}
            for k, v in list(out.items()):
                if v[:1] in "[{":
                    try:
                        out[k] = json.loads(v)
                    except ValueError:
                        pass
            return {"model": m, "pipeline_id": record_id, **out}
    return None
