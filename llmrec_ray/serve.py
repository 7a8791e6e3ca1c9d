"""Ray Serve application: a FastAPI ingress + a batched Scorer that hot-swaps the promoted model.

    serve run llmrec_ray.serve:app_builder config_path=cfg.yaml      # or KubeRay serveConfigV2 import_path
    llmrec serve --config cfg.yaml                                    # run_serve(cfg, blocking=True)

Endpoints: POST /v1/score, POST /v1/recommend, GET /v1/model, GET /healthz, GET /metrics (Prometheus text), /docs,
/openapi.json (every request and response schema, the 4xx answers and the bearer scheme).

A request's way in; each step answers {"error": ...} before the next one costs anything:
  1. `_RequestGuard` (plain ASGI, on the raw bytes): body size (413) and JSON nesting depth (400), before parsing.
  2. FastAPI: JSON, the bearer token (401), then the pydantic models (422 naming the field, e.g. `candidates[2].text`):
     unknown fields, non-finite numbers, text holding a lone surrogate or another code point no text should hold.
  3. Api: catalogue lookups and per-request limits (422), then the Scorer through a bounded queue (503 with
     Retry-After when full) under a deadline (504 after serve.request_timeout_s).
  4. Scorer (`@serve.batch`): each request is checked and encoded on its own, so a bad input fails alone (422) and
     never its batch-mates; forwards run serve.forward_rows rows at a time and skip requests past their deadline.

Hot reload: every Scorer replica polls `registry/promoted.json` every `serve.poll_interval_s` in a background
thread, downloads and loads a new version fully off the request path, then swaps ONE reference
(`self._state`); each batch reads `self._state` once, so a batch never mixes versions and no request fails.
A version that fails to load is refused (the old one keeps serving); the error shows in the logs, in
GET /v1/model (without server paths) and in the `llmrec_model_failed_loads_total` metric. A refused version is
tried again as soon as the pointer is written again (re-promoted after a repair: its etag changes), else after
serve.reload_backoff_s, doubling up to serve.reload_backoff_max_s. GET /v1/model says which version is served,
which is promoted and, when they differ, why. `reconfigure({"pinned_version": "v0002"})` (a declarative
`user_config` change) pins a version; `{"pinned_version": null}` follows the pointer again. A replica deletes its
downloaded versions when it shuts down.
"""

import asyncio
import hmac
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmrec_ray.config import Config, ServeConfig, config_from_dict, load_config

log = logging.getLogger("llmrec.serve")

APP_NAME = "llmrec"
PROMOTED_KEY = "registry/promoted.json"


# --- text that may reach the model -------------------------------------------------------------------------
# Lone UTF-16 surrogates are valid JSON ("\ud800") but no encoder takes them (the tokenizer raised, and so would
# the JSON encoder of an error echoing them); noncharacters and control characters other than tab and newlines
# are what broken encoders produce, never item text.
_NONCHARACTERS = "".join(chr(plane * 0x10000 + 0xFFFE) + chr(plane * 0x10000 + 0xFFFF) for plane in range(17))
_BAD_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef" + _NONCHARACTERS + "]")


def _clean_text(value: str) -> str:
    """NFC-normalised `value`, or ValueError naming the first code point no text should hold."""
    bad = _BAD_CHARACTER.search(value)
    if bad:
        ch = bad.group()
        kind = ("a lone UTF-16 surrogate" if "\ud800" <= ch <= "\udfff"
                else "a control character" if unicodedata.category(ch) == "Cc" else "a Unicode noncharacter")
        raise ValueError(f"holds U+{ord(ch):04X} ({kind}) at character {bad.start()}; send valid Unicode text")
    return unicodedata.normalize("NFC", value)


Text = Annotated[str, AfterValidator(_clean_text)]
Key = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_clean_text)]  # an item id or a genre


def _json_kind(value: Any) -> str:
    """The union branch a JSON value belongs to: one branch is validated, so an error names one clear problem."""
    if isinstance(value, (dict, BaseModel)):
        return "object"
    return "array" if isinstance(value, (list, tuple)) else "string"


def _entry_kind(value: Any) -> str:
    return "object" if isinstance(value, (dict, BaseModel)) else "string"


_UNION_TAGS = {"object", "array", "string"}  # dropped from error locations: `candidates[2].text`, not `...2.object.text`


# --- request / response models -------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("histroy") is a 422, never silently ignored


class HistoryItem(_Strict):
    """A past item of the user: a catalogue id or free text, with the rating if there was one."""
    item_id: Optional[Key] = None
    text: Optional[Text] = Field(None, description="free text (an item the catalogue lacks); at most serve.max_text_chars")
    rating: Optional[float] = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False,
                                    description="the user's rating; none: an implicit event")


class Candidate(_Strict):
    """An item to score: a catalogue id or free text."""
    item_id: Optional[Key] = None
    text: Optional[Text] = Field(None, description="free text (an item the catalogue lacks); at most serve.max_text_chars")


class GenrePool(_Strict):
    """Every catalogue item of one genre."""
    genre: Key


HistoryEntry = Annotated[Union[Annotated[HistoryItem, Tag("object")], Annotated[Key, Tag("string")]],
                         Discriminator(_entry_kind)]
CandidateEntry = Annotated[Union[Annotated[Candidate, Tag("object")], Annotated[Key, Tag("string")]],
                           Discriminator(_entry_kind)]
Pool = Annotated[Union[Annotated[Literal["all"], Tag("string")], Annotated[GenrePool, Tag("object")],
                       Annotated[list[Key], Tag("array")]], Discriminator(_json_kind)]


class ScoreRequest(_Strict):
    history: list[HistoryEntry] = Field(default_factory=list, description="most recent first: item ids or "
                                        "{item_id | text, rating}; at most serve.max_history")
    candidates: list[CandidateEntry] = Field(..., min_length=1, description="item ids or {item_id | text}; "
                                             "at most serve.max_candidates")


class RecommendRequest(_Strict):
    history: list[HistoryEntry] = Field(default_factory=list, description="most recent first: item ids or "
                                        "{item_id | text, rating}; at most serve.max_history")
    pool: Pool = Field("all", description='the items to rank: "all", {"genre": ...} or a list of item ids; '
                                          "at most serve.max_pool after excluding the history")
    k: int = Field(10, ge=1, description="items returned, best first; at most serve.max_pool")
    exclude_history: bool = True


class Score(BaseModel):
    item_id: Optional[str] = None
    text: Optional[str] = None
    probability: float


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[Score]  # in request order; each names its candidate as the request did (item_id or text)


class Recommendation(BaseModel):
    item_id: str
    title: str
    probability: float


class RecommendResponse(BaseModel):
    model_version: str
    items: list[Recommendation]  # best first


class ErrorResponse(BaseModel):
    error: str


class LoadError(BaseModel):
    version: Optional[str]
    error: str  # the exception type and message, without server paths (the replica log has the full traceback)
    at: float


class ModelInfo(BaseModel):
    version: Optional[str] = Field(description="the version this replica serves")
    promoted_version: Optional[str] = Field(description="the version registry/promoted.json names, as last read")
    in_sync: bool
    reason: Optional[str] = Field(description="why the served version is not the promoted one (null when in sync)")
    pinned_version: Optional[str]
    lineage: list[str]
    loaded_at: Optional[float]
    promoted_checked_at: Optional[float]
    reloads: int
    failed_loads: int
    last_load_error: Optional[LoadError] = Field(description="the latest refused load; cleared by a successful one")


class Health(BaseModel):
    status: str
    version: str


class ClientError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# --- model state -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """One version, both parts: swapped as ONE reference, so a request never sees the text part of one
    version with the collaborative tables of another."""
    model: Any  # llmrec_ray.model.HybridScorer (text part + tables + fusion)
    tokenizer: Any
    version: str
    cfg: Config  # the config the version was trained with (max_seq_len, like_threshold, history_len)


@dataclass
class ScoreItem:
    """One request's inputs for the Scorer: resolved texts plus the ids the collaborative part reads."""
    candidate_texts: list[str]
    history_text: str
    candidate_ids: list[Optional[str]]  # None: free text, scored from text alone
    history_ids: list[Optional[str]]  # most recent first
    history_ratings: list[float]  # NaN: no rating (an implicit event)
    deadline: float = float("inf")  # time.time() after which nobody waits for the answer (serve.request_timeout_s)


def _load_version(store, prefix: str, version: str, cache_root: Path) -> Loaded:
    """Download + load one export fully. Raises on any problem."""
    from llmrec_ray.model import load_export

    local = cache_root / version
    if local.exists():
        shutil.rmtree(local, ignore_errors=True)
    store.download_dir(prefix, local)
    model, tokenizer, mcfg = load_export(local)
    return Loaded(model, tokenizer, version, mcfg)


def _encode(state: Loaded, item: ScoreItem) -> dict:
    """One request's model inputs (numpy): a bad one fails alone, never its batch-mates."""
    from llmrec_ray.model import encode_inputs

    n = len(item.candidate_texts)
    return encode_inputs(state.tokenizer, state.model.vocab, state.cfg, item.candidate_texts, [item.history_text] * n,
                         item.candidate_ids, [item.history_ids] * n, [item.history_ratings] * n)


def _forward(state: Loaded, encoded: list[dict], deadlines: Optional[list[float]] = None,
             rows: int = 256) -> list[Optional[list[float]]]:
    """P(like) per request, for several requests' inputs run together `rows` rows per forward (activation memory
    stays bounded however many candidates a batch holds). A request past its deadline when its rows come up is
    skipped: None."""
    import torch

    sizes = [len(e["input_ids"]) for e in encoded]
    owner = np.repeat(np.arange(len(encoded)), sizes)
    batch = {k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]}
    due = np.asarray(deadlines if deadlines is not None else [np.inf] * len(encoded), np.float64)
    probs, done = np.zeros(len(owner)), np.zeros(len(owner), bool)
    for start in range(0, len(owner), rows):
        idx = np.arange(start, min(start + rows, len(owner)))
        idx = idx[due[owner[idx]] > time.time()]
        if not len(idx):
            continue
        with torch.inference_mode():
            logits = state.model(**{k: torch.from_numpy(v[idx]) for k, v in batch.items()})
            probs[idx] = torch.sigmoid(logits.float()).reshape(-1).numpy()
        done[idx] = True
    ends = np.cumsum(sizes)
    return [probs[e - n:e].tolist() if done[e - n:e].all() else None for n, e in zip(sizes, ends)]


def _warm_up(state: Loaded) -> None:
    """Score a known and an unknown item once: a broken version fails here, never on a request."""
    known = state.model.vocab.ids[:1] if state.model.vocab is not None else []
    ids = [*known, None]
    _forward(state, [_encode(state, ScoreItem(["warm up"] * len(ids), "no history", ids, list(known),
                                              [float("nan")] * len(known)))])


_PATH = re.compile(r"(?:[A-Za-z][\w+.-]*://[^\s'\"]+|(?<![\w.~])(?:/[^\s/'\"():,;]+){2,}/?)")


def _without_paths(text: str, roots: list[str]) -> str:
    """`text` with server paths and URIs cut to their last part (GET /v1/model is for clients, not for the layout
    of the server's disks): the known roots go first, then anything that looks like an absolute path or a URI."""
    for root in roots:
        text = text.replace(root.rstrip("/") + "/", "")
    return _PATH.sub(lambda m: ".../" + m.group().rstrip("/").rsplit("/", 1)[-1], text)


@serve.deployment(name="Scorer")  # max_ongoing_requests / max_queued_requests come from ServeConfig (_replica_options)
class Scorer:
    def __init__(self, cfg_dict: dict):
        from llmrec_ray.store import Store

        self.cfg = config_from_dict(cfg_dict)
        s = self.cfg.serve
        self.store = Store.from_config(self.cfg.store)
        if s.cache_dir:
            Path(s.cache_dir).mkdir(parents=True, exist_ok=True)
        self.cache = Path(tempfile.mkdtemp(prefix="llmrec-serve-", dir=s.cache_dir))  # removed by __del__
        self._state: Optional[Loaded] = None  # swapped as one reference
        self._lock = threading.Lock()  # serialises loads (poller vs reconfigure vs shutdown), never taken on the request path
        self._stop = threading.Event()
        self.pinned: Optional[str] = None
        self.reloads = 0
        self.failed_loads = 0
        self.last_error: Optional[dict] = None  # the latest refused load, for clients; cleared by a successful load
        # The version last refused: {"version", "pointer" (the pointer's etag then), "attempts", "retry_at", "error"}.
        # Not tried again before retry_at unless the pointer is written again.
        self.refused: Optional[dict] = None
        self.promoted: Optional[str] = None  # the version the pointer named when last read
        self.promoted_checked_at: Optional[float] = None
        self.pointer_error: Optional[str] = None  # why the pointer could not be read, if it could not
        self.lineage: list[str] = []
        self.loaded_at: Optional[float] = None
        self.score_batch.set_max_batch_size(s.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        import torch

        torch.set_num_threads(max(1, int(s.num_cpus_per_replica)))
        self._poll_once()  # first load synchronously (replica is not ready before it)
        threading.Thread(target=self._poll_loop, daemon=True, name="llmrec-poller").start()

    def __del__(self):
        """Ray Serve calls this when the replica shuts down: stop polling, delete the downloaded versions."""
        stop, cache, lock = getattr(self, "_stop", None), getattr(self, "cache", None), getattr(self, "_lock", None)
        if stop is not None:
            stop.set()
        if cache is None:
            return
        held = lock.acquire(timeout=10) if lock is not None else False  # let a download in progress finish first
        try:
            shutil.rmtree(cache, ignore_errors=True)
        finally:
            if held:
                lock.release()

    # --- loading ---
    def _public(self, text: str) -> str:
        return _without_paths(text, [str(self.cache), self.store.root, self.store.uri])[:1000]

    def _try_load(self, version: str, prefix: str, lineage: list[str], pointer: Optional[str] = None) -> bool:
        s = self.cfg.serve
        with self._lock:
            if self._stop.is_set():
                return False
            cur = self._state.version if self._state else None
            if version == cur:
                return True
            t0 = time.time()
            try:
                state = _load_version(self.store, prefix, version, self.cache)
                _warm_up(state)
            except Exception as exc:  # refused: the old model keeps serving
                self.failed_loads += 1
                shutil.rmtree(self.cache / version, ignore_errors=True)
                r = self.refused
                attempts = r["attempts"] + 1 if r and r["version"] == version and r["pointer"] == pointer else 1
                backoff = min(s.reload_backoff_max_s, s.reload_backoff_s * 2 ** (attempts - 1))
                error = self._public(f"could not load {version}: {type(exc).__name__}: {exc}")
                self.refused = {"version": version, "pointer": pointer, "attempts": attempts,
                                "retry_at": time.time() + backoff, "error": error}
                self.last_error = {"version": version, "error": error, "at": time.time()}
                log.error("llmrec serve: refusing model %s (still serving %s; retried when re-promoted or in %.0f s)",
                          version, cur, backoff, exc_info=True)
                return False
            self._state = state  # the swap: one reference
            self.reloads += 1
            self.lineage = lineage
            self.loaded_at = time.time()
            self.last_error = None
            if self.refused and self.refused["version"] == version:
                self.refused = None
            log.info("llmrec serve: now serving %s (was %s; load %.2f s)", version, cur, time.time() - t0)
            if cur and cur != version:
                shutil.rmtree(self.cache / cur, ignore_errors=True)
            return True

    def _poll_once(self) -> None:
        """Read the pointer (also while pinned, for GET /v1/model); load what it names unless pinned or refused."""
        try:
            got = self.store.read_json(PROMOTED_KEY)
        except Exception as exc:
            self.pointer_error = self._public(f"the promoted pointer could not be read: {type(exc).__name__}: {exc}")
            log.warning("llmrec serve: reading %s: %s", PROMOTED_KEY, exc)
            return
        ptr = got.value or {}
        self.pointer_error = None
        self.promoted, self.promoted_checked_at = ptr.get("version"), time.time()
        version = ptr.get("version")
        if self.pinned or not version or (self._state and version == self._state.version):
            return
        pointer = got.etag or str(ptr.get("updated_at"))  # changes whenever the pointer is written, even to the same name
        r = self.refused
        if r and r["version"] == version and r["pointer"] == pointer and time.time() < r["retry_at"]:
            return  # refused: tried again once re-promoted (the pointer is rewritten) or after the backoff
        prefix = ptr.get("model_prefix") or f"registry/versions/{version}/model"
        self._try_load(version, prefix, list(ptr.get("history") or []), pointer)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.cfg.serve.poll_interval_s):
            try:
                self._poll_once()
            except Exception:  # never let the poller die
                log.exception("llmrec serve: poll failed")

    def reconfigure(self, user_config: dict) -> None:
        pinned = (user_config or {}).get("pinned_version")
        self.pinned = pinned
        if self.refused:  # an operator's change: a refused version may be tried again at once
            self.refused["retry_at"] = 0.0
        if pinned:
            self._try_load(pinned, f"registry/versions/{pinned}/model", [pinned])
        else:
            self._poll_once()

    # --- scoring ---
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[ScoreItem]) -> list[dict]:
        state = self._state  # read ONCE per batch: model, tables and tokenizer of one version
        if state is None:
            return [{"error": "no model loaded yet", "status": 503} for _ in requests]
        return await asyncio.to_thread(self._score_sync, state, requests)

    def _score_sync(self, state: Loaded, requests: list[ScoreItem]) -> list[dict]:
        s = self.cfg.serve
        late = {"error": f"no answer within serve.request_timeout_s={s.request_timeout_s:g} s", "status": 504}
        out: list[dict] = [{} for _ in requests]
        encoded, good = [], []
        now = time.time()
        for i, item in enumerate(requests):  # check and encode per request: one bad input fails alone
            n = len(item.candidate_texts)
            tokens = n * state.cfg.model.max_seq_len
            if item.deadline <= now:
                out[i] = late
            elif tokens > s.max_request_tokens:
                out[i] = {"error": f"{n} candidates x {state.cfg.model.max_seq_len} tokens (model.max_seq_len) = {tokens} "
                                   f"tokens; serve.max_request_tokens={s.max_request_tokens}", "status": 422}
            else:
                try:
                    encoded.append(_encode(state, item))
                    good.append(i)
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    log.warning("llmrec serve: request input refused: %s: %s", type(exc).__name__, exc)
                    out[i] = {"error": f"input cannot be encoded: {type(exc).__name__}", "status": 422}
        if encoded:
            probs = _forward(state, encoded, [requests[i].deadline for i in good], s.forward_rows)
            for i, p in zip(good, probs):
                out[i] = {"probs": p, "version": state.version} if p is not None else late
        return out

    async def score(self, item: ScoreItem) -> dict:
        return await self.score_batch(item)

    def info(self) -> dict:
        state = self._state
        served = state.version if state else None
        return {"version": served, "promoted_version": self.promoted, "in_sync": served is not None and served == self.promoted,
                "reason": self._reason(served), "pinned_version": self.pinned, "lineage": self.lineage,
                "loaded_at": self.loaded_at, "promoted_checked_at": self.promoted_checked_at, "reloads": self.reloads,
                "failed_loads": self.failed_loads, "last_load_error": self.last_error}

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

    def check_health(self) -> None:
        if self._state is None:
            raise RuntimeError("no model loaded")


# --- HTTP ingress ------------------------------------------------------------------------------------------
fastapi_app = FastAPI(title="llmrec-ray", description="LLM-backbone recommender on Ray Serve, hot-swapping the "
                      "promoted model. Errors are {\"error\": \"...\"}; 422s name the field, e.g. candidates[2].text.")

_ROUTES = ("/v1/score", "/v1/recommend", "/v1/model", "/healthz", "/metrics")  # counted by path; anything else: "other"


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def _current_api() -> Optional["Api"]:
    """The Api instance of this replica (the object Ray Serve's class-based routes run on); None outside a replica."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not in a replica (an offline TestClient, the OpenAPI schema)
        return None


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { outside JSON strings, in a few vectorised passes over the raw bytes
    (the parser recurses once per level: this runs before it). Garbage in, a number out; the parser rejects it."""
    b = np.frombuffer(body, np.uint8)
    if not len(b):
        return 0
    idx = np.arange(len(b), dtype=np.int64)
    backslash = b == 0x5C
    run = idx - np.maximum.accumulate(np.where(backslash, -1, idx))  # backslashes ending at i (0 if b[i] is not one)
    escaped = np.concatenate(([False], run[:-1] % 2 == 1))  # an odd run of backslashes before it escapes a quote
    quote = (b == 0x22) & ~escaped
    inside = np.cumsum(quote) % 2 == 1  # from an opening quote up to (not including) its closing one
    step = (((b == 0x5B) | (b == 0x7B)) & ~inside).astype(np.int64) - (((b == 0x5D) | (b == 0x7D)) & ~inside)
    return int(np.cumsum(step).max(initial=0))


async def _read_body(scope, receive, limit: int) -> tuple[Optional[bytes], Optional[int]]:
    """(body, None); (None, size) when over `limit` (read no further); (None, None) when the client went away."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None, int(value)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, size
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


class _RequestGuard:
    """Plain ASGI middleware: refuses an oversized (413) or too deeply nested (400) body on its raw bytes, before
    FastAPI parses it, then replays the body; counts every answer by path and status for /metrics."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = _current_api()
        s = api.cfg.serve if api is not None else ServeConfig()
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        status = [500]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, size = await _read_body(scope, receive, s.max_body_bytes)
                refusal = None
                if size is not None:
                    refusal = _error(413, f"request body is {size} bytes or more; serve.max_body_bytes={s.max_body_bytes}")
                elif body is None:
                    return  # the client went away
                elif body.count(b"[") + body.count(b"{") > s.max_json_depth and json_depth(body) > s.max_json_depth:
                    refusal = _error(400, f"request body nests JSON deeper than serve.max_json_depth={s.max_json_depth}")
                if refusal is not None:
                    return await refusal(scope, receive, counted)
                receive = _replay(body, receive)
            await self.app(scope, receive, counted)
        finally:
            if api is not None:
                api.count(path if path in _ROUTES else "other", status[0])


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()  # after the body: wait for the disconnect as usual
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replayed


fastapi_app.add_middleware(_RequestGuard)


@fastapi_app.exception_handler(ClientError)
async def _client_error_handler(request: Request, exc: ClientError):
    return _error(exc.status, exc.message, exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_handler(request: Request, exc: RequestValidationError):
    return _error(422, "invalid request: " + _explain(exc.errors()))


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _where(loc) -> str:
    """('body', 'candidates', 2, 'object', 'text') -> 'candidates[2].text'."""
    out = ""
    for i, part in enumerate(loc):
        if (i == 0 and part == "body") or part in _UNION_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "body"


def _explain(errors) -> str:
    problems = []
    for e in list(errors)[:5]:
        if e.get("type") == "json_invalid":
            problems.append(f"body is not valid JSON: {(e.get('ctx') or {}).get('error', '')}")
        else:
            problems.append(f"{_where(e.get('loc', ()))}: {e.get('msg')}")
    return "; ".join(problems)


_ERROR_DOCS = {
    400: "the body nests JSON deeper than serve.max_json_depth",
    401: "missing or wrong bearer token (only when the server sets one: serve.auth_token_env)",
    413: "the body is larger than serve.max_body_bytes",
    422: "invalid request, the field named (e.g. candidates[2].text): not JSON, an unknown field, a non-finite "
         "number, text holding an invalid code point, an unknown item id, or a per-request limit of the serve config",
    503: "no model loaded yet, or the scorer's queue is full (serve.max_queued_requests): retry after Retry-After",
    504: "no answer within serve.request_timeout_s",
}


def _errors(*codes: int) -> dict:
    """`responses=` for a route: each error status with its {"error"} body and, where sent, its headers."""
    out: dict[int, dict] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": _ERROR_DOCS[code]}
        if code == 503:
            out[code]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                    "schema": {"type": "integer"}}}
        if code == 401:
            out[code]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


_bearer = HTTPBearer(auto_error=False, description="Required when the server sets the env var named by "
                     "serve.auth_token_env (default LLMREC_API_TOKEN): Authorization: Bearer <token>")


async def _require_token(credentials: Optional[HTTPAuthorizationCredentials] = Security(_bearer)) -> None:
    """A dependency, so it runs before the body is validated: a caller without the token learns nothing else."""
    api = _current_api()
    token = api.auth_token if api is not None else None
    if not token:
        return
    got = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(got.encode(), token.encode()):
        raise ClientError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})


async def _awaitable(response):
    return await response


# NOTE: serve.ingress copies fastapi_app (and the route methods below) when the class is decorated: whatever the
# routes use must be defined above this line.
@serve.deployment(name="Api")  # max_ongoing_requests / max_queued_requests come from ServeConfig (_api_options)
@serve.ingress(fastapi_app)
class Api:
    def __init__(self, scorer, cfg_dict: dict, auth_token: Optional[str] = None):
        import pandas as pd
        import pyarrow.parquet as pq

        from llmrec_ray.schema import CATALOG_KEY
        from llmrec_ray.store import Store
        from llmrec_ray.text import item_text

        self.scorer = scorer
        self.cfg: Config = config_from_dict(cfg_dict)
        self.auth_token = auth_token or None
        self.requests: Counter = Counter()
        self.failures: Counter = Counter()
        store = Store.from_config(self.cfg.store)
        with store.fs.open_input_file(store.fs_path(CATALOG_KEY)) as f:
            cat = pq.read_table(f).to_pandas()
        cat["item_id"] = cat["item_id"].astype(str)
        self.catalog = cat.set_index("item_id")
        self.titles = self.catalog["title"].to_dict()
        self.texts = {iid: item_text(r.title, r.genres, r.description) for iid, r in self.catalog.iterrows()}
        self.genres = {iid: set(str(g).split("|")) if isinstance(g, str) else set() for iid, g in self.catalog["genres"].items()}
        self._pd = pd

    def count(self, path: str, status: int) -> None:
        self.requests[path] += 1
        if status >= 400:
            self.failures[(path, status)] += 1

    # --- input handling ---
    def _history(self, history: list) -> tuple[str, list[Optional[str]], list[float]]:
        """(history text, item ids or None, ratings or NaN), most recent first."""
        from llmrec_ray.text import history_text

        s = self.cfg.serve
        if len(history) > s.max_history:
            raise ClientError(422, f"history has {len(history)} items; serve.max_history={s.max_history}")
        items, ids, ratings = [], [], []
        for i, h in enumerate(history):
            if isinstance(h, str):
                h = HistoryItem(item_id=h)
            items.append((self._text_of("history", i, h.item_id, h.text, self.titles), h.rating))
            ids.append(h.item_id)
            ratings.append(float("nan") if h.rating is None else float(h.rating))
        return history_text(items[: self.cfg.data.history_len]), ids, ratings

    def _text_of(self, field: str, i: int, item_id: Optional[str], text: Optional[str], known: dict) -> str:
        """`field[i]` as text: the catalogue's entry for item_id, or the (length-checked) free text."""
        if item_id is not None:
            if item_id not in known:
                raise ClientError(422, f"{field}[{i}].item_id: unknown item id {item_id!r}")
            return known[item_id]
        if text is not None:
            if len(text) > self.cfg.serve.max_text_chars:
                raise ClientError(422, f"{field}[{i}].text has {len(text)} characters; "
                                       f"serve.max_text_chars={self.cfg.serve.max_text_chars}")
            return text
        raise ClientError(422, f"{field}[{i}]: give item_id or text")

    def _candidates(self, candidates: list) -> tuple[list[str], list[dict], list[Optional[str]]]:
        s = self.cfg.serve
        if len(candidates) > s.max_candidates:
            raise ClientError(422, f"candidates has {len(candidates)} items; serve.max_candidates={s.max_candidates}")
        texts, keys, ids = [], [], []
        for i, c in enumerate(candidates):
            if isinstance(c, str):
                c = Candidate(item_id=c)
            texts.append(self._text_of("candidates", i, c.item_id, c.text, self.texts))
            keys.append({"item_id": c.item_id} if c.item_id is not None else {"text": c.text})
            ids.append(c.item_id)
        return texts, keys, ids

    async def _ask(self, response, deadline: float):
        """The Scorer's answer to one call, or the client's answer why not: 503 (queue full, with Retry-After), 504."""
        s = self.cfg.serve
        retry = {"Retry-After": str(s.retry_after_s)}
        try:
            return await asyncio.wait_for(_awaitable(response), timeout=max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            response.cancel()
            raise ClientError(504, f"no answer within serve.request_timeout_s={s.request_timeout_s:g} s") from None
        except BackPressureError:
            raise ClientError(503, f"the scorer is at capacity (serve.max_ongoing_requests={s.max_ongoing_requests} "
                                   f"per replica, serve.max_queued_requests={s.max_queued_requests} waiting); retry "
                                   f"after {s.retry_after_s} s", retry) from None
        except DeploymentUnavailableError:
            raise ClientError(503, "the scorer is not available (starting or failed); retry later", retry) from None

    async def _score(self, texts: list[str], cand_ids: list[Optional[str]], history: tuple, deadline: float) -> dict:
        hist_text, hist_ids, hist_ratings = history
        item = ScoreItem(texts, hist_text, cand_ids, hist_ids, hist_ratings, deadline)
        res = await self._ask(self.scorer.score.remote(item), deadline)
        if "error" in res:
            status = res.get("status", 503)
            raise ClientError(status, res["error"], {"Retry-After": str(self.cfg.serve.retry_after_s)} if status == 503 else None)
        return res

    async def _guarded(self, coro):
        """A route's work: client errors pass through, anything else is a 500 without a traceback."""
        try:
            return await coro
        except ClientError:
            raise
        except Exception as exc:
            log.exception("llmrec serve: internal error")
            raise ClientError(500, f"internal error: {type(exc).__name__}") from None

    def _deadline(self) -> float:
        return time.time() + self.cfg.serve.request_timeout_s

    # --- routes ---
    @fastapi_app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True,
                      responses=_errors(400, 401, 413, 422, 503, 504), dependencies=[Security(_require_token)])
    async def score(self, req: ScoreRequest):
        return await self._guarded(self._do_score(req, self._deadline()))

    @fastapi_app.post("/v1/recommend", response_model=RecommendResponse,
                      responses=_errors(400, 401, 413, 422, 503, 504), dependencies=[Security(_require_token)])
    async def recommend(self, req: RecommendRequest):
        return await self._guarded(self._do_recommend(req, self._deadline()))

    async def _do_score(self, req: ScoreRequest, deadline: float) -> ScoreResponse:
        history = self._history(req.history)
        texts, keys, ids = self._candidates(req.candidates)
        res = await self._score(texts, ids, history, deadline)
        return ScoreResponse(model_version=res["version"],
                             scores=[Score(**k, probability=p) for k, p in zip(keys, res["probs"])])

    async def _do_recommend(self, req: RecommendRequest, deadline: float) -> RecommendResponse:
        s = self.cfg.serve
        history = self._history(req.history)
        seen = {i for i in history[1] if i is not None}
        if req.pool == "all":
            pool = list(self.texts)
        elif isinstance(req.pool, GenrePool):
            pool = [iid for iid, g in self.genres.items() if req.pool.genre in g]
            if not pool:
                raise ClientError(422, f"pool.genre: no items with genre {req.pool.genre!r}")
        else:
            for i, iid in enumerate(req.pool):
                if iid not in self.texts:
                    raise ClientError(422, f"pool[{i}]: unknown item id {iid!r}")
            pool = list(dict.fromkeys(req.pool))
        if req.exclude_history:
            pool = [iid for iid in pool if iid not in seen]
        if len(pool) > s.max_pool:
            raise ClientError(422, f"pool has {len(pool)} items; serve.max_pool={s.max_pool} "
                                   "(narrow it with a genre or an id list)")
        if req.k > s.max_pool:
            raise ClientError(422, f"k={req.k}; serve.max_pool={s.max_pool}")
        if not pool:
            raise ClientError(422, "pool: no candidates left after excluding the history")
        res = await self._score([self.texts[i] for i in pool], list(pool), history, deadline)
        ranked = sorted(zip(pool, res["probs"]), key=lambda t: -t[1])[:req.k]
        return RecommendResponse(model_version=res["version"],
                                 items=[Recommendation(item_id=i, title=self.titles[i], probability=p) for i, p in ranked])

    @fastapi_app.get("/v1/model", response_model=ModelInfo, responses=_errors(401, 503, 504),
                     dependencies=[Security(_require_token)])
    async def model_info(self):
        return await self._guarded(self._ask(self.scorer.info.remote(), self._deadline()))

    @fastapi_app.get("/healthz", response_model=Health, responses=_errors(503, 504))
    async def healthz(self):
        async def go():
            info = await self._ask(self.scorer.info.remote(), self._deadline())
            if not info.get("version"):
                raise ClientError(503, "no model loaded", {"Retry-After": str(self.cfg.serve.retry_after_s)})
            return Health(status="ok", version=info["version"])
        return await self._guarded(go())

    @fastapi_app.get("/metrics", response_class=PlainTextResponse, responses=_errors(401, 503, 504),
                     dependencies=[Security(_require_token)])
    async def metrics(self):
        return await self._guarded(self._metrics_text())

    async def _metrics_text(self):
        info = await self._ask(self.scorer.info.remote(), self._deadline())
        lines = ["# HELP llmrec_requests_total HTTP requests by path (this ingress replica)",
                 "# TYPE llmrec_requests_total counter"]
        lines += [f'llmrec_requests_total{{path="{p}"}} {n}' for p, n in sorted(self.requests.items())]
        lines += ["# HELP llmrec_request_failures_total Failed HTTP requests by path and status",
                  "# TYPE llmrec_request_failures_total counter"]
        lines += [f'llmrec_request_failures_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in sorted(self.failures.items())]
        lines += ["# HELP llmrec_model_reloads_total Model versions loaded (one scorer replica)",
                  "# TYPE llmrec_model_reloads_total counter", f"llmrec_model_reloads_total {info['reloads']}",
                  "# HELP llmrec_model_failed_loads_total Model versions refused because they failed to load",
                  "# TYPE llmrec_model_failed_loads_total counter", f"llmrec_model_failed_loads_total {info['failed_loads']}",
                  "# HELP llmrec_model_in_sync 1 when the served version is the promoted one",
                  "# TYPE llmrec_model_in_sync gauge", f"llmrec_model_in_sync {int(info['in_sync'])}",
                  "# HELP llmrec_model_info The version being served", "# TYPE llmrec_model_info gauge",
                  f'llmrec_model_info{{version="{info["version"]}"}} 1']
        return PlainTextResponse("\n".join(lines) + "\n")


# --- building / running --------------------------------------------------------------------------------------
class AppArgs(BaseModel):
    config_path: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)


def _scorer_replicas(cfg: Config) -> int:
    s = cfg.serve
    return s.max_replicas if s.autoscaling else s.num_replicas


def _replica_options(cfg: Config) -> dict:
    """The Scorer: resources, replicas, and admission control (a bounded queue at each caller: 503 beyond it)."""
    s = cfg.serve
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
                            "max_ongoing_requests": s.max_ongoing_requests, "max_queued_requests": s.max_queued_requests}
    if s.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                      "target_ongoing_requests": s.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def _api_options(cfg: Config) -> dict:
    """The ingress holds what the Scorers accept and their queue (+16 for /healthz, /metrics, /v1/model); the HTTP
    proxy queues serve.max_queued_requests more and answers the rest 503 with Retry-After itself."""
    s = cfg.serve
    return {"ray_actor_options": {"num_cpus": 0.1},
            "max_ongoing_requests": _scorer_replicas(cfg) * s.max_ongoing_requests + s.max_queued_requests + 16,
            "max_queued_requests": s.max_queued_requests, "backpressure_config": {"retry_after_s": s.retry_after_s}}


def build_app(cfg: Config, pinned_version: Optional[str] = None, max_batch_size: Optional[int] = None) -> serve.Application:
    if max_batch_size is not None:
        d = cfg.to_dict()
        d["serve"]["max_batch_size"] = max_batch_size
        cfg = config_from_dict(d)
    cfg_dict = cfg.to_dict()
    scorer = Scorer.options(**_replica_options(cfg), user_config={"pinned_version": pinned_version}).bind(cfg_dict)
    token = os.environ.get(cfg.serve.auth_token_env) or None
    return Api.options(**_api_options(cfg)).bind(scorer, cfg_dict, token)


def app_builder(args: dict) -> serve.Application:
    """`serve run llmrec_ray.serve:app_builder config_path=... ` / KubeRay serveConfigV2 `import_path`."""
    a = AppArgs.model_validate(args or {})
    overrides = a.overrides
    if isinstance(overrides, str):  # pragma: no cover
        overrides = [overrides]
    return build_app(load_config(a.config_path, overrides))


def run_serve(cfg: Config, blocking: bool = True) -> None:
    """Start Serve's HTTP proxy on cfg.serve.host:port and run the app (blocking: until Ctrl-C)."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.serve.route_prefix, blocking=blocking)


def stop_serve(shutdown: bool = False) -> None:
    try:
        serve.delete(APP_NAME)
    finally:
        if shutdown:
            serve.shutdown()
