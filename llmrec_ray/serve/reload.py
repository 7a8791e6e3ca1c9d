"""Hot reload for one Scorer replica: follow the registry's promoted pointer (or a pinned version) and swap the
loaded model as ONE reference, never on the request path. No Ray here: `Scorer` (scorer.py) drives it.

A version that fails to load or to warm up is refused and the old one keeps serving; the refusal shows in the
log, in GET /v1/model (without server paths) and in /metrics. It is tried again as soon as the pointer is written
again (re-promoted after a repair: the pointer's etag changes), else after serve.reload_backoff_s, doubling up to
serve.reload_backoff_max_s.

The catalogue grows without a reload: after each load, and whenever the catalogue version changes (same poll), the
served version takes the items it lacks, off the request path. Its collaborative tables get a row and a text vector
for each (inference.grow_tables, the same rows the next round would give them: the tree head compares a new item's
text with the history's from the moment it is in the catalogue), swapped in as one new reference; its item index adds
them in place (inference.grow_index). A failed growth is logged and the version keeps serving as it is (a new item
is still scored, from its text by the text part); the next poll tries again.
"""

import logging
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from llmrec_ray.catalog import catalog_version, load_catalog
from llmrec_ray.config import Config
from llmrec_ray.registry import PROMOTED_KEY, Registry, model_prefix
from llmrec_ray.serve.inference import Loaded, follows_catalog, grow_index, grow_tables, load_version, warm_up
from llmrec_ray.serve.resolve import TEXT_COLUMNS

log = logging.getLogger("llmrec.serve")

_PATH = re.compile(r"(?:[A-Za-z][\w+.-]*://[^\s'\"]+|(?<![\w.~])(?:/[^\s/'\"():,;]+){2,}/?)")


def without_paths(text: str, roots: list[str]) -> str:
    """`text` with server paths and URIs cut to their last part (GET /v1/model is for clients, not for the layout
    of the server's disks): the known roots go first, then anything that looks like an absolute path or a URI."""
    for root in roots:
        text = text.replace(root.rstrip("/") + "/", "")
    return _PATH.sub(lambda m: ".../" + m.group().rstrip("/").rsplit("/", 1)[-1], text)


def run_every(interval_s: float, stop: threading.Event, steps: Sequence[Callable[[], None]]) -> None:
    """Run each step every interval_s until `stop` is set. A step that raises is logged and runs again next time: a
    poller never dies."""
    while not stop.wait(interval_s):
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("llmrec serve: %s failed", getattr(step, "__name__", step))


class Reloader:
    """The replica's model: `state` (None until a first load) and why it is, or is not, the promoted version.

    Versions are downloaded into `cache` (deleted by `close`). Loads are serialised by a lock that the request
    path never takes: a batch reads `state` once."""

    def __init__(self, cfg: Config, registry: Registry, cache: Path):
        self.cfg, self.registry, self.cache = cfg, registry, cache
        self.state: Optional[Loaded] = None  # swapped as one reference
        self._lock = threading.Lock()  # serialises loads (poller vs reconfigure vs shutdown)
        # The fields GET /v1/model reports together change as one step under this lock, and info() reads them under
        # it: held only to assign or read them, never across I/O, so the request threads that read it never wait.
        self._view = threading.Lock()
        self._stop = threading.Event()
        self.pinned: Optional[str] = None
        self.reloads = self.failed_loads = 0
        self.last_error: Optional[dict] = None  # the latest refused load, for clients; cleared by a successful load
        # The version last refused: {"version", "pointer" (the pointer's etag then), "attempts", "retry_at", "error"}.
        # Not tried again before retry_at unless the pointer is written again.
        self.refused: Optional[dict] = None
        self.promoted: Optional[str] = None  # the version the pointer named when last read
        self.promoted_checked_at: Optional[float] = None
        self.pointer_error: Optional[str] = None  # why the pointer could not be read, if it could not
        self.lineage: list[str] = []
        self.loaded_at: Optional[float] = None
        self.grown_catalog: Optional[str] = None  # the catalogue version `state` holds every item of (None: not yet)

    def close(self) -> None:
        """Stop polling and delete the downloaded versions (after a download in progress, for at most 10 s)."""
        self._stop.set()
        held = self._lock.acquire(timeout=10)
        try:
            shutil.rmtree(self.cache, ignore_errors=True)
        finally:
            if held:
                self._lock.release()

    def _public(self, text: str) -> str:
        store = self.registry.store
        return without_paths(text, [str(self.cache), store.root, store.uri])[:1000]

    def _try_load(self, version: str, prefix: str, lineage: list[str], pointer: Optional[str] = None) -> bool:
        with self._lock:
            if self._stop.is_set():
                return False
            cur = self.state.version if self.state else None
            if version == cur:
                return True
            t0 = time.time()
            try:
                state = load_version(self.registry.store, prefix, version, self.cache, self.cfg.serve.quantize,
                                     registry=self.registry)
                warm_up(state)
            except Exception as exc:  # refused: the old model keeps serving
                self._refuse(version, pointer, cur, exc)
                return False
            state, grown_catalog = self._grow(state)  # the catalogue may have grown since the version was registered
            with self._view:  # info() never sees the new version with the old lineage or with its own refused load
                self.state, self.grown_catalog = state, grown_catalog  # the swap: one reference (the second is for info)
                self.reloads += 1
                self.lineage, self.loaded_at, self.last_error = lineage, time.time(), None
                if self.refused and self.refused["version"] == version:
                    self.refused = None
            log.info("llmrec serve: now serving %s (was %s; load %.2f s)", version, cur, time.time() - t0)
            if cur and cur != version:
                shutil.rmtree(self.cache / cur, ignore_errors=True)
            return True

    def _refuse(self, version: str, pointer: Optional[str], serving: Optional[str], exc: Exception) -> None:
        s = self.cfg.serve
        shutil.rmtree(self.cache / version, ignore_errors=True)
        r = self.refused
        attempts = r["attempts"] + 1 if r and r["version"] == version and r["pointer"] == pointer else 1
        backoff = min(s.reload_backoff_max_s, s.reload_backoff_s * 2 ** (attempts - 1))
        error = self._public(f"could not load {version}: {type(exc).__name__}: {exc}")
        with self._view:
            self.failed_loads += 1
            self.refused = {"version": version, "pointer": pointer, "attempts": attempts,
                            "retry_at": time.time() + backoff, "error": error}
            self.last_error = {"version": version, "error": error, "at": time.time()}
        log.error("llmrec serve: refusing model %s (still serving %s; retried when re-promoted or in %.0f s)",
                  version, serving, backoff, exc_info=exc)

    def poll_once(self) -> None:
        """Read the pointer (also while pinned, for GET /v1/model); load what it names unless pinned or refused."""
        try:
            got = self.registry.promoted()
        except Exception as exc:
            error = self._public(f"the promoted pointer could not be read: {type(exc).__name__}: {exc}")
            with self._view:
                self.pointer_error = error
            log.warning("llmrec serve: reading %s: %s", PROMOTED_KEY, exc)
            return
        ptr = got.value if got else {}
        with self._view:
            self.pointer_error = None
            version = self.promoted = ptr.get("version")
            self.promoted_checked_at = time.time()
        if self.pinned or not version or (self.state and version == self.state.version):
            return
        pointer = got.etag or str(ptr.get("updated_at"))  # changes whenever the pointer is written, even to the same name
        r = self.refused
        if r and r["version"] == version and r["pointer"] == pointer and time.time() < r["retry_at"]:
            return  # refused: tried again once re-promoted (the pointer is rewritten) or after the backoff
        self._try_load(version, ptr.get("model_prefix") or model_prefix(version), list(ptr.get("history") or []), pointer)

    def _grow(self, state: Loaded) -> tuple[Loaded, Optional[str]]:
        """(the state to serve, the catalogue version it holds every item of): `state` with the catalogue's items it
        lacks added to its item index (in place) and to its tables (a new Loaded). On a failure, or without a
        catalogue or anything to grow: (`state` as far as it got, None) -- logged, the next poll tries again. Under
        self._lock: add_items takes one thread at a time."""
        store = self.registry.store
        if not follows_catalog(state):
            return state, None
        try:
            version = catalog_version(store)
            if version is None:
                return state, None
            t0 = time.time()
            catalog = load_catalog(store, TEXT_COLUMNS, version)
            indexed = grow_index(state.index, catalog) if state.index is not None else []
            grown = grow_tables(state, catalog)
        except Exception:  # the version keeps serving as it is; the next poll tries again
            log.exception("llmrec serve: could not add the catalogue's new items to %s (it keeps serving its %s items)",
                          state.version, len(state.model.vocab) if state.model.is_hybrid else "indexed")
            return state, None
        if indexed or grown:
            log.info("llmrec serve: %s: %d new item(s) in its item index, %d in its tables at catalogue version %s "
                     "(%.2f s)", state.version, len(indexed),
                     len(grown.model.vocab) - len(state.model.vocab) if grown else 0, version, time.time() - t0)
        return grown or state, version

    def follow_catalog(self) -> None:
        """Grow the served version when the catalogue version changed since it was last grown (one listing when not)."""
        state = self.state
        if state is None or not follows_catalog(state) or catalog_version(self.registry.store) == self.grown_catalog:
            return
        with self._lock:
            if self.state is not state or self._stop.is_set():  # a new version was loaded (and grown) meanwhile
                return
            grown, version = self._grow(state)
            with self._view:
                self.state = grown  # one reference: a batch reads the old version or the grown one, whole
                if version is not None:  # else it failed (logged): the state holds grown_catalog; next poll retries
                    self.grown_catalog = version

    def poll_forever(self) -> None:
        """poll_once and follow_catalog every serve.poll_interval_s until close()."""
        run_every(self.cfg.serve.poll_interval_s, self._stop, [self.poll_once, self.follow_catalog])

    def pin(self, version: Optional[str]) -> None:
        """Serve `version` whatever is promoted; None: follow the pointer again."""
        with self._view:
            self.pinned = version
            if self.refused:  # an operator's change: a refused version may be tried again at once
                self.refused["retry_at"] = 0.0
        if version:
            self._try_load(version, model_prefix(version), [version])
        else:
            self.poll_once()

    def info(self) -> dict:
        """GET /v1/model (schemas.ModelInfo): one consistent view (see _view)."""
        with self._view:
            return self._info()

    def _info(self) -> dict:
        state = self.state
        served = state.version if state else None
        in_sync = served is not None and served == self.promoted
        index = state.index if state else None
        return {"version": served, "promoted_version": self.promoted, "in_sync": in_sync, "reason": self._reason(served),
                "pinned_version": self.pinned, "lineage": self.lineage, "loaded_at": self.loaded_at,
                "promoted_checked_at": self.promoted_checked_at, "reloads": self.reloads,
                "failed_loads": self.failed_loads, "last_load_error": self.last_error,
                "index_items": None if index is None else len(index),
                "table_items": len(state.model.vocab) if state and state.model.is_hybrid else None,
                "index_catalog_version": self.grown_catalog}

    def _reason(self, served: Optional[str]) -> Optional[str]:
        """Why the served version is not the promoted one, in one line (None: they agree)."""
        promoted, r = self.promoted, self.refused
        if self.pointer_error:
            return self.pointer_error
        if served is not None and served == promoted:
            return None
        if self.pinned:
            return f"pinned to {self.pinned} (user_config pinned_version): the promoted pointer is not followed"
        if promoted is None:
            return "nothing is promoted yet"
        if r and r["version"] == promoted:
            return (f"{promoted} was refused ({r['attempts']} attempt(s)): {r['error']}; tried again when it is promoted "
                    f"again, else in {max(0.0, r['retry_at'] - time.time()):.0f} s")
        return f"{promoted} is loading or not seen yet (the pointer is read every {self.cfg.serve.poll_interval_s:g} s)"
