"""Ray Serve app over real HTTP on 127.0.0.1: scoring, limits, auth, hot swap without failed requests, refused loads."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest
import requests

from llmrec_ray.registry import PROMOTED_KEY, model_prefix
from llmrec_ray.serve.schemas import ScoreRequest  # here: FastAPI resolves a route's (string) annotations in globals


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

POLL_S = 0.5


def _write_catalog(store):
    import pyarrow.parquet as pq

    from llmrec_ray.schema import CATALOG_KEY, CATALOG_SCHEMA

    n = 30
    genres = ["Comedy", "Drama|Romance", "Action|Thriller"]
    table = pa.table({
        "item_id": [str(i) for i in range(1, n + 1)],
        "title": [f"Movie {i} ({1990 + i % 10})" for i in range(1, n + 1)],
        "genres": [genres[i % 3] for i in range(1, n + 1)],
        "description": [None] * n,
        "year": pa.array([1990 + i % 10 for i in range(1, n + 1)], pa.int32()),
        "first_seen": pa.array([0] * n, pa.int64()),
    }, schema=CATALOG_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    store.write_bytes(CATALOG_KEY, buf.getvalue().to_pybytes())


def _write_export(store, cfg, version: str, bias: float, tmp_path, corrupt: bool = False, head: bool = True,
                  text: bool = False):
    """A hybrid export (text part + tables and a tree head over the catalogue's 30 items) whose parts all depend on
    `bias`, so a response computed from the text part of one version and the tables of another is recognisable.
    text=True: the tables hold the catalogue's text vectors (what makes a version grow with the catalogue)."""
    import torch

    from llmrec_ray.catalog import load_catalog
    from llmrec_ray.collab import HEAD_FEATURES, CollabNet, TreeHead
    from llmrec_ray.ids import ItemVocab
    from llmrec_ray.model import HybridScorer, build_model, fill_text_vectors, save_export, text_vector_dim
    from llmrec_ray.text import candidate_texts

    lm, tok = build_model(cfg.model)
    with torch.no_grad():
        lm.classifier.bias.fill_(bias)
    collab = CollabNet(30, cfg.model.collab.dim, text_dim=text_vector_dim(cfg.model) if text else 0)
    if text:
        fill_text_vectors(collab, ItemVocab(str(i) for i in range(1, 31)), candidate_texts(load_catalog(store)), cfg.model)
    with torch.no_grad():
        collab.mu.fill_(-2.0 * bias)
        collab.item_bias.weight[1:].fill_(0.3 * bias)
        collab.item_logcount[1:] = 1.0  # as a fit leaves it: every item had events (else it counts as unknown)
    if head:  # one stump on the history's size: the head (not the linear sum) scores, and swaps with its tables
        collab.head = TreeHead(torch.tensor([[HEAD_FEATURES.index("log_n"), 0, 0]]), torch.tensor([[0.5, 0.0, 0.0]]),
                               torch.tensor([[1, 1, 2]]), torch.tensor([[2, 1, 2]]),
                               torch.tensor([[0.0, -1.5 * bias, 0.8 * bias]], dtype=torch.float64), len(HEAD_FEATURES))
    model = HybridScorer(lm, collab, ItemVocab(str(i) for i in range(1, 31)))
    out = save_export(model, tok, cfg, tmp_path / "exports" / version)
    if corrupt:
        (out / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    store.upload_dir(out, model_prefix(version))
    return out


def _expected(exports: dict, lm_from: str, tables_from: str, body: dict) -> list[float]:
    """P(like) for a request of item ids, computed offline from the text part of one export and the tables of another."""
    from llmrec_ray.model import HybridScorer, load_export, score_frame
    from llmrec_ray.text import history_text, item_text

    lm_model, tok, cfg = load_export(exports[lm_from])
    tables, _, _ = load_export(exports[tables_from])
    model = HybridScorer(lm_model.lm, tables.collab, tables.vocab, tables.fusion_weights()).eval()
    titles = {str(i): (f"Movie {i} ({1990 + i % 10})", ["Comedy", "Drama|Romance", "Action|Thriller"][i % 3]) for i in range(1, 31)}
    import numpy as np
    import pandas as pd

    hist = body["history"]
    frame = pd.DataFrame({"candidate_text": [item_text(*titles[c]) for c in body["candidates"]],
                          "history_text": history_text([(titles[h][0], None) for h in hist]),
                          "item_id": body["candidates"], "history_ids": [list(hist)] * len(body["candidates"]),
                          "history_ratings": [[np.nan] * len(hist)] * len(body["candidates"]),
                          "history_labels": [[np.nan] * len(hist)] * len(body["candidates"])})
    return score_frame(model, tok, cfg, frame).tolist()


def _promote(store, version: str, history: list[str]):
    cur = store.read_json(PROMOTED_KEY)
    store.put_json(PROMOTED_KEY, {"version": version, "model_prefix": model_prefix(version), "history": history,
                                  "updated_at": time.time()}, cur.etag)


@pytest.fixture(scope="module")
def serve_env(ray_session, tmp_path_factory):
    from ray import serve

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.store import Store

    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    cfg = config_from_dict({
        "store": {"uri": f"file://{tmp / 'store'}"},
        "model": {"backbone": "tiny", "max_seq_len": 32, "dropout": 0.0},
        "serve": {"host": "127.0.0.1", "port": port, "poll_interval_s": POLL_S, "num_cpus_per_replica": 0.5,
                  "max_candidates": 20, "max_pool": 29, "max_request_tokens": 1000, "max_history": 5,
                  "max_text_chars": 100, "max_body_bytes": 4000, "max_json_depth": 8,
                  "max_batch_size": 16, "batch_wait_timeout_s": 0.005, "auth_token_env": "LLMREC_TEST_TOKEN_UNSET",
                  "reload_backoff_s": 60.0, "cache_dir": str(tmp / "cache")},
    })
    store = Store.from_config(cfg.store)
    _write_catalog(store)
    exports = {v: _write_export(store, cfg, v, b, tmp) for v, b in (("v0001", -1.0), ("v0002", 1.0))}
    _write_export(store, cfg, "v0003", 0.0, tmp, corrupt=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"cfg": cfg, "store": store, "url": f"http://127.0.0.1:{port}", "exports": exports, "tmp": tmp}
    serve.shutdown()


@contextmanager
def _app_on_v0001(serve_env):
    """The app, deployed on v0001 promoted; deleted afterwards (Serve itself keeps running)."""
    from ray import serve

    from llmrec_ray.serve import APP_NAME, build_app

    _promote(serve_env["store"], "v0001", ["v0001"])
    serve.run(build_app(serve_env["cfg"]), name=APP_NAME, route_prefix="/")
    try:
        yield
    finally:
        serve.delete(APP_NAME)


@pytest.fixture
def app(serve_env):
    """A fresh app on v0001 for a test that promotes, pins or deletes."""
    with _app_on_v0001(serve_env):
        yield serve_env


README_EXAMPLE = {"history": [{"item_id": "1", "rating": 5}], "pool": "all", "k": 5}


def _post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=30, **kw)


def _metric(url: str, sample: str) -> float:
    """The value of one /metrics sample line (`name{labels}`), 0 when absent."""
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


CLIENT_ERRORS = [
    ({"history": [], "candidates": [str(i % 30 + 1) for i in range(21)]}, 422, "max_candidates=20"),
    ({"history": ["1"] * 6, "candidates": ["2"]}, 422, "max_history=5"),
    ({"history": [], "candidates": [{"text": "x" * 101}]}, 422, "max_text_chars=100"),
    ({"history": [{"text": "y" * 101}], "candidates": ["2"]}, 422, "max_text_chars=100"),
    ({"history": [], "candidates": ["999"]}, 422, "'999'"),
    ({"history": [{"item_id": "777"}], "candidates": ["2"]}, 422, "'777'"),
    ({"history": [], "candidates": []}, 422, "candidates"),
    ({"history": []}, 422, "candidates"),
    ({"history": [], "candidates": [{"text": "z" * 90}] * 20, "pad": "p" * 4000}, 413, "max_body_bytes=4000"),
    ({"history": "notalist", "candidates": ["2"]}, 422, "history"),
    # text a tokenizer cannot take is refused before the model, naming the field (JSON "\ud800": valid JSON)
    ({"history": [], "candidates": ["2", "3", {"text": "x\ud800y"}]}, 422, "candidates[2].text"),
    ({"history": [{"text": "a\udfffb", "rating": 4}], "candidates": ["2"]}, 422, "history[0].text"),
    ({"history": [], "candidates": [{"text": "bell \x07"}]}, 422, "U+0007"),
    ({"history": [], "candidates": ["\ud800"]}, 422, "candidates[0]"),
    ({"history": [], "pool": {"genre": "\udc00"}}, 422, "pool.genre"),
    # a misspelt field is an error, never silently ignored
    ({"histroy": ["1"], "candidates": ["2"]}, 422, "histroy"),
    ({"history": [{"item_id": "1", "ratng": 5}], "candidates": ["2"]}, 422, "history[0].ratng"),
]

# raw bodies: non-finite numbers (requests refuses to send them) and nesting
RAW_ERRORS = [
    (b'{"history": [{"item_id": "1", "rating": NaN}], "candidates": ["2"]}', 422, "history[0].rating"),
    (b'{"history": [{"item_id": "1", "rating": -Infinity}], "candidates": ["2"]}', 422, "history[0].rating"),
    (b'{"history": [], "candidates": ' + b"[" * 1500 + b"]" * 1500 + b"}", 400, "max_json_depth=8"),
    (b"[" * 100_000, 413, "max_body_bytes=4000"),
    (b'{"history": [], "candidates": ["2"]}' + b" " * 5000, 413, "max_body_bytes=4000"),
]


class TestOneAppOnV0001:
    """Tests that only read share one app on v0001 (an app deploy costs 11-16 s here); the others get their own."""

    @pytest.fixture(scope="class")
    def app(self, serve_env):
        with _app_on_v0001(serve_env):
            yield serve_env

    def test_score_recommend_model_metrics(self, app):
        url = app["url"]
        r = _post(url, "/v1/score", {"history": [{"item_id": "1", "rating": 5}, {"text": "Some film", "rating": 2}, "3"],
                                     "candidates": ["4", "5", {"text": "A new film | Comedy"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "v0001"
        assert [s.get("item_id") for s in body["scores"]] == ["4", "5", None]
        assert all(0.0 < s["probability"] < 1.0 for s in body["scores"])

        r = _post(url, "/v1/recommend", {"history": ["1"], "pool": {"genre": "Comedy"}, "k": 3})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 3 and all(i["item_id"] != "1" for i in items)
        probs = [i["probability"] for i in items]
        assert probs == sorted(probs, reverse=True)
        r = _post(url, "/v1/recommend", {"history": [], "pool": ["2", "3", "4"], "k": 2})
        assert r.status_code == 200 and len(r.json()["items"]) == 2
        r = _post(url, "/v1/recommend", README_EXAMPLE)  # the whole catalogue but item 1: 29 items > max_candidates=20
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == 5 and all(i["item_id"] != "1" for i in r.json()["items"])

        info = requests.get(url + "/v1/model", timeout=10).json()
        assert info["version"] == "v0001" and info["last_load_error"] is None and info["lineage"] == ["v0001"]
        assert info["promoted_version"] == "v0001" and info["in_sync"] and info["reason"] is None
        assert requests.get(url + "/healthz", timeout=10).json()["status"] == "ok"
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert 'llmrec_requests_total{path="/v1/score"}' in metrics and "llmrec_model_failed_loads_total 0" in metrics
        assert requests.get(url + "/docs", timeout=10).status_code == 200

    def test_score_client_errors(self, app):
        too_large = 'llmrec_request_failures_total{code="413",path="/v1/score"}'  # prometheus_client sorts labels
        before = _metric(app["url"], too_large)  # the app is shared: count this test's refusals only
        for body, status, needle in CLIENT_ERRORS:
            path = "/v1/recommend" if "pool" in body else "/v1/score"
            r = _post(app["url"], path, body)
            assert r.status_code == status, (body, r.text)
            assert needle in r.json()["error"], (body, r.text)
        for data, status, needle in RAW_ERRORS:
            r = requests.post(app["url"] + "/v1/score", data=data, headers={"Content-Type": "application/json"}, timeout=30)
            assert r.status_code == status, (data[:80], r.text)
            assert needle in r.json()["error"], (data[:80], r.text)
        assert _metric(app["url"], too_large) == before + 3
        metrics = requests.get(app["url"] + "/metrics", timeout=10).text
        assert 'llmrec_request_failures_total{code="500",path="/v1/score"}' not in metrics

    def test_other_client_errors(self, app):
        url = app["url"]
        r = requests.post(url + "/v1/score", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code in (400, 422) and "Traceback" not in r.text
        r = requests.post(url + "/v1/score", data=b"", headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code in (400, 422)
        r = _post(url, "/v1/recommend", {"history": [], "pool": "all", "k": 5})  # 30 items > max_pool=29
        assert r.status_code == 422 and "max_pool=29" in r.json()["error"]
        r = _post(url, "/v1/recommend", {"history": [], "pool": ["1"], "k": 30})
        assert r.status_code == 422 and "k=30" in r.json()["error"]
        r = _post(url, "/v1/recommend", {"history": [], "pool": {"genre": "Western"}, "k": 5})
        assert r.status_code == 422 and "Western" in r.json()["error"]
        r = _post(url, "/v1/recommend", {"history": [], "pool": ["1", "404"], "k": 1})
        assert r.status_code == 422 and "'404'" in r.json()["error"]
        r = _post(url, "/v1/recommend", {"history": [], "pool": ["1"], "k": 0})
        assert r.status_code == 422 and "k" in r.json()["error"]
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert 'llmrec_request_failures_total{code="422",path="/v1/recommend"}' in metrics

    def test_bad_input_fails_alone_among_concurrent_valid_requests(self, app):
        """A lone surrogate once made 13 of 16 valid batch-mates answer 500: now it is refused alone, at the Api (422
        naming the field) and, should such a text reach the Scorer, inside the batch (per-request errors)."""
        from ray import serve

        from llmrec_ray.serve import APP_NAME, ScoreItem

        url = app["url"]
        good = {"history": ["1"], "candidates": ["2", "3"]}
        bad = {"history": [], "candidates": ["4", "5", {"text": "x\ud800y"}]}
        bodies = [good] * 8 + [bad] + [good] * 8
        with ThreadPoolExecutor(len(bodies)) as ex:
            got = list(ex.map(lambda b: _post(url, "/v1/score", b), bodies))
        assert [r.status_code for r in got] == [200] * 8 + [422] + [200] * 8, [r.text for r in got]
        assert "candidates[2].text" in got[8].json()["error"] and "U+D800" in got[8].json()["error"]

        handle = serve.get_deployment_handle("Scorer", app_name=APP_NAME)
        nan = float("nan")
        ok = ScoreItem(["Movie 2 (1992) | Drama|Romance"], "Movie 1 (1991)", ["2"], ["1"], [nan])
        unencodable = ScoreItem(["x\ud800y"], "Movie 1 (1991)", [None], ["1"], [nan])
        too_big = ScoreItem(["a film"] * 40, "", [None] * 40, [], [])  # 40 x max_seq_len 32 > max_request_tokens=1000
        late = ScoreItem(["a film"], "", [None], [], [], deadline=time.time() - 1)
        items = [ok] * 8 + [unencodable, too_big, late] + [ok] * 8
        answers = [r.result(timeout_s=60) for r in [handle.score.remote(i) for i in items]]  # all in flight together
        assert all("probs" in a and len(a["probs"]) == 1 for a in answers[:8] + answers[11:]), answers
        assert answers[8]["status"] == 422 and "encoded" in answers[8]["error"]
        assert answers[9]["status"] == 422 and "max_request_tokens=1000" in answers[9]["error"]
        assert answers[10]["status"] == 504
        scores = [a["probs"][0] for a in answers[:8] + answers[11:]]
        assert max(scores) - min(scores) < 1e-5, scores  # neither the bad inputs nor batch-mates change a score

    def test_openapi_is_complete_and_schemathesis_finds_no_server_error(self, app):
        """Every $ref of the live /openapi.json resolves, 4xx answers and the bearer scheme are documented, the README's
        example is valid against it, and a short seeded schemathesis run gets no 5xx and nothing off-schema."""
        import jsonschema
        import schemathesis
        from hypothesis import HealthCheck, Phase, given, settings
        from schemathesis.checks import not_a_server_error
        from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                       status_code_conformance)

        url = app["url"]
        spec = requests.get(url + "/openapi.json", timeout=10).json()
        refs = set(_refs(spec))
        assert refs
        for ref in refs:
            node = spec
            for part in ref.lstrip("#/").split("/"):
                assert part in node, f"{ref} is not defined"
                node = node[part]
        schemas = spec["components"]["schemas"]
        assert {"HistoryItem", "Candidate", "GenrePool", "ScoreRequest", "RecommendRequest", "ErrorResponse"} <= set(schemas)
        assert schemas["ScoreRequest"]["additionalProperties"] is False
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        for path in ("/v1/score", "/v1/recommend"):
            op = spec["paths"][path]["post"]
            assert {"400", "401", "413", "422", "503", "504"} <= set(op["responses"]), op["responses"].keys()
            assert "Retry-After" in op["responses"]["503"]["headers"] and op["security"]
        readme = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/RecommendRequest", "components": spec["components"]})
        readme.validate(README_EXAMPLE)

        schema = schemathesis.openapi.from_dict(spec)
        checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
        statuses: Counter = Counter()

        @given(case=schema.as_strategy())
        @settings(max_examples=150, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call_and_validate(base_url=url, checks=checks)
            statuses[response.status_code] += 1

        fuzz()
        assert sum(statuses.values()) >= 100 and not any(code >= 500 for code in statuses), statuses
        assert statuses[200] > 0, statuses  # some generated requests were valid ones, not only refusals


def test_bearer_auth(serve_env, monkeypatch):
    from ray import serve

    from llmrec_ray.serve import APP_NAME, build_app

    _promote(serve_env["store"], "v0001", ["v0001"])
    monkeypatch.setenv(serve_env["cfg"].serve.auth_token_env, "s3cret")
    serve.run(build_app(serve_env["cfg"]), name=APP_NAME, route_prefix="/")
    try:
        url = serve_env["url"]
        body = {"history": [], "candidates": ["2"]}
        assert _post(url, "/v1/score", body).status_code == 401
        assert _post(url, "/v1/score", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(url, "/v1/score", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert requests.get(url + "/healthz", timeout=10).status_code == 200  # probes need no token
    finally:
        serve.delete(APP_NAME)


def test_hot_swap_no_failed_requests_and_never_mixes_the_parts_of_two_versions(app):
    from llmrec_ray.model import load_export

    url = app["url"]
    body = {"history": ["1"], "candidates": ["2", "3"]}
    assert all(load_export(app["exports"][v])[0].collab.head is not None for v in ("v0001", "v0002"))  # trees swap too
    pure = {v: _expected(app["exports"], v, v, body) for v in ("v0001", "v0002")}
    mixed = [_expected(app["exports"], "v0001", "v0002", body), _expected(app["exports"], "v0002", "v0001", body)]
    for m in mixed:  # the check can tell a mix from either version
        assert all(min(abs(a - b) for a, b in zip(m, p)) > 1e-3 for p in pure.values())
    probs_seen: list[tuple[str, list[float]]] = []
    results: list[tuple[float, int, str | None]] = []
    lock = threading.Lock()
    swap_at: list[float] = []

    def client(n):
        with requests.Session() as s:
            for _ in range(n):
                try:
                    r = s.post(url + "/v1/score", json=body, timeout=30)
                    v = r.json().get("model_version") if r.status_code == 200 else None
                    rec = (time.time(), r.status_code, v)
                    if v:
                        probs_seen.append((v, [x["probability"] for x in r.json()["scores"]]))
                except Exception as exc:  # connection errors count as failures
                    rec = (time.time(), -1, repr(exc))
                with lock:
                    results.append(rec)
                if len(results) == 60 and not swap_at:
                    swap_at.append(time.time())
                    _promote(app["store"], "v0002", ["v0001", "v0002"])

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(client, [75] * 4))
    assert len(results) == 300
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:5]
    assert swap_at
    versions = [r[2] for r in sorted(results)]
    assert versions[0] == "v0001" and versions[-1] == "v0002"
    first_new = min(t for t, _, v in results if v == "v0002")
    assert first_new - swap_at[0] < POLL_S + 3.0
    late = [r for r in results if r[0] > first_new + 1.0 and r[2] != "v0002"]  # one replica: no flip-flop back
    assert not late
    info = requests.get(url + "/v1/model", timeout=10).json()
    assert info["version"] == "v0002" and info["lineage"] == ["v0001", "v0002"] and info["reloads"] == 2
    for version, probs in probs_seen:  # every answer is exactly its version's text part + its version's tables
        assert probs == pytest.approx(pure[version], abs=1e-5), (version, probs, pure)


def test_failed_load_is_refused_and_pinning(app):
    from ray import serve

    from llmrec_ray.serve import APP_NAME, build_app

    url = app["url"]
    _promote(app["store"], "v0003", ["v0001", "v0003"])
    deadline = time.time() + 30
    info = {}
    while time.time() < deadline:
        info = requests.get(url + "/v1/model", timeout=10).json()
        if info.get("last_load_error"):
            break
        r = _post(url, "/v1/score", {"history": [], "candidates": ["2"]})
        assert r.status_code == 200 and r.json()["model_version"] == "v0001"
        time.sleep(0.2)
    assert info["last_load_error"]["version"] == "v0003", info
    assert "v0003" in info["last_load_error"]["error"]
    assert info["version"] == "v0001" and info["failed_loads"] >= 1
    r = _post(url, "/v1/score", {"history": [], "candidates": ["2"]})
    assert r.status_code == 200 and r.json()["model_version"] == "v0001"
    assert "llmrec_model_failed_loads_total 1" in requests.get(url + "/metrics", timeout=10).text

    # pin v0002 through user_config -> reconfigure() on the running replica (no restart)
    serve.run(build_app(app["cfg"], pinned_version="v0002"), name=APP_NAME, route_prefix="/")
    deadline = time.time() + 60
    while time.time() < deadline:
        r = _post(url, "/v1/score", {"history": [], "candidates": ["2"]})
        if r.status_code == 200 and r.json()["model_version"] == "v0002":
            break
        time.sleep(0.3)
    assert r.json()["model_version"] == "v0002"
    assert requests.get(url + "/v1/model", timeout=10).json()["pinned_version"] == "v0002"


def test_app_builder_args(tmp_path):
    from llmrec_ray.serve import AppArgs, app_builder

    with pytest.raises(ValueError):
        app_builder({"overrides": ["serve.port=notaport"]})
    assert AppArgs.model_validate({}).overrides == []
    app = app_builder({"config_path": None, "overrides": ["model.backbone=tiny"]})
    assert app is not None


# --- isolation, admission control, registry agreement, OpenAPI -------------------------------------------------
def test_flood_is_answered_503_with_retry_after_never_500(serve_env):
    """60 concurrent requests of max_candidates each against a Scorer taking 2 at a time and queueing 2: the rest
    get 503 + Retry-After (from the Api or from Serve's proxy), nothing else fails, and it serves normally after."""
    from ray import serve

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.serve import APP_NAME, build_app

    d = serve_env["cfg"].to_dict()
    d["serve"].update(max_ongoing_requests=2, max_queued_requests=2, max_batch_size=2, retry_after_s=2)
    _promote(serve_env["store"], "v0001", ["v0001"])
    serve.run(build_app(config_from_dict(d)), name=APP_NAME, route_prefix="/")
    try:
        url = serve_env["url"]
        body = {"history": ["1", "2", "3"], "candidates": [str(i) for i in range(5, 25)]}
        start = threading.Barrier(60)

        def one(_):
            start.wait()
            r = requests.post(url + "/v1/score", json=body, timeout=120)
            return r.status_code, r.headers.get("Retry-After")

        with ThreadPoolExecutor(60) as ex:
            got = list(ex.map(one, range(60)))
        codes = Counter(code for code, _ in got)
        assert set(codes) <= {200, 503} and codes[503] > 0 and codes[200] > 0, codes
        assert all(retry == "2" for code, retry in got if code == 503), got
        assert _post(url, "/v1/score", body).status_code == 200
    finally:
        serve.delete(APP_NAME)


def _wait_info(url, until, timeout_s=30.0):
    deadline, info = time.time() + timeout_s, {}
    while time.time() < deadline:
        info = requests.get(url + "/v1/model", timeout=10).json()
        if until(info):
            return info
        time.sleep(0.2)
    raise AssertionError(f"/v1/model never got there: {info}")


def test_refused_version_is_loaded_when_repaired_and_promoted_again(app):
    """Serve once skipped the version it last refused forever. Now a rewrite of the pointer (even to the same name)
    retries it; until then /v1/model says what is served, what is promoted and why they differ, without server
    paths. The replica's model cache is deleted when the app goes."""
    from ray import serve

    from llmrec_ray.serve import APP_NAME

    url, store, cfg, tmp = app["url"], app["store"], app["cfg"], app["tmp"]
    _write_export(store, cfg, "v0004", 0.5, tmp / "broken", corrupt=True)
    _promote(store, "v0004", ["v0001", "v0004"])
    info = _wait_info(url, lambda i: i["last_load_error"])
    assert info["version"] == "v0001" and info["promoted_version"] == "v0004" and not info["in_sync"], info
    assert "v0004" in info["reason"] and "refused" in info["reason"] and "v0004" in info["last_load_error"]["error"]
    text = json.dumps(info)
    for private in (str(tmp), "llmrec-serve-", store.root):
        assert private not in text, (private, text)
    assert not re.search(r"(?<![\w.])/(tmp|home|root|var|work)/", text), text

    _write_export(store, cfg, "v0004", 0.5, tmp / "fixed")  # repaired in place, not promoted again yet
    time.sleep(6 * POLL_S)
    info = requests.get(url + "/v1/model", timeout=10).json()
    assert info["version"] == "v0001" and info["failed_loads"] == 1, info  # refused, backing off (reload_backoff_s=60)

    _promote(store, "v0004", ["v0001", "v0004"])  # promoted again: the pointer is rewritten
    info = _wait_info(url, lambda i: i["version"] == "v0004")
    assert info["in_sync"] and info["reason"] is None and info["last_load_error"] is None, info
    assert _post(url, "/v1/score", {"history": [], "candidates": ["2"]}).json()["model_version"] == "v0004"

    serve.delete(APP_NAME)
    cache = tmp / "cache"
    deadline = time.time() + 15
    while list(cache.iterdir()) and time.time() < deadline:
        time.sleep(0.2)
    assert not list(cache.iterdir()), list(cache.iterdir())  # every replica of this module removed its downloads


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# --- offline: no Ray ----------------------------------------------------------------------------------------
def _depth_reference(body: bytes) -> int:
    depth = deepest = 0
    inside = escaped = False
    for ch in body.decode():
        if inside:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                inside = False
        elif ch == '"':
            inside = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def test_json_depth_matches_a_character_scan():
    import random

    from llmrec_ray.serve import json_depth

    rng = random.Random(0)
    tricky = ['a"b', "x\\", "[{", '\\"]', "}", "\\\\", "\\\\\\\"[", 1, None, 2.5]

    def value(depth):
        r = rng.random()
        if depth > 7 or r < 0.3:
            return rng.choice(tricky)
        if r < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["k[", 'q\\"{', "z"]): value(depth + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(2000):
        body = json.dumps(value(0)).encode()
        assert json_depth(body) == _depth_reference(body), body
    assert json_depth(b"[" * 100_000) == 100_000 and json_depth(b"") == 0
    assert json_depth(b'{"a": "[[[[[[", "b": [1]}') == 2


def test_request_models_and_limits():
    from pydantic import ValidationError

    from llmrec_ray.config import ServeConfig
    from llmrec_ray.serve.guard import explain
    from llmrec_ray.serve.reload import without_paths
    from llmrec_ray.serve.schemas import RecommendRequest, ScoreRequest

    def error(model, body):
        with pytest.raises(ValidationError) as e:
            model.model_validate(body)
        return explain(e.value.errors())

    assert error(ScoreRequest, {"candidates": ["1", {"text": "ok"}, {"text": "x\ud800y"}]}).startswith("candidates[2].text: ")
    assert "U+FFFE" in error(ScoreRequest, {"candidates": [{"text": "\ufffe"}]})
    assert error(ScoreRequest, {"histroy": [], "candidates": ["1"]}).startswith("histroy: Extra inputs")
    assert error(ScoreRequest, {"history": [{"rating": float("inf")}], "candidates": ["1"]}).startswith("history[0].rating")
    assert error(RecommendRequest, {"pool": ["1", 2]}).startswith("pool[1]")
    assert ScoreRequest.model_validate({"candidates": [{"text": "Cafe\u0301"}]}).candidates[0].text == "Caf\u00e9"  # NFC
    req = RecommendRequest.model_validate(README_EXAMPLE)
    assert req.pool == "all" and req.history[0].rating == 5
    assert ServeConfig().max_pool >= 1682 and ServeConfig().max_candidates <= 1000  # all of MovieLens-100K; /v1/score capped
    msg = without_paths("HeaderTooLarge: /tmp/llmrec-serve-x/v0003/model.safetensors; see file:///srv/store/a/b.json",
                         ["/tmp/llmrec-serve-x"])
    assert msg == "HeaderTooLarge: v0003/model.safetensors; see .../b.json", msg


def test_deployments_capture_every_global_they_use():
    """Ray pickles a deployment class when it is decorated: a module global defined below the class is missing in
    the replica (a NameError on every request, once). Check each method's captured globals."""
    import builtins
    import dis
    import inspect

    from ray import cloudpickle

    from llmrec_ray.serve import Api, Scorer

    def loaded_names(code):
        names = {i.argval for i in dis.get_instructions(code) if i.opname == "LOAD_GLOBAL"}
        return names.union(*(loaded_names(c) for c in code.co_consts if inspect.iscode(c)))

    for deployment in (Api, Scorer):
        cls = cloudpickle.loads(deployment._replica_config.serialized_deployment_def)
        for klass in cls.__mro__:
            for name, member in vars(klass).items():
                fn = getattr(member, "__wrapped__", member)
                if inspect.isfunction(fn):
                    missing = {n for n in loaded_names(fn.__code__) if n not in fn.__globals__ and not hasattr(builtins, n)}
                    assert not missing, (deployment.name, name, missing)


def test_guard_answers_json_errors_without_ray():
    """The guard and the error handlers on a bare FastAPI app: 413 and 400 on the raw body, 422 naming the field,
    404 in the same {"error"} shape, and a route's bug a 500 naming only the exception type."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llmrec_ray.config import ServeConfig
    from llmrec_ray.serve import guard

    app = FastAPI()
    guard.install(app, lambda: None)  # outside a replica: the default limits

    @app.post("/echo")
    async def echo(req: ScoreRequest) -> dict:
        return {"n": len(req.candidates)}

    @app.get("/bug")
    async def bug() -> dict:
        return {"x": 1 / 0}

    client, s = TestClient(app), ServeConfig()
    assert client.post("/echo", json={"candidates": ["1"]}).json() == {"n": 1}
    r = client.post("/echo", content=b" " * (s.max_body_bytes + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and f"serve.max_body_bytes={s.max_body_bytes}" in r.json()["error"]
    r = client.post("/echo", content=b"[" * (s.max_json_depth + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "max_json_depth" in r.json()["error"]
    r = client.post("/echo", json={"candidates": [{"txt": "a"}]})
    assert r.status_code == 422 and r.json()["error"].startswith("invalid request: candidates[0].txt")
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    r = client.get("/bug")
    assert r.status_code == 500 and r.json() == {"error": "internal error: ZeroDivisionError"}


def test_metrics_text_escapes_labels_and_parses():
    from prometheus_client.parser import text_string_to_metric_families

    from llmrec_ray.serve.metrics import IngressMetrics

    m = IngressMetrics(["/v1/score", '/odd"path\\'])
    for path, status in [("/v1/score", 200), ("/v1/score", 413), ('/odd"path\\', 422), ("/unknown", 404)]:
        m.count(path, status)
    info = {"version": 'v"1', "reloads": 2, "failed_loads": 1, "in_sync": True}
    text = m.render(info).decode()
    assert 'llmrec_request_failures_total{code="413",path="/v1/score"} 1.0' in text
    assert 'llmrec_requests_total{path="/odd\\"path\\\\"} 1.0' in text  # " and \ escaped
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("llmrec_requests_total", (("path", '/odd"path\\'),))] == 1
    assert samples[("llmrec_requests_total", (("path", "other"),))] == 1
    assert samples[("llmrec_model_info", (("version", 'v"1'),))] == 1
    assert samples[("llmrec_model_failed_loads_total", ())] == 1 and samples[("llmrec_model_in_sync", ())] == 1


def test_importing_the_package_loads_no_torch():
    """The ingress replica imports llmrec_ray.serve: only Scorer replicas should pay for torch."""
    import subprocess
    import sys

    code = "import sys, llmrec_ray.serve; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out


def test_admission_bounds_pending_rows_and_always_lets_a_lone_request_in():
    from llmrec_ray.serve.admission import Admission, Overloaded, rows_to_score

    a = Admission(max_pending_rows=100)
    with a.hold(500):  # nothing pending: goes, however big (the per-request limits bound it)
        with pytest.raises(Overloaded, match="500 candidate rows are pending, 1 more"):
            with a.hold(1):
                pass
        assert a.pending == 500 and a.refused == 1
    with a.hold(60):
        with a.hold(40):  # exactly at the bound
            assert a.pending == 100
        with pytest.raises(Overloaded):
            with a.hold(41):
                pass
    with pytest.raises(RuntimeError):  # released on errors too
        with a.hold(10):
            raise RuntimeError("scorer failed")
    assert a.pending == 0
    # a two-stage /v1/recommend over 1,682 movies costs its shortlist (100), not the pool: two of them fit a bound of 1,024
    assert rows_to_score(1682, 100) == 100 and rows_to_score(30, 100) == 30 and rows_to_score(1682, None) == 1682


def test_recommend_in_two_stages_with_the_versions_own_index(serve_env):
    """A version with an item index: /v1/recommend scores only the index's best serve.rerank_n of the pool (exact:
    the collaborative part's own ranking) and answers the best k of those; the index is loaded with its version."""
    from ray import serve

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.item_index import build_index, load_index, save_index
    from llmrec_ray.model import load_export
    from llmrec_ray.retrieval import user_vectors
    from llmrec_ray.catalog import load_catalog
    from llmrec_ray.serve import APP_NAME, build_app
    from llmrec_ray.text import history_text, item_texts

    store = serve_env["store"]
    export = serve_env["exports"]["v0002"]
    model, tokenizer, mcfg = load_export(export)
    catalog = load_catalog(store, ["title", "genres", "description"])
    texts = item_texts(catalog)
    ids = list(catalog.index)
    save_index(build_index(model, tokenizer, mcfg, ids, [texts[i][0] for i in ids], catalog["genres"].tolist(),
                           version="v0004"), export)
    store.upload_dir(export, model_prefix("v0004"))
    _promote(store, "v0004", ["v0004"])
    d = serve_env["cfg"].to_dict()
    d["serve"]["rerank_n"] = 3  # = k: the answer is the shortlist, reranked
    serve.run(build_app(config_from_dict(d)), name=APP_NAME, route_prefix="/")
    try:
        history = [{"item_id": "1", "rating": 5}, {"item_id": "7", "rating": 1}]
        r = _post(serve_env["url"], "/v1/recommend", {"history": history, "pool": "all", "k": 3})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "v0004"
        got = [i["item_id"] for i in r.json()["items"]]
        index = load_index(export, version="v0004", model=model)
        user = user_vectors(model, mcfg, [["1", "7"]], [[5.0, 1.0]])
        shortlist = index.top_n(user, 3, exclude=[["1", "7"]])[0].item_ids
        assert set(got) == set(shortlist), (got, shortlist)
        # the shortlist matters here: scoring the whole pool answers other items (the text part reorders them)
        from llmrec_ray.serve.inference import Loaded, encode_item, forward
        from llmrec_ray.serve.schemas import ScoreItem

        pool = [i for i in ids if i not in ("1", "7")]
        hist_text = history_text([(texts["1"][1], 5.0), (texts["7"][1], 1.0)])
        item = ScoreItem([texts[i][0] for i in pool], hist_text, pool, ["1", "7"], [5.0, 1.0])
        state = Loaded(model, tokenizer, "v0004", mcfg)
        probs_all = forward(state, [encode_item(state, item)])[0]
        exhaustive = [pool[k] for k in np.argsort(probs_all)[::-1][:3]]
        assert not set(exhaustive) <= set(shortlist), (exhaustive, shortlist)
        probs = [i["probability"] for i in r.json()["items"]]
        assert probs == sorted(probs, reverse=True)
    finally:
        serve.delete(APP_NAME)


def test_serve_scores_a_new_catalogue_item_added_after_startup(serve_env, tmp_path):
    """A catalogue update while Serve runs: an item no model saw (new id, new title) is a 422 before it and answered
    200, scored from its text, after it, with no reload and no failed request across the swap; the Scorer's item index
    grows to hold it, so /v1/recommend's retrieval stage ranks it by its text vector, and so do its collaborative
    tables (a row and a text vector, swapped in as a new reference while a client keeps scoring)."""
    import pandas as pd
    from ray import serve

    from llmrec_ray.catalog import catalog_bytes, write_catalog
    from llmrec_ray.config import config_from_dict
    from llmrec_ray.item_index import index_builder, load_index
    from llmrec_ray.model import load_export
    from llmrec_ray.retrieval import user_vectors
    from llmrec_ray.serve import APP_NAME, build_app
    from llmrec_ray.store import Store
    from llmrec_ray.text import item_text

    d = serve_env["cfg"].to_dict()
    d["store"]["uri"] = f"file://{tmp_path / 'store'}"  # its own store: the module's catalogue stays at 30 items
    d["serve"].update(max_pool=40, rerank_n=1)  # k=1: the answer is the index's best item, reranked with the unindexed
    cfg = config_from_dict(d)
    store = Store.from_config(cfg.store)
    _write_catalog(store)
    # no tree head: the check below reads the answer off the index's linear top-1 (the head's shortlist:
    # tests/test_retrieval.py)
    export = _write_export(store, cfg, "v0001", -1.0, tmp_path, head=False, text=True)  # its tables grow too
    index_builder(cfg, store)(export, "v0001")
    store.upload_dir(export, model_prefix("v0001"))
    _promote(store, "v0001", ["v0001"])
    new = {"item_id": "n1", "title": "Qwzx Blorp (2031)", "genres": "Comedy", "description": "a heist on the moon"}
    url = serve_env["url"]
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    try:
        r = _post(url, "/v1/score", {"history": [], "candidates": ["n1"]})
        assert r.status_code == 422 and "unknown item id 'n1'" in r.json()["error"], r.text
        info = requests.get(url + "/v1/model", timeout=10).json()
        assert (info["catalog_version"], info["index_catalog_version"], info["index_items"], info["table_items"]) == (
            "base", "base", 30, 30), info

        # (c) a client scores known items all along, across the catalogue swap in the Api and the index growth
        stop, codes = threading.Event(), []

        def client():
            with requests.Session() as s:
                while not stop.is_set():
                    try:
                        codes.append(s.post(url + "/v1/score", json={"history": ["1"], "candidates": ["2", "3"]},
                                            timeout=30).status_code)
                    except requests.RequestException as exc:
                        codes.append(repr(exc))

        thread = threading.Thread(target=client)
        thread.start()
        try:
            time.sleep(1.0)
            before = len(codes)
            wrote = write_catalog(store, pd.DataFrame([new]))
            assert wrote.added == 1, wrote
            key = wrote.key
            deadline = time.time() + 30  # (a) answered from the moment the Api reads the new catalogue version
            while (r := _post(url, "/v1/score", {"history": ["1"], "candidates": ["n1"]})).status_code == 422:
                assert time.time() < deadline and "'n1'" in r.json()["error"], r.text
                time.sleep(0.1)
            assert r.status_code == 200, r.text
            assert 0.0 < r.json()["scores"][0]["probability"] < 1.0, r.text
            info = _wait_info(url, lambda i: i["index_catalog_version"] == key)
            time.sleep(1.0)
        finally:
            stop.set()
            thread.join(60)
        assert before > 0 and len(codes) > before + 5, (before, len(codes))
        assert set(codes) == {200}, Counter(codes)
        assert info["catalog_version"] == key and info["index_items"] == 31 and info["table_items"] == 31, info
        assert info["reloads"] == 1 and info["version"] == "v0001", info  # grown in place: no model reload

        # (b) the whole pool ranks it
        r = _post(url, "/v1/recommend", {"history": [], "pool": "all", "k": 31})
        assert r.status_code == 200, r.text
        items = {i["item_id"]: i for i in r.json()["items"]}
        assert len(items) == 31 and items["n1"]["title"] == new["title"] and 0.0 < items["n1"]["probability"] < 1.0

        # (b) only the grown index answers this: with rerank_n=1 the reranker sees the index's best item, plus n1 if
        # the index lacked it. Pick a history where that would change the answer; the index computed offline agrees.
        model, tokenizer, mcfg = load_export(export)
        index = load_index(export, version="v0001", model=model, tokenizer=tokenizer, cfg=mcfg)
        old_index = load_index(export, version="v0001", model=model)
        index.add_items(["n1"], [item_text(new["title"], new["genres"], new["description"])], [new["genres"]])
        for h in map(str, range(1, 31)):
            user = user_vectors(model, mcfg, [[h]], [[5.0]])
            best = index.top_n(user, 1, exclude=[[h]])[0].item_ids[0]
            old_best = old_index.top_n(user, 1, exclude=[[h]])[0].item_ids[0]
            history = [{"item_id": h, "rating": 5}]
            scores = _post(url, "/v1/score", {"history": history, "candidates": [old_best, "n1"]}).json()["scores"]
            ungrown = max(scores, key=lambda s: s["probability"])["item_id"]  # what an index without n1 would answer
            if ungrown != best:
                break
        else:
            raise AssertionError("no history where the grown index changes the answer: the check cannot tell")
        r = _post(url, "/v1/recommend", {"history": history, "pool": "all", "k": 1})
        assert r.status_code == 200 and [i["item_id"] for i in r.json()["items"]] == [best], (h, best, ungrown, r.text)

        # an update that cannot be read: both sides keep what they serve (and log it), nothing fails ...
        bad = "catalog/updates/9999999999999-0000000000000000.parquet"
        store.write_bytes(bad, b"not parquet")
        time.sleep(4 * POLL_S)
        assert _post(url, "/v1/score", {"history": ["1"], "candidates": ["n1", "2"]}).status_code == 200
        info = requests.get(url + "/v1/model", timeout=10).json()
        assert (info["catalog_version"], info["index_catalog_version"], info["index_items"]) == (key, key, 31), info
        # ... and the pollers, still alive, take it once it is readable
        store.write_bytes(bad, catalog_bytes(pd.DataFrame([{**new, "item_id": "n2", "title": "Vrok (2032)"}])))
        info = _wait_info(url, lambda i: i["catalog_version"] == bad and i["index_catalog_version"] == bad)
        assert info["index_items"] == 32 and info["table_items"] == 32, info
        assert _post(url, "/v1/score", {"history": ["1"], "candidates": ["n2"]}).status_code == 200
    finally:
        serve.delete(APP_NAME)


def test_a_replica_gives_a_new_catalogue_item_a_table_row_on_the_next_poll_without_a_reload(tmp_path):
    """Reloader, no Ray: an item added to the catalogue after the version was trained gets a row and its text vector
    in the served tables (model.grow_catalog) when the catalogue version changes -- a new reference with the same
    version and text part; the one it replaces is unchanged, so a batch holding it scores as before. The tree head
    then compares the new item's text with the history's: here a stump on text_max_liked moves its logit by 2."""
    import math

    import pandas as pd
    import torch

    from llmrec_ray.catalog import write_catalog
    from llmrec_ray.collab import HEAD_FEATURES, TreeHead
    from llmrec_ray.config import load_config
    from llmrec_ray.registry import Registry
    from llmrec_ray.serve.inference import score_items
    from llmrec_ray.serve.reload import Reloader
    from llmrec_ray.model import load_export, save_export
    from llmrec_ray.serve.schemas import ScoreItem
    from llmrec_ray.store import Store

    cfg = load_config(None, ["model.backbone=tiny", "model.max_seq_len=32", "model.collab.dim=4",
                             f"store.uri=file://{tmp_path / 'store'}"])
    store = Store.from_config(cfg.store)
    _write_catalog(store)
    export = _write_export(store, cfg, "v0001", 0.5, tmp_path, head=False, text=True)
    model, tok, mcfg = load_export(export)  # a head on the text evidence: +1 when a liked history item reads alike
    model.collab.head = TreeHead(torch.tensor([[HEAD_FEATURES.index("text_max_liked"), 0, 0]]),
                                 torch.tensor([[0.05, 0.0, 0.0]]), torch.tensor([[1, 1, 2]]), torch.tensor([[2, 1, 2]]),
                                 torch.tensor([[0.0, -1.0, 1.0]], dtype=torch.float64), len(HEAD_FEATURES))
    store.upload_dir(save_export(model, tok, mcfg, tmp_path / "exports" / "v0001"), model_prefix("v0001"))
    _promote(store, "v0001", ["v0001"])
    reloader = Reloader(cfg, Registry(store), tmp_path / "cache")
    try:
        reloader.poll_once()
        before = reloader.state
        info = reloader.info()
        assert (info["version"], info["table_items"], info["index_catalog_version"]) == ("v0001", 30, "base"), info
        item = ScoreItem(["Qwzx Blorp (2031) | Comedy"], "Movie 1 (1991) rated 5", ["n1"], ["1"], [5.0])
        p_before = score_items(before, [item], cfg.serve)[0]["probs"][0]
        reloader.follow_catalog()
        assert reloader.state is before  # the catalogue did not change: nothing to grow

        new = {"item_id": "n1", "title": "Qwzx Blorp (2031)", "genres": "Comedy", "description": None}
        key = write_catalog(store, pd.DataFrame([new])).key
        reloader.follow_catalog()
        after = reloader.state
        info = reloader.info()
        assert after is not before and after.version == "v0001" and after.model.lm is before.model.lm
        assert (info["table_items"], info["index_catalog_version"], info["reloads"]) == (31, key, 1), info
        assert "n1" in after.model.vocab.index and "n1" not in before.model.vocab.index
        row = after.model.vocab.index["n1"]
        assert float(after.model.collab.item_text[row].norm()) == pytest.approx(1.0, abs=1e-5)
        assert score_items(before, [item], cfg.serve)[0]["probs"][0] == p_before  # the old reference: as before
        p_after = score_items(after, [item], cfg.serve)[0]["probs"][0]
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        assert logit(p_after) - logit(p_before) == pytest.approx(2.0, abs=1e-4)  # the head now reads n1's text
    finally:
        reloader.close()


def test_catalog_reads_a_catalogue_version_and_pollers_survive_a_failing_step(tmp_path):
    """Offline: the ingress Catalog is one catalogue version (base + updates), and run_every (both pollers) logs a
    step that raises and runs it again next time."""
    import pandas as pd

    from llmrec_ray.catalog import catalog_version, write_catalog
    from llmrec_ray.config import Config, StoreConfig
    from llmrec_ray.serve.reload import run_every
    from llmrec_ray.serve.resolve import Catalog
    from llmrec_ray.store import Store

    store = Store.from_config(StoreConfig(uri=f"file://{tmp_path}"))
    _write_catalog(store)
    base = Catalog.read(store, Config())
    assert base.version == "base" and len(base.texts) == 30
    new = {"item_id": "n1", "title": "Qwzx Blorp (2031)", "genres": "Comedy|Sci-Fi", "description": None}
    key = write_catalog(store, pd.DataFrame([new])).key
    grown = Catalog.read(store, Config())
    assert grown.version == key == catalog_version(store) and len(grown.texts) == 31
    assert grown.texts["n1"] == "Qwzx Blorp (2031) | Comedy, Sci-Fi" and grown.genres["n1"] == {"Comedy", "Sci-Fi"}
    assert Catalog.read(store, Config(), "base").version == "base" and "n1" not in base.texts  # versions stay whole

    calls, stop = [], threading.Event()

    def step():
        calls.append(time.time())
        if len(calls) == 1:
            raise OSError("the store is down")
        if len(calls) == 3:
            stop.set()

    run_every(0.01, stop, [step])
    assert len(calls) == 3


def test_model_info_never_pairs_a_served_version_with_its_own_refused_load(tmp_path, monkeypatch):
    """Reloader, no Ray, real threads: GET /v1/model is read by request threads while the poller swaps versions. A
    version refused and then loaded after its repair must never show as served together with its old load error or
    with the previous version's lineage (test_refused_version_is_loaded_when_repaired_and_promoted_again saw the
    first once, from a read between the swap and the clearing of the error). The switch interval is cut so that
    threads interleave between any two bytecodes, as on a loaded machine."""
    import sys
    from types import SimpleNamespace

    from llmrec_ray.config import load_config
    from llmrec_ray.serve import reload

    broken: set[str] = set()

    def load_version(store, prefix, version, cache_root, quantize="none", registry=None):
        if version in broken:
            raise ValueError(f"model export {version} cannot be loaded: broken")
        return SimpleNamespace(version=version, index=None, model=SimpleNamespace(is_hybrid=False))

    monkeypatch.setattr(reload, "load_version", load_version)
    monkeypatch.setattr(reload, "warm_up", lambda state: None)
    monkeypatch.setattr(reload, "follows_catalog", lambda state: False)
    cfg = load_config(None, ["model.backbone=tiny"])
    reloader = reload.Reloader(cfg, SimpleNamespace(store=SimpleNamespace(root="/r", uri="file:///r")), tmp_path)
    seen, reads, errors, done = [], [0], [], threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                info = reloader.info()
                reads[0] += 1
                err = info["last_load_error"]
                if err is not None and err["version"] == info["version"]:
                    seen.append(info)
                if info["version"] is not None and info["lineage"] != [info["version"]]:
                    seen.append(info)  # the version with another version's lineage: the same torn read
        except Exception as exc:  # a reader that died would see nothing wrong: fail instead
            errors.append(exc)

    reader = threading.Thread(target=read)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        reader.start()
        for i in range(2000):
            version = f"v{i:04d}"
            broken.add(version)
            assert not reloader._try_load(version, version, [version])  # refused: the error names it
            broken.discard(version)
            assert reloader._try_load(version, version, [version])  # repaired: served, the error cleared
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(interval)
    assert not errors and reads[0] > 100, (errors, reads)
    assert reloader.info()["failed_loads"] == 2000 and reloader.info()["last_load_error"] is None
    assert not seen, f"{len(seen)} torn reads (a version beside its own refused load or another lineage), e.g. {seen[0]}"


@pytest.mark.ray
def test_ctrl_c_stops_llmrec_serve_in_one_line_and_frees_the_port(tmp_path):
    """The real command in its own process (its own local Ray): up, answering; SIGINT, as Ctrl-C sends it; exit 0 with
    one line and no traceback, and nothing listening on the port afterwards (the local Ray and Serve went with it)."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile

    from llmrec_ray.config import config_from_dict
    from llmrec_ray.store import Store

    port = free_port()
    cfg = config_from_dict({"store": {"uri": f"file://{tmp_path / 'store'}"},
                            "model": {"backbone": "tiny", "max_seq_len": 32}})
    store = Store.from_config(cfg.store)
    _write_catalog(store)
    _write_export(store, cfg, "v0001", 0.0, tmp_path)
    _promote(store, "v0001", ["v0001"])
    ray_tmp = tempfile.mkdtemp(prefix="llmrec-sigint-", dir="/tmp")  # short: Ray's socket paths are length-limited
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llmrec_ray.cli", "serve", "--store", str(tmp_path / "store"),
                                 "--set", f"serve.port={port}", "--set", "serve.host=127.0.0.1",
                                 "--set", "serve.num_cpus_per_replica=0.5"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=dict(os.environ, RAY_TMPDIR=ray_tmp), start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).json().get("version") == "v0001":
                    break
            except (requests.RequestException, ValueError):  # not up yet: refused, or the proxy waits for the app
                pass
            time.sleep(2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "serve: stopped" in text and "Traceback" not in text, text[-3000:]
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # refused: the HTTP proxy is gone
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
