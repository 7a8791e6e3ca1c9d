"""Building and running the Serve application: the Api ingress bound to the Scorer, sized from ServeConfig."""

import os
from typing import Any, Optional

from pydantic import BaseModel, Field
from ray import serve

from llmrec_ray.config import Config, config_from_dict, load_config
from llmrec_ray.serve.api import Api
from llmrec_ray.serve.scorer import Scorer

APP_NAME = "llmrec"


class AppArgs(BaseModel):
    """The args of `serve run llmrec_ray.serve:app_builder ...` / a serveConfigV2 application."""
    config_path: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)  # "section.key=value", as on the llmrec command line


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
    """The application: Api -> Scorer. The bearer token is read from the env var serve.auth_token_env names."""
    if max_batch_size is not None:
        d = cfg.to_dict()
        d["serve"]["max_batch_size"] = max_batch_size
        cfg = config_from_dict(d)
    cfg_dict = cfg.to_dict()
    scorer = Scorer.options(**_replica_options(cfg), user_config={"pinned_version": pinned_version}).bind(cfg_dict)
    token = os.environ.get(cfg.serve.auth_token_env) or None
    return Api.options(**_api_options(cfg)).bind(scorer, cfg_dict, token, _scorer_replicas(cfg))


def app_builder(args: dict) -> serve.Application:
    """`serve run llmrec_ray.serve:app_builder config_path=... ` / KubeRay serveConfigV2 `import_path`."""
    a = AppArgs.model_validate(args or {})
    return build_app(load_config(a.config_path, a.overrides))


def run_serve(cfg: Config, blocking: bool = True) -> None:
    """Start Serve's HTTP proxy on cfg.serve.host:port and run the app (blocking: until Ctrl-C)."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.serve.route_prefix, blocking=blocking)


def stop_serve(shutdown: bool = False) -> None:
    """Delete the app; shutdown: stop Serve too (its proxy and controller)."""
    try:
        serve.delete(APP_NAME)
    finally:
        if shutdown:
            serve.shutdown()
