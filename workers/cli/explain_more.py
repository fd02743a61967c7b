"""Look up records other than decisions for ``retrain explain`` (pipelines)."""

from __future__ import annotations

import json


def find_other(client, keys, record_id: str):
    """A pipeline record by id, searched across models (None if unknown)."""
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
