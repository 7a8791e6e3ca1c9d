"""Which shards exist, which are quarantined, and which model versions consumed which shard.

`ledger.json` (one small object, compare-and-swap writes) holds
    {"shards": {key: {"period": "1997-09-22", "num_rows": 1234, "consumed_by": ["v0002"]}},
     "quarantined": {key: {"reason": ..., "bad_rows": n, "num_rows": n}}}

"New" is relative to a lineage (the promoted version and its ancestors): a shard is new while no
version of that lineage consumed it. So a rollback makes the rolled-back version's shards new again,
and a round that crashed before its commit leaves its shards new. `commit()` refuses to let one
lineage consume a shard twice; two racing commits from the same state: exactly one wins.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from llmrec_ray.schema import (CATALOG_KEY, INTERACTIONS_PREFIX, LEDGER_KEY, QUARANTINE_PREFIX, ShardProblem,
                               period_of_key, validate_interactions)
from llmrec_ray.store import ConflictError, Store


@dataclass
class ShardInfo:
    key: str
    period: str
    num_rows: int
    consumed_by: list[str] = field(default_factory=list)


def read_shard(store: Store, key: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(key)))


def check_shard(store: Store, key: str, known_item_ids: set[str]) -> tuple[pa.Table | None, list[ShardProblem]]:
    """(table, []) for a good shard; (None or table, problems) for one that must be quarantined."""
    try:
        table = read_shard(store, key)
    except (pa.ArrowInvalid, OSError) as exc:
        return None, [ShardProblem(f"unreadable Parquet: {exc}", 0)]
    return table, validate_interactions(table, known_item_ids)


class Ledger:
    def __init__(self, store: Store):
        self.store = store

    def _read(self) -> tuple[dict, str | None]:
        got = self.store.read_json(LEDGER_KEY)
        return (got.value or {"shards": {}, "quarantined": {}}), got.etag

    def known_item_ids(self) -> set[str]:
        if not self.store.exists(CATALOG_KEY):
            raise ValueError(f"no catalogue at {self.store.key_uri(CATALOG_KEY)}; import data first (llmrec data import ...)")
        table = pq.read_table(io.BytesIO(self.store.read_bytes(CATALOG_KEY)), columns=["item_id"])
        return set(table.column("item_id").to_pylist())

    def refresh(self) -> list[dict]:
        """Register shards that appeared under interactions/; quarantine bad ones. Returns the quarantine reports."""
        state, etag = self._read()
        unseen = [k for k in self.store.list(INTERACTIONS_PREFIX, suffix=".parquet") if k not in state["shards"]]
        if not unseen:
            return []
        item_ids = self.known_item_ids()
        reports = []
        for key in unseen:
            table, problems = check_shard(self.store, key, item_ids)
            if problems:
                reports.append(self._quarantine(key, table, problems))
                state["quarantined"][key] = reports[-1]
            else:
                state["shards"][key] = {"period": period_of_key(key), "num_rows": table.num_rows, "consumed_by": []}
        try:
            self.store.put_json(LEDGER_KEY, state, etag)
        except ConflictError:
            return self.refresh()  # another process registered shards meanwhile: redo on its state
        return reports

    def _quarantine(self, key: str, table: pa.Table | None, problems: list[ShardProblem]) -> dict:
        report = {"shard": key, "num_rows": None if table is None else table.num_rows,
                  "problems": [{"reason": p.reason, "bad_rows": p.bad_rows} for p in problems],
                  "quarantined_to": f"{QUARANTINE_PREFIX}/{key}"}
        self.store.write_bytes(f"{QUARANTINE_PREFIX}/{key}.report.json", json.dumps(report, indent=2).encode())
        self.store.move(key, f"{QUARANTINE_PREFIX}/{key}")
        print(f"ledger: quarantined {key}: " + "; ".join(p.reason for p in problems))
        return report

    def shards(self) -> list[ShardInfo]:
        state, _ = self._read()
        infos = [ShardInfo(k, v["period"], v["num_rows"], list(v["consumed_by"])) for k, v in state["shards"].items()]
        return sorted(infos, key=lambda s: (s.period, s.key))

    def quarantined(self) -> dict[str, dict]:
        return self._read()[0]["quarantined"]

    def new_shards(self, lineage: set[str]) -> list[ShardInfo]:
        return [s for s in self.shards() if not set(s.consumed_by) & set(lineage)]

    def etag(self) -> str | None:
        """The ledger's current version tag: pass it to commit() to fail if anyone wrote since."""
        return self._read()[1]

    def commit(self, shard_keys: list[str], version: str, lineage: set[str], expected_etag: str | None = None) -> None:
        """Record that `version` (whose ancestors are `lineage`) learned `shard_keys`. Atomic (CAS).

        Idempotent for the same version. ConflictError if a shard was already consumed by the lineage, or
        if `expected_etag` is given and the ledger changed since that snapshot (racing writers that read
        the same snapshot: exactly one wins).
        """
        state, etag = self._read()
        if expected_etag is not None and etag != expected_etag:
            raise ConflictError(f"ledger changed since snapshot {expected_etag} (now {etag}); another round committed "
                                f"first -- {version} does not commit")
        ancestors = set(lineage) - {version}
        for key in shard_keys:
            entry = state["shards"].get(key)
            if entry is None:
                raise ValueError(f"shard {key!r} is not in the ledger; run refresh() first")
            already = set(entry["consumed_by"]) & ancestors
            if already:
                raise ConflictError(f"shard {key} was already consumed by {sorted(already)} in this lineage; "
                                    f"{version} must not consume it twice")
        if all(version in state["shards"][k]["consumed_by"] for k in shard_keys):
            return  # already committed (a rerun after a crash)
        for key in shard_keys:
            if version not in state["shards"][key]["consumed_by"]:
                state["shards"][key]["consumed_by"].append(version)
        self.store.put_json(LEDGER_KEY, state, etag)
