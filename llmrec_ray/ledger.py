"""Which shards exist, which are quarantined, and which model versions consumed which shard.

`ledger.json` (one small object, compare-and-swap writes) holds
    {"shards": {key: {"period": "1997-09-22", "num_rows": 1234, "consumed_by": ["v0002"],
                      "sha256": <hex of the shard's bytes>, "object_version": <store tag, see Store.list_versions>}},
     "quarantined": {key: {"kind": ..., "problems": [{"reason": ..., "bad_rows": n}], "num_rows": n, ...}},
     "held": {key: {"period": ..., "since": <epoch s>, "unknown_rows": n, "examples": [...], "sha256": ...}}}
kind: invalid | duplicate_content | duplicate_rows (quarantined when registered), unreadable | changed |
missing (registered, then broken); each report is also at quarantine/<key>.report.json beside the bytes.

Held shards: a new shard whose only problem is item ids the catalogue lacks waits in place ("held"), since the
catalogue update that adds them may land after the events (llmrec_ray/catalog.py). Every refresh checks it
again against the newest catalogue: once covered it is registered as usual; still uncovered after
`hold_unknown_items_s` (config data.hold_unknown_items_s) it is quarantined. While a shard is held, no shard of
its period or a later one is new (the stream waits, in time order, instead of learning the future first).

"New" is relative to a lineage (the promoted version and its ancestors): a shard is new while no
version of that lineage consumed it. So a rollback makes the rolled-back version's shards new again,
and a round that crashed before its commit leaves its shards new. `commit()` refuses to let one
lineage consume a shard twice; two racing commits from the same state: exactly one wins.

Integrity (`refresh()`): every shard is registered with the sha256 of its bytes. A new shard that is
byte-identical to a registered one -- consumed or not, under any name -- is quarantined as a duplicate,
so its rows are never learned twice. A shard holding exact duplicate rows is quarantined as received and
its unique rows are registered as `<name>.dedup.parquet` (the report counts the dropped rows).
Registered shards are immutable: one whose bytes change later (overwritten, truncated, garbage) is
quarantined with a report naming it, and one that disappears is recorded as missing, so later rounds go
on without it. Besides new shards, only shards whose store tag changed are read: a refresh costs one listing.
A copy is recognised by its bytes: the same rows written again with another writer or compression are not.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmrec_ray.catalog import load_catalog
from llmrec_ray.schema import (INTERACTIONS_PREFIX, LEDGER_KEY, QUARANTINE_PREFIX, UNKNOWN_ITEMS, ShardProblem,
                               period_of_key, validate_interactions)
from llmrec_ray.store import ConflictError, Store

DEDUP_SUFFIX = ".dedup.parquet"  # the unique rows of a shard that held exact duplicate rows


@dataclass
class ShardInfo:
    key: str
    period: str
    num_rows: int
    consumed_by: list[str] = field(default_factory=list)
    sha256: str | None = None  # of the shard's bytes, recorded when it was registered


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_shard_bytes(data: bytes, known_item_ids: set[str]) -> tuple[pa.Table | None, list[ShardProblem]]:
    """(table, []) for a good shard; (None or table, problems) for one that must be quarantined."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        return None, [ShardProblem(f"unreadable Parquet: {exc}", 0)]
    return table, validate_interactions(table, known_item_ids)


def drop_duplicate_rows(table: pa.Table) -> tuple[pa.Table, int]:
    """(table without exact duplicate rows, keeping each row's first occurrence in order; rows dropped)."""
    if table.num_rows < 2:
        return table, 0
    cols = table.column_names
    first = (table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
             .group_by(cols, use_threads=False).aggregate([("__row", "min")]).column("__row_min"))
    dropped = table.num_rows - len(first)
    return (table.take(pc.sort_indices(first)) if dropped else table), dropped


def dedup_key(key: str) -> str:
    """'.../part-00000.parquet' -> '.../part-00000.dedup.parquet' (same period)."""
    return key[: -len(".parquet")] + DEDUP_SUFFIX


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _num_rows(data: bytes) -> int | None:
    try:
        return pq.read_metadata(io.BytesIO(data)).num_rows
    except (pa.ArrowInvalid, OSError):
        return None


class Ledger:
    def __init__(self, store: Store, hold_unknown_items_s: float = 86400.0):
        self.store, self.hold_unknown_items_s = store, hold_unknown_items_s

    def _read(self) -> tuple[dict, str | None]:
        got = self.store.read_json(LEDGER_KEY)
        state = got.value or {"shards": {}, "quarantined": {}}
        state.setdefault("held", {})  # ledgers written before held shards existed
        return state, got.etag

    # --- refresh: register, verify, quarantine ---------------------------------------------------
    def refresh(self) -> list[dict]:
        """Bring the ledger in line with interactions/: register new shards, quarantine bad, duplicate and
        changed ones, record missing ones. Returns the reports of this call (empty: nothing to report)."""
        carried: list[dict] = []  # reports of attempts whose ledger write lost a race: their moves are done
        while True:
            state, etag = self._read()
            before = json.dumps(state, sort_keys=True)
            reports = self._refresh_state(state, carried)
            if json.dumps(state, sort_keys=True) == before:
                return reports
            try:
                self.store.put_json(LEDGER_KEY, state, etag)
                return reports
            except ConflictError:  # another process wrote the ledger meanwhile: redo on its state
                carried = reports

    def _refresh_state(self, state: dict, carried: list[dict]) -> list[dict]:
        listing = self.store.list_versions(INTERACTIONS_PREFIX, suffix=".parquet")  # key -> object version
        reports = [r for r in carried if r["shard"] not in listing]
        for report in reports:  # quarantined by an earlier attempt of this call
            state["shards"].pop(report["shard"], None)
            state["quarantined"][report["shard"]] = report
        for key in [k for k in state["shards"] if k not in listing]:
            reports.append(self._record_missing(state, key))
        for key in [k for k in state["held"] if k not in listing]:  # deleted while held
            del state["held"][key]
        unseen = [k for k in listing if k not in state["shards"]]
        for key, version in listing.items():
            entry = state["shards"].get(key)
            if entry is not None and entry.get("object_version") != version:
                reports.extend(self._verify(state, key, version))  # may quarantine it: it is then no longer listed
        if unseen:
            item_ids, known = set(load_catalog(self.store, ["item_id"]).index), self._known_hashes(state)
            for key in unseen:
                reports.extend(self._register(state, key, listing[key], item_ids, known))
        return reports

    def _known_hashes(self, state: dict) -> dict[str, str]:
        """sha256 -> registered key, for a shard's registered bytes and for the bytes it was received as."""
        known = {}
        for key, entry in state["shards"].items():
            for digest in (entry.get("sha256"), entry.get("received_sha256")):
                if digest:
                    known.setdefault(digest, key)
        return known

    def _register(self, state: dict, key: str, version: str, item_ids: set[str], known: dict[str, str]) -> list[dict]:
        """Validate, hash and register one new shard; `known` (sha256 -> key) is updated with what it registers."""
        data = self.store.read_bytes(key)
        digest = sha256_hex(data)
        gone = state["quarantined"].get(key, {})
        if gone.get("kind") == "missing" and gone.get("ledger_entry", {}).get("sha256") == digest:
            state["shards"][key] = {**gone["ledger_entry"], "object_version": version}  # restored as it was
            del state["quarantined"][key]
            known.setdefault(digest, key)
            print(f"ledger: {key} is back with the content it was registered with; its consumers are kept")
            return []
        original = known.get(digest)
        if original is not None:
            return [self._quarantine_duplicate(state, key, digest, original, _num_rows(data))]
        state["quarantined"].pop(key, None)  # a new shard under a name that was quarantined before
        table, problems = check_shard_bytes(data, item_ids)
        if problems and all(p.kind == UNKNOWN_ITEMS for p in problems):
            held = self._hold(state, key, digest, table.num_rows, problems[0])
            if held is not None:
                return [held]
        state["held"].pop(key, None)
        if problems:
            report = self._quarantine(key, table.num_rows if table is not None else None, problems, "invalid",
                                      sha256=digest)
            state["quarantined"][key] = report
            return [report]
        table, dropped = drop_duplicate_rows(table)
        if not dropped:
            state["shards"][key] = {"period": period_of_key(key), "num_rows": table.num_rows, "consumed_by": [],
                                    "sha256": digest, "object_version": version}
            known[digest] = key
            return []
        # The unique rows become a new shard (registered shards never change in place); the shard as received
        # goes to quarantine, so nothing is lost and a re-upload of it is recognised by its hash.
        unique_key, unique_bytes = dedup_key(key), _parquet_bytes(table)
        original = known.get(sha256_hex(unique_bytes))
        if original is not None:  # its unique rows are, byte for byte, a registered shard
            return [self._quarantine_duplicate(state, key, digest, original, table.num_rows + dropped,
                                               f"with its {dropped} exact duplicate rows dropped, byte-identical")]
        self.store.write_bytes(unique_key, unique_bytes)
        problem = ShardProblem(f"{dropped} exact duplicate rows dropped (each kept once); the {table.num_rows} "
                               f"unique rows are registered as {unique_key}", dropped)
        report = self._quarantine(key, table.num_rows + dropped, [problem], "duplicate_rows", sha256=digest,
                                  registered_as=unique_key, duplicate_rows_dropped=dropped)
        state["quarantined"][key] = report
        state["shards"][unique_key] = {"period": period_of_key(key), "num_rows": table.num_rows, "consumed_by": [],
                                       "sha256": sha256_hex(unique_bytes), "object_version": None,
                                       "received_as": key, "received_sha256": digest,
                                       "duplicate_rows_dropped": dropped}
        known[digest] = known[sha256_hex(unique_bytes)] = unique_key
        return [report]

    def _hold(self, state: dict, key: str, digest: str, num_rows: int, problem: ShardProblem) -> dict | None:
        """Hold a shard that waits for a catalogue update (the report), or None when it waited too long: the
        problem's reason then says so and the caller quarantines it."""
        held = state["held"].get(key)
        now = time.time()
        since = held["since"] if held and held.get("sha256") == digest else now
        limit = self.hold_unknown_items_s
        if now - since >= limit:
            problem.reason += (f"; held {now - since:.0f} s waiting for a catalogue update, the limit is {limit:g} s "
                               "(data.hold_unknown_items_s)")
            return None
        entry = {"period": period_of_key(key), "since": since, "num_rows": num_rows, "unknown_rows": problem.bad_rows,
                 "examples": list(problem.examples), "sha256": digest}
        if held != entry:
            state["held"][key] = entry
        if held is None:
            print(f"ledger: holding {key}: {problem.bad_rows} rows name items not in the catalogue yet (e.g. "
                  f"{list(problem.examples)[:3]}); it waits for a catalogue update, at most {limit:g} s")
        return {"shard": key, "kind": "held", "num_rows": num_rows, **entry,
                "problems": [{"reason": problem.reason, "bad_rows": problem.bad_rows}]}

    def _quarantine_duplicate(self, state: dict, key: str, digest: str, original: str, num_rows: int | None,
                              how: str = "byte-identical") -> dict:
        consumers = state["shards"][original]["consumed_by"]
        status = f"consumed by {', '.join(consumers)}" if consumers else "registered, not yet consumed"
        problem = ShardProblem(f"{how} (sha256 {digest[:16]}...) to {original} ({status}); its rows are "
                               "not learned again", num_rows or 0)
        report = self._quarantine(key, num_rows, [problem], "duplicate_content", sha256=digest, duplicate_of=original)
        state["quarantined"][key] = report
        return report

    def _verify(self, state: dict, key: str, version: str) -> list[dict]:
        """A registered shard whose store tag changed: same bytes -> new tag; other bytes -> quarantine."""
        entry = state["shards"][key]
        data = self.store.read_bytes(key)
        digest = sha256_hex(data)
        if entry.get("sha256") in (None, digest) and _num_rows(data) is not None:
            # the same bytes written again (or copied), or an entry from a ledger written before hashing
            entry["sha256"], entry["object_version"] = digest, version
            return []
        unreadable = _num_rows(data) is None
        what = "is no longer readable Parquet" if unreadable else "was overwritten with other content"
        recorded = f"sha256 {entry['sha256'][:16]}... at registration, now {digest[:16]}..." if entry.get("sha256") else ""
        consumed = f"; it was consumed by {', '.join(entry['consumed_by'])}" if entry["consumed_by"] else ""
        problem = ShardProblem(f"registered shard {what} ({recorded or 'no hash recorded'}){consumed}; registered shards "
                               "are immutable: write new events under a new key", entry["num_rows"])
        report = self._quarantine(key, entry["num_rows"], [problem], "unreadable" if unreadable else "changed",
                                  sha256=digest, registered_sha256=entry.get("sha256"), consumed_by=entry["consumed_by"])
        del state["shards"][key]
        state["quarantined"][key] = report
        return [report]

    def _record_missing(self, state: dict, key: str) -> dict:
        entry = state["shards"].pop(key)
        report_key = f"{QUARANTINE_PREFIX}/{key}.report.json"
        report = json.loads(self.store.read_bytes(report_key)) if self.store.exists(report_key) else None
        if report is None or entry.get("sha256") not in (report.get("sha256"), report.get("registered_sha256")):
            problem = ShardProblem(f"registered shard {key} was deleted from the store; later rounds go on without it",
                                   entry["num_rows"])
            report = {"shard": key, "kind": "missing", "num_rows": entry["num_rows"],
                      "problems": [{"reason": problem.reason, "bad_rows": problem.bad_rows}],
                      "consumed_by": entry["consumed_by"], "sha256": entry.get("sha256"), "ledger_entry": entry}
            print(f"ledger: {problem.reason}")
        state["quarantined"][key] = report
        return report

    def _quarantine(self, key: str, num_rows: int | None, problems: list[ShardProblem], kind: str, **extra) -> dict:
        report = {"shard": key, "kind": kind, "num_rows": num_rows,
                  "problems": [{"reason": p.reason, "bad_rows": p.bad_rows} for p in problems],
                  "quarantined_to": f"{QUARANTINE_PREFIX}/{key}", **extra}
        self.store.write_bytes(f"{QUARANTINE_PREFIX}/{key}.report.json", json.dumps(report, indent=2).encode())
        self.store.move(key, f"{QUARANTINE_PREFIX}/{key}")
        print(f"ledger: quarantined {key} ({kind}): " + "; ".join(p.reason for p in problems))
        return report

    # --- queries and commits ------------------------------------------------------------------------
    def shards(self) -> list[ShardInfo]:
        state, _ = self._read()
        infos = [ShardInfo(k, v["period"], v["num_rows"], list(v["consumed_by"]), v.get("sha256"))
                 for k, v in state["shards"].items()]
        return sorted(infos, key=lambda s: (s.period, s.key))

    def quarantined(self) -> dict[str, dict]:
        return self._read()[0]["quarantined"]

    def held(self) -> dict[str, dict]:
        """Shards waiting for a catalogue update: key -> {"period", "since", "unknown_rows", "examples", ...}."""
        return self._read()[0]["held"]

    def new_shards(self, lineage: set[str]) -> list[ShardInfo]:
        """Shards no version of `lineage` consumed, oldest first, before the period of the oldest held shard."""
        held = [h["period"] for h in self.held().values()]
        wall = min(held) if held else None
        return [s for s in self.shards() if not set(s.consumed_by) & set(lineage) and (wall is None or s.period < wall)]

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
