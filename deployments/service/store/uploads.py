"""Upload records: who uploaded a reference or a song to edit, and what it is (`mg:upload:{id}`)."""

from __future__ import annotations

import json
from typing import Any

from deployments.service.store.records import Upload
from deployments.service.store.schema import upload_key
from deployments.service.store.steps import Call, Steps, operation


class UploadOps:
    @operation
    def put_upload(self, upload_id: str, owner: str, info: dict[str, Any]) -> Steps[None]:
        """Record who uploaded `upload_id` (an API key id; "" when auth is off) and what it is."""
        yield Call("hset", (upload_key(upload_id),), {"mapping": {"owner": owner, "info": json.dumps(info)}})

    @operation
    def upload(self, upload_id: str) -> Steps[Upload | None]:
        """(owner, info) of a recorded upload, or None."""
        h = yield Call("hgetall", (upload_key(upload_id),))
        return Upload.from_hash(h) if h else None
