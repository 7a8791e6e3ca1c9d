"""The HTTP ingress: FastAPI routes on the `Api` deployment, which resolves requests against the catalogue and
asks the Scorer through a bounded queue under a deadline.

Routes take the typed bodies of schemas.py; the bearer token is a dependency, so it is checked before the body.
A full Scorer queue, or more candidate rows pending than serve.max_pending_rows per Scorer replica (admission.py),
is a 503 with Retry-After; a missed deadline (serve.request_timeout_s) a 504.

The catalogue follows the store: a background thread reads the catalogue version every serve.poll_interval_s (one
listing) and, when it changed, reads the new version whole and swaps `self.catalog` as ONE reference; a request
reads that reference once, so it resolves against one version. A failed read is logged and the old catalogue keeps
serving. An item is answerable here from the moment it is in the catalogue: the Scorer scores an item its version
never saw from its text (reload.py adds it to the item index on its own poll).
"""

import asyncio
import hmac
import logging
import threading
import time
from typing import Optional

from fastapi import FastAPI, HTTPException, Response, Security
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from llmrec_ray.catalog import catalog_version
from llmrec_ray.config import Config, config_from_dict
from llmrec_ray.serve.guard import install as install_guard
from llmrec_ray.serve.admission import Admission, Overloaded, rows_to_score
from llmrec_ray.serve.metrics import IngressMetrics
from llmrec_ray.serve.reload import run_every
from llmrec_ray.serve.resolve import Catalog
from llmrec_ray.serve.schemas import (Health, ModelInfo, RecommendRequest, RecommendResponse, Recommendation, Score,
                                      ScoreItem, ScoreRequest, ScoreResponse, error_responses)
from llmrec_ray.store import Store

fastapi_app = FastAPI(title="llmrec-ray", description="LLM-backbone recommender on Ray Serve, hot-swapping the "
                      "promoted model. Errors are {\"error\": \"...\"}; 422s name the field, e.g. candidates[2].text.")

log = logging.getLogger("llmrec.serve")

ROUTES = ("/v1/score", "/v1/recommend", "/v1/model", "/healthz", "/metrics")  # counted by path; anything else: "other"


def _current_api() -> Optional["Api"]:
    """The Api instance of this replica (the object Ray Serve's class-based routes run on); None outside a replica."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not in a replica (an offline TestClient, the OpenAPI schema)
        return None


install_guard(fastapi_app, _current_api)

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
        raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            {"WWW-Authenticate": "Bearer"})


async def _awaitable(response):
    return await response


_TOKEN = [Security(_require_token)]


# NOTE: serve.ingress copies fastapi_app (and the route methods below) when the class is decorated: whatever the
# routes use must be defined above this line.
@serve.deployment(name="Api")  # max_ongoing_requests / max_queued_requests come from ServeConfig (app.py)
@serve.ingress(fastapi_app)
class Api:
    def __init__(self, scorer, cfg_dict: dict, auth_token: Optional[str] = None, scorer_replicas: int = 1):
        self.scorer = scorer
        self.cfg: Config = config_from_dict(cfg_dict)
        self.auth_token = auth_token or None
        self.metrics = IngressMetrics(ROUTES)
        self.store = Store.from_config(self.cfg.store)
        self.catalog = Catalog.read(self.store, self.cfg)  # swapped whole by _follow_catalog; read once per request
        self.admission = Admission(self.cfg.serve.max_pending_rows * scorer_replicas)
        self._stop = threading.Event()
        threading.Thread(target=run_every, args=(self.cfg.serve.poll_interval_s, self._stop, [self._follow_catalog]),
                         daemon=True, name="llmrec-catalog").start()

    def __del__(self):
        """Ray Serve calls this when the replica shuts down: stop following the catalogue."""
        stop = getattr(self, "_stop", None)  # None: __init__ failed before it
        if stop is not None:
            stop.set()

    def _follow_catalog(self) -> None:
        """A new catalogue version: read it whole, then swap. A failed read raises (run_every logs it) before the
        swap, so the old catalogue keeps serving."""
        version = catalog_version(self.store)
        old = self.catalog
        if version is not None and version != old.version:
            self.catalog = Catalog.read(self.store, self.cfg, version)
            log.info("llmrec serve: catalogue %s -> %s (%d -> %d items)", old.version, version, len(old.texts),
                     len(self.catalog.texts))

    def _deadline(self) -> float:
        return time.time() + self.cfg.serve.request_timeout_s

    async def _ask(self, response, deadline: float):
        """The Scorer's answer to one call, or the client's answer why not: 503 (queue full, with Retry-After), 504."""
        s = self.cfg.serve
        retry = {"Retry-After": str(s.retry_after_s)}
        try:
            return await asyncio.wait_for(_awaitable(response), timeout=max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            response.cancel()
            raise HTTPException(504, f"no answer within serve.request_timeout_s={s.request_timeout_s:g} s") from None
        except BackPressureError:
            raise HTTPException(503, f"the scorer is at capacity (serve.max_ongoing_requests={s.max_ongoing_requests} "
                                     f"per replica, serve.max_queued_requests={s.max_queued_requests} waiting); retry "
                                     f"after {s.retry_after_s} s", retry) from None
        except DeploymentUnavailableError:
            raise HTTPException(503, "the scorer is not available (starting or failed); retry later", retry) from None

    async def _score(self, item: ScoreItem) -> dict:
        try:
            with self.admission.hold(rows_to_score(len(item.candidate_texts), item.shortlist)):
                res = await self._ask(self.scorer.score.remote(item), item.deadline)
        except Overloaded as exc:
            s = self.cfg.serve
            raise HTTPException(503, f"the scorer is at capacity: {exc}; retry after {s.retry_after_s} s",
                                {"Retry-After": str(s.retry_after_s)}) from None
        if "error" in res:
            status = res.get("status", 503)
            retry = {"Retry-After": str(self.cfg.serve.retry_after_s)} if status == 503 else None
            raise HTTPException(status, res["error"], retry)
        return res

    @fastapi_app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True,
                      responses=error_responses(400, 401, 413, 422, 503, 504), dependencies=_TOKEN)
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        item, keys = self.catalog.score_item(req, self._deadline())  # one read of self.catalog
        res = await self._score(item)
        return ScoreResponse(model_version=res["version"],
                             scores=[Score(**k, probability=p) for k, p in zip(keys, res["probs"])])

    @fastapi_app.post("/v1/recommend", response_model=RecommendResponse,
                      responses=error_responses(400, 401, 413, 422, 503, 504), dependencies=_TOKEN)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        catalog = self.catalog  # once: the pool and the titles of the answer come from one catalogue version
        item, _ = catalog.recommend_item(req, self._deadline())
        item.shortlist = max(req.k, self.cfg.serve.rerank_n) if self.cfg.serve.rerank_n else None
        res = await self._score(item)
        ranked = sorted(zip(res["ids"], res["probs"]), key=lambda t: -t[1])[:req.k]
        return RecommendResponse(model_version=res["version"], items=[
            Recommendation(item_id=i, title=catalog.titles[i], probability=p) for i, p in ranked])

    @fastapi_app.get("/v1/model", response_model=ModelInfo, responses=error_responses(401, 503, 504), dependencies=_TOKEN)
    async def model_info(self) -> dict:
        info = await self._ask(self.scorer.info.remote(), self._deadline())
        return {**info, "catalog_version": self.catalog.version}

    @fastapi_app.get("/healthz", response_model=Health, responses=error_responses(503, 504))
    async def healthz(self) -> Health:
        info = await self._ask(self.scorer.info.remote(), self._deadline())
        if not info.get("version"):
            raise HTTPException(503, "no model loaded", {"Retry-After": str(self.cfg.serve.retry_after_s)})
        return Health(status="ok", version=info["version"])

    @fastapi_app.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401, 503, 504),
                     dependencies=_TOKEN)
    async def metrics_text(self) -> Response:
        info = await self._ask(self.scorer.info.remote(), self._deadline())
        return Response(self.metrics.render(info), media_type=CONTENT_TYPE_LATEST)
