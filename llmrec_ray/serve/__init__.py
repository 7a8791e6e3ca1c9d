"""Ray Serve application: a FastAPI ingress + a batched Scorer that hot-swaps the promoted model.

    serve run llmrec_ray.serve:app_builder config_path=cfg.yaml      # or KubeRay serveConfigV2 import_path
    llmrec serve --config cfg.yaml                                    # run_serve(cfg, blocking=True)

Endpoints: POST /v1/score, POST /v1/recommend, GET /v1/model, GET /healthz, GET /metrics (Prometheus text), /docs,
/openapi.json (every request and response schema, the 4xx answers and the bearer scheme).

A request's way in; each step answers {"error": ...} before the next one costs anything:
  1. guard.py (plain ASGI, on the raw bytes): body size (413) and JSON nesting depth (400), before parsing.
  2. FastAPI: JSON, the bearer token (401), then the schemas.py models (422 naming the field, e.g.
     `candidates[2].text`): unknown fields, non-finite numbers, text holding a lone surrogate or another code point
     no text should hold.
  3. api.py: catalogue lookups and per-request limits (resolve.py, 422), then the Scorer through a bounded queue
     (503 with Retry-After when full) under a deadline (504 after serve.request_timeout_s).
  4. scorer.py (`@serve.batch`): each request is checked and encoded on its own (inference.py), so a bad input
     fails alone (422) and never its batch-mates; forwards run serve.forward_rows rows at a time and skip requests
     past their deadline.

Hot reload (reload.py): every Scorer replica polls the registry's promoted pointer every serve.poll_interval_s in a
background thread, loads a new version fully off the request path, then swaps ONE reference; a version that fails
to load is refused and retried when re-promoted or after a backoff. GET /v1/model says which version is served,
which is promoted and, when they differ, why.

Catalogue updates (llmrec_ray/catalog.py) need no reload: on the same interval the Api swaps in the newest catalogue
(api.py), so a new item is answerable (scored from its text) from the moment it is in the catalogue, and each Scorer
replica adds the items its version lacks to its item index and its collaborative tables (a row and a text vector,
reload.py). GET /v1/model says which catalogue version each follows (catalog_version, index_catalog_version).

Modules: schemas (bodies), guard (middleware, error answers), resolve (request -> Scorer input), api (routes),
inference (load, encode, forward), reload (pointer following), scorer (deployment), metrics, app (build and run).
Importing the package loads no torch: only Scorer replicas do (the ingress replica stays small).
"""

from llmrec_ray.serve.api import Api
from llmrec_ray.serve.app import APP_NAME, AppArgs, app_builder, build_app, run_serve, stop_serve
from llmrec_ray.serve.guard import json_depth
from llmrec_ray.serve.inference import Loaded, encode_item, forward, load_version, warm_up
from llmrec_ray.serve.schemas import RecommendRequest, ScoreItem, ScoreRequest
from llmrec_ray.serve.scorer import Scorer

_encode, _forward = encode_item, forward  # the names benchmarks/bench_serve.py imports

__all__ = ["APP_NAME", "Api", "AppArgs", "Loaded", "RecommendRequest", "ScoreItem", "ScoreRequest", "Scorer",
           "app_builder", "build_app", "encode_item", "forward", "json_depth", "load_version", "run_serve",
           "stop_serve", "warm_up"]
