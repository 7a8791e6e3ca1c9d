"""Ray Serve application: a FastAPI ingress + a batched Scorer that hot-swaps the promoted model.

    serve run llmrec_ray.serve:app_builder config_path=cfg.yaml      # or KubeRay serveConfigV2 import_path
    llmrec serve --config cfg.yaml                                    # run_serve(cfg, blocking=True)

Endpoints: POST /v1/score, POST /v1/recommend, GET /v1/model, GET /healthz, GET /metrics (Prometheus text), /docs.

Hot reload: every Scorer replica polls `registry/promoted.json` every `serve.poll_interval_s` in a background
thread, downloads and loads a new version fully off the request path, then swaps ONE reference
(`self._state`); each batch reads `self._state` once, so a batch never mixes versions and no request fails.
A version that fails to load is refused (the old one keeps serving); the error shows in the logs, in
GET /v1/model and in the `llmrec_failed_loads_total` metric. `reconfigure({"pinned_version": "v0002"})`
(a declarative `user_config` change) pins a version; `{"pinned_version": null}` follows the pointer again.
"""



import asyncio
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from llmrec_ray.config import Config, config_from_dict, load_config

log = logging.getLogger("llmrec.serve")

APP_NAME = "llmrec"
PROMOTED_KEY = "registry/promoted.json"


# --- request / response models -------------------------------------------------------------------------
class HistoryItem(BaseModel):
    item_id: Optional[str] = None
    text: Optional[str] = None
    rating: Optional[float] = None


class Candidate(BaseModel):
    item_id: Optional[str] = None
    text: Optional[str] = None


class GenrePool(BaseModel):
    genre: str


class ScoreRequest(BaseModel):
    history: list[Union[HistoryItem, str]] = Field(default_factory=list, description="most recent first; item ids or {item_id|text, rating}")
    candidates: list[Union[Candidate, str]] = Field(..., description="item ids or {item_id|text}")


class ScoreResponse(BaseModel):
    model_version: str
    scores: list[dict[str, Any]]  # [{"item_id"|"text", "probability"}] in request order


class RecommendRequest(BaseModel):
    history: list[Union[HistoryItem, str]] = Field(default_factory=list)
    pool: Union[Literal["all"], GenrePool, list[str]] = "all"
    k: int = Field(10, ge=1)
    exclude_history: bool = True


class RecommendResponse(BaseModel):
    model_version: str
    items: list[dict[str, Any]]  # [{"item_id", "title", "probability"}], best first


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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


def _forward(state: Loaded, encoded: list[dict]) -> list[float]:
    """P(like) for the concatenated rows of several requests' inputs, in order."""
    import numpy as np
    import torch

    batch = {k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]}
    with torch.inference_mode():
        logits = state.model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        return torch.sigmoid(logits.float()).reshape(-1).tolist()


def _warm_up(state: Loaded) -> None:
    """Score a known and an unknown item once: a broken version fails here, never on a request."""
    known = state.model.vocab.ids[:1] if state.model.vocab is not None else []
    ids = [*known, None]
    _forward(state, [_encode(state, ScoreItem(["warm up"] * len(ids), "no history", ids, list(known),
                                              [float("nan")] * len(known)))])


@serve.deployment(name="Scorer", max_ongoing_requests=256)
class Scorer:
    def __init__(self, cfg_dict: dict):
        from llmrec_ray.store import Store

        self.cfg = config_from_dict(cfg_dict)
        self.store = Store.from_config(self.cfg.store)
        self.cache = Path(tempfile.mkdtemp(prefix="llmrec-serve-"))
        self._state: Optional[Loaded] = None  # swapped as one reference
        self._lock = threading.Lock()  # serialises loads (poller vs reconfigure), never taken on the request path
        self.pinned: Optional[str] = None
        self.reloads = 0
        self.failed_loads = 0
        self.last_error: Optional[dict] = None
        self.failed_version: Optional[str] = None
        self.lineage: list[str] = []
        self.loaded_at: Optional[float] = None
        self.score_batch.set_max_batch_size(self.cfg.serve.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)
        import torch

        torch.set_num_threads(max(1, int(self.cfg.serve.num_cpus_per_replica)))
        self._poll_once()  # first load synchronously (replica is not ready before it)
        self._stop = threading.Event()
        threading.Thread(target=self._poll_loop, daemon=True, name="llmrec-poller").start()

    # --- loading ---
    def _try_load(self, version: str, prefix: str, lineage: list[str]) -> bool:
        with self._lock:
            cur = self._state.version if self._state else None
            if version == cur:
                return True
            t0 = time.time()
            try:
                state = _load_version(self.store, prefix, version, self.cache)
                _warm_up(state)
            except Exception as exc:  # refused: the old model keeps serving
                self.failed_loads += 1
                self.failed_version = version
                self.last_error = {"version": version, "error": f"{type(exc).__name__}: {exc}"[:2000], "at": time.time()}
                log.error("llmrec serve: refusing model %s (still serving %s): %s", version, cur, exc)
                return False
            self._state = state  # the swap: one reference
            self.reloads += 1
            self.lineage = lineage
            self.loaded_at = time.time()
            log.info("llmrec serve: now serving %s (was %s; load %.2f s)", version, cur, time.time() - t0)
            if cur and cur != version:
                shutil.rmtree(self.cache / cur, ignore_errors=True)
            return True

    def _poll_once(self) -> None:
        if self.pinned:
            return
        try:
            ptr = self.store.read_json(PROMOTED_KEY).value
        except Exception as exc:
            self.last_error = {"version": None, "error": f"reading {PROMOTED_KEY}: {type(exc).__name__}: {exc}", "at": time.time()}
            log.warning("llmrec serve: %s", self.last_error["error"])
            return
        if not ptr or not ptr.get("version"):
            return
        version = ptr["version"]
        if self._state and version == self._state.version:
            return
        if version == self.failed_version:
            return  # already refused; wait for the pointer to change
        prefix = ptr.get("model_prefix") or f"registry/versions/{version}/model"
        self._try_load(version, prefix, list(ptr.get("history") or []))

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.cfg.serve.poll_interval_s):
            try:
                self._poll_once()
            except Exception:  # never let the poller die
                log.exception("llmrec serve: poll failed")

    def reconfigure(self, user_config: dict) -> None:
        pinned = (user_config or {}).get("pinned_version")
        self.pinned = pinned
        if pinned:
            self.failed_version = None
            self._try_load(pinned, f"registry/versions/{pinned}/model", [pinned])
        else:
            self.failed_version = None
            self._poll_once()

    # --- scoring ---
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[ScoreItem]) -> list[dict]:
        state = self._state  # read ONCE per batch: model, tables and tokenizer of one version
        if state is None:
            return [{"error": "no model loaded yet"} for _ in requests]
        return await asyncio.to_thread(self._score_sync, state, requests)

    @staticmethod
    def _score_sync(state: Loaded, requests: list[ScoreItem]) -> list[dict]:
        out: list[dict] = [{} for _ in requests]
        encoded, good = [], []
        for i, item in enumerate(requests):  # encode per request: one bad input fails alone
            try:
                encoded.append(_encode(state, item))
                good.append(i)
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                log.warning("llmrec serve: request input refused: %s: %s", type(exc).__name__, exc)
                out[i] = {"error": f"input cannot be encoded: {type(exc).__name__}", "status": 422}
        if encoded:
            probs = _forward(state, encoded)
            at = 0
            for i, enc in zip(good, encoded):
                n = len(enc["input_ids"])
                out[i] = {"probs": probs[at:at + n], "version": state.version}
                at += n
        return out

    async def score(self, item: ScoreItem) -> dict:
        return await self.score_batch(item)

    def info(self) -> dict:
        state = self._state
        return {"version": state.version if state else None, "pinned_version": self.pinned, "lineage": self.lineage,
                "loaded_at": self.loaded_at, "reloads": self.reloads, "failed_loads": self.failed_loads,
                "last_load_error": self.last_error}

    def check_health(self) -> None:
        if self._state is None:
            raise RuntimeError("no model loaded")


# --- HTTP ingress ------------------------------------------------------------------------------------------
fastapi_app = FastAPI(title="llmrec-ray", description="LLM-backbone recommender on Ray Serve, hot-swapping the promoted model")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_handler(request: Request, exc: RequestValidationError):
    return _error(422, "invalid request: " + _explain(exc.errors()))


def _explain(errors) -> str:
    problems = []
    for e in list(errors)[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        problems.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(problems)


def _body_doc(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


@serve.deployment(name="Api", max_ongoing_requests=512)
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
        if not candidates:
            raise ClientError(422, "candidates: give at least one")
        if len(candidates) > s.max_candidates:
            raise ClientError(422, f"candidates has {len(candidates)} items; serve.max_candidates={s.max_candidates}")
        texts, keys = [], []
        for i, c in enumerate(candidates):
            if isinstance(c, str):
                c = Candidate(item_id=c)
            texts.append(self._text_of("candidates", i, c.item_id, c.text, self.texts))
            keys.append({"item_id": c.item_id} if c.item_id is not None else {"text": c.text})
        return texts, keys, [c.item_id if not isinstance(c, str) else c for c in candidates]

    async def _score(self, texts: list[str], cand_ids: list[Optional[str]], history: tuple) -> dict:
        hist_text, hist_ids, hist_ratings = history
        res = await self.scorer.score.remote(ScoreItem(texts, hist_text, cand_ids, hist_ids, hist_ratings))
        if "error" in res:
            raise ClientError(res.get("status", 503), res["error"])
        return res

    # --- routes ---
    # --- request plumbing: auth, size, JSON, validation, counting (per replica, on self) ---
    def _auth(self, request: Request) -> None:
        if self.auth_token:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.auth_token}".encode()):
                raise ClientError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def _parse(self, request: Request, model):
        limit = self.cfg.serve.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ClientError(413, f"request body is {length} bytes; serve.max_body_bytes={limit}")
        body = await request.body()
        if len(body) > limit:
            raise ClientError(413, f"request body is {len(body)} bytes; serve.max_body_bytes={limit}")
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientError(400, f"body is not valid JSON: {exc}") from None
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise ClientError(422, "invalid request: " + _explain(exc.errors())) from None

    async def _handle(self, request: Request, fn, *args, auth: bool = True):
        path = request.url.path
        self.requests[path] += 1
        try:
            if auth:
                self._auth(request)
            return await fn(*args)
        except ClientError as exc:
            self.failures[(path, exc.status)] += 1
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return JSONResponse(status_code=exc.status, content={"error": exc.message}, headers=headers)
        except Exception as exc:  # never a traceback to the client
            log.exception("llmrec serve: internal error on %s", path)
            self.failures[(path, 500)] += 1
            return _error(500, f"internal error: {type(exc).__name__}")

    # --- routes ---
    @fastapi_app.post("/v1/score", response_model=ScoreResponse, openapi_extra=_body_doc(ScoreRequest))
    async def score(self, request: Request):
        async def go():
            return await self._do_score(await self._parse(request, ScoreRequest))
        return await self._handle(request, go)

    @fastapi_app.post("/v1/recommend", response_model=RecommendResponse, openapi_extra=_body_doc(RecommendRequest))
    async def recommend(self, request: Request):
        async def go():
            return await self._do_recommend(await self._parse(request, RecommendRequest))
        return await self._handle(request, go)

    async def _do_score(self, req: ScoreRequest) -> ScoreResponse:
        history = self._history(req.history)
        texts, keys, ids = self._candidates(req.candidates)
        res = await self._score(texts, ids, history)
        return ScoreResponse(model_version=res["version"],
                             scores=[{**k, "probability": p} for k, p in zip(keys, res["probs"])])

    async def _do_recommend(self, req: RecommendRequest) -> RecommendResponse:
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
        if len(pool) > s.max_candidates:
            raise ClientError(422, f"pool has {len(pool)} items; serve.max_candidates={s.max_candidates} "
                                   "(narrow it with a genre or an id list)")
        if req.k > s.max_candidates:
            raise ClientError(422, f"k={req.k}; serve.max_candidates={s.max_candidates}")
        if not pool:
            raise ClientError(422, "pool: no candidates left after excluding the history")
        res = await self._score([self.texts[i] for i in pool], list(pool), history)
        ranked = sorted(zip(pool, res["probs"]), key=lambda t: -t[1])[:req.k]
        return RecommendResponse(model_version=res["version"],
                                 items=[{"item_id": i, "title": self.titles[i], "probability": p} for i, p in ranked])

    @fastapi_app.get("/v1/model")
    async def model_info(self, request: Request):
        async def go():
            return await self.scorer.info.remote()
        return await self._handle(request, go)

    @fastapi_app.get("/healthz")
    async def healthz(self, request: Request):
        async def go():
            info = await self.scorer.info.remote()
            if not info.get("version"):
                raise ClientError(503, "no model loaded")
            return {"status": "ok", "version": info["version"]}
        return await self._handle(request, go, auth=False)

    @fastapi_app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self, request: Request):
        return await self._handle(request, self._metrics_text)

    async def _metrics_text(self):
        info = await self.scorer.info.remote()
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
                  "# HELP llmrec_model_info The version being served", "# TYPE llmrec_model_info gauge",
                  f'llmrec_model_info{{version="{info["version"]}"}} 1']
        return PlainTextResponse("\n".join(lines) + "\n")


# --- building / running --------------------------------------------------------------------------------------
class AppArgs(BaseModel):
    config_path: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)


def _replica_options(cfg: Config) -> dict:
    s = cfg.serve
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica}}
    if s.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                      "target_ongoing_requests": s.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def build_app(cfg: Config, pinned_version: Optional[str] = None, max_batch_size: Optional[int] = None) -> serve.Application:
    if max_batch_size is not None:
        d = cfg.to_dict()
        d["serve"]["max_batch_size"] = max_batch_size
        cfg = config_from_dict(d)
    cfg_dict = cfg.to_dict()
    scorer = Scorer.options(**_replica_options(cfg), user_config={"pinned_version": pinned_version}).bind(cfg_dict)
    token = os.environ.get(cfg.serve.auth_token_env) or None
    return Api.options(ray_actor_options={"num_cpus": 0.1}).bind(scorer, cfg_dict, token)


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
