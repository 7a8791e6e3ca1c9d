"""The Scorer deployment: batched scoring (`@serve.batch`) with the model that `Reloader` keeps current.

Each batch reads the replica's model once, so a batch never mixes versions and a swap fails no request.
`reconfigure({"pinned_version": "v0002"})` (a declarative `user_config` change) pins a version;
`{"pinned_version": null}` follows the pointer again. The replica deletes its downloads when it shuts down.
"""

import asyncio
import tempfile
import threading
from pathlib import Path

from ray import serve

from llmrec_ray.config import config_from_dict
from llmrec_ray.registry import Registry
from llmrec_ray.serve.inference import score_items
from llmrec_ray.serve.reload import Reloader
from llmrec_ray.serve.schemas import ScoreItem
from llmrec_ray.store import Store


@serve.deployment(name="Scorer")  # max_ongoing_requests / max_queued_requests come from ServeConfig (app.py)
class Scorer:
    def __init__(self, cfg_dict: dict):
        import torch  # here, not at the top: the ingress replica imports this module too and needs no torch

        self.cfg = config_from_dict(cfg_dict)
        s = self.cfg.serve
        if s.cache_dir:
            Path(s.cache_dir).mkdir(parents=True, exist_ok=True)
        cache = Path(tempfile.mkdtemp(prefix="llmrec-serve-", dir=s.cache_dir))  # removed by __del__
        self.models = Reloader(self.cfg, Registry(Store.from_config(self.cfg.store)), cache)
        self.score_batch.set_max_batch_size(s.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        torch.set_num_threads(max(1, int(s.num_cpus_per_replica)))
        self.models.poll_once()  # first load synchronously (replica is not ready before it)
        threading.Thread(target=self.models.poll_forever, daemon=True, name="llmrec-poller").start()

    def __del__(self):
        """Ray Serve calls this when the replica shuts down: stop polling, delete the downloaded versions."""
        models = getattr(self, "models", None)  # None: __init__ failed before it
        if models is not None:
            models.close()

    def reconfigure(self, user_config: dict) -> None:
        self.models.pin((user_config or {}).get("pinned_version"))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # both set from ServeConfig in __init__
    async def score_batch(self, requests: list[ScoreItem]) -> list[dict]:
        state = self.models.state  # read ONCE per batch: model, tables and tokenizer of one version
        if state is None:
            return [{"error": "no model loaded yet", "status": 503} for _ in requests]
        return await asyncio.to_thread(score_items, state, requests, self.cfg.serve)

    async def score(self, item: ScoreItem) -> dict:
        """{"probs", "version"} or {"error", "status"} for this request alone."""
        return await self.score_batch(item)

    def info(self) -> dict:
        return self.models.info()

    def check_health(self) -> None:
        if self.models.state is None:
            raise RuntimeError("no model loaded")
