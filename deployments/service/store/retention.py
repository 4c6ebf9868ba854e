"""Files past their retention, the Redis side: one sorted set (`mg:expiring`) of what is due when, in
Redis time. A finished job's takes are due when its record expires (the scripts that end a job add
them); an upload `retention_s` after it was stored. The sweeper (deployments/service/retention.py)
claims due entries, deletes the files, then reports them deleted, which also deletes an upload's
record: an upload's record lives exactly as long as its file."""

from __future__ import annotations

from deployments.service.store.records import text
from deployments.service.store.schema import EXPIRING, upload_key
from deployments.service.store.steps import Script, Steps, operation

SWEEP_CLAIM_S = 300  # a sweeper that claimed files and died before deleting them: others retry after this


class RetentionOps:
    retention_s: int

    @operation
    def expire_upload(self, upload_id: str) -> Steps[None]:
        """Schedule an upload's deletion `retention_s` from now (call it before storing the file: an
        upload stored without an entry would never be deleted)."""
        yield Script("expire_files", [EXPIRING], [f"uploads:{upload_id}", self.retention_s])

    @operation
    def claim_due_files(self, limit: int = 100) -> Steps[list[tuple[str, str]]]:
        """Files whose time is up, as (area, key) pairs: ("results", job id) for the job's folder of
        takes, ("uploads", upload id). Atomic: two sweepers never get the same entry, unless the first
        has not called `files_deleted` within SWEEP_CLAIM_S."""
        due = yield Script("claim_due_files", [EXPIRING], [limit, SWEEP_CLAIM_S])
        return [(area, key) for area, _, key in (text(m).partition(":") for m in due)]

    @operation
    def files_deleted(self, entries: list[tuple[str, str]]) -> Steps[None]:
        """The files of these `claim_due_files` entries are deleted: drop the entries, and the
        records of the uploads among them (an upload is gone with its file), in one step."""
        if entries:
            records = [upload_key(key) for area, key in entries if area == "uploads"]
            yield Script("files_deleted", [EXPIRING, *records], [f"{area}:{key}" for area, key in entries])
