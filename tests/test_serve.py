"""Ray Serve app over real HTTP on 127.0.0.1: scoring, limits, auth, hot swap without failed requests, refused loads."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
import requests



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


def _write_export(store, cfg, version: str, bias: float, tmp_path, corrupt: bool = False):
    """A hybrid export (text part + tables over the catalogue's 30 items) whose two parts both depend on `bias`,
    so a response computed from the text part of one version and the tables of another is recognisable."""
    import torch

    from llmrec_ray.collab import CollabNet, ItemVocab
    from llmrec_ray.model import HybridScorer, build_model, save_export

    lm, tok = build_model(cfg.model)
    with torch.no_grad():
        lm.classifier.bias.fill_(bias)
    collab = CollabNet(30, cfg.model.collab.dim)
    with torch.no_grad():
        collab.mu.fill_(-2.0 * bias)
        collab.item_bias.weight[1:].fill_(0.3 * bias)
    model = HybridScorer(lm, collab, ItemVocab(str(i) for i in range(1, 31)))
    out = save_export(model, tok, cfg, tmp_path / "exports" / version)
    if corrupt:
        (out / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    store.upload_dir(out, f"registry/versions/{version}/model")
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
    cur = store.read_json("registry/promoted.json")
    store.put_json("registry/promoted.json", {"version": version, "model_prefix": f"registry/versions/{version}/model",
                                              "history": history, "updated_at": time.time()}, cur.etag)


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
                  "max_candidates": 20, "max_history": 5, "max_text_chars": 100, "max_body_bytes": 4000,
                  "max_batch_size": 16, "batch_wait_timeout_s": 0.005, "auth_token_env": "LLMREC_TEST_TOKEN_UNSET"},
    })
    store = Store.from_config(cfg.store)
    _write_catalog(store)
    exports = {v: _write_export(store, cfg, v, b, tmp) for v, b in (("v0001", -1.0), ("v0002", 1.0))}
    _write_export(store, cfg, "v0003", 0.0, tmp, corrupt=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"cfg": cfg, "store": store, "url": f"http://127.0.0.1:{port}", "exports": exports}
    serve.shutdown()


@pytest.fixture
def app(serve_env, monkeypatch):
    """A fresh app on v0001 for each test (deleted afterwards; Serve itself keeps running)."""
    from ray import serve

    from llmrec_ray.serve import APP_NAME, build_app

    _promote(serve_env["store"], "v0001", ["v0001"])
    serve.run(build_app(serve_env["cfg"]), name=APP_NAME, route_prefix="/")
    yield serve_env
    serve.delete(APP_NAME)


def _post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=30, **kw)


def test_score_recommend_model_metrics(app):
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

    info = requests.get(url + "/v1/model", timeout=10).json()
    assert info["version"] == "v0001" and info["last_load_error"] is None and info["lineage"] == ["v0001"]
    assert requests.get(url + "/healthz", timeout=10).json()["status"] == "ok"
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert 'llmrec_requests_total{path="/v1/score"}' in metrics and "llmrec_model_failed_loads_total 0" in metrics
    assert requests.get(url + "/docs", timeout=10).status_code == 200


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
]


def test_score_client_errors(app):
    for body, status, needle in CLIENT_ERRORS:  # one app for all cases: an app deploy costs ~15 s here
        r = _post(app["url"], "/v1/score", body)
        assert r.status_code == status, (body, r.text)
        assert needle in r.json()["error"], (body, r.text)


def test_other_client_errors(app):
    url = app["url"]
    r = requests.post(url + "/v1/score", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code in (400, 422) and "Traceback" not in r.text
    r = requests.post(url + "/v1/score", data=b"", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code in (400, 422)
    r = _post(url, "/v1/recommend", {"history": [], "pool": "all", "k": 5})  # 30 items > max_candidates=20
    assert r.status_code == 422 and "max_candidates=20" in r.json()["error"]
    r = _post(url, "/v1/recommend", {"history": [], "pool": {"genre": "Western"}, "k": 5})
    assert r.status_code == 422 and "Western" in r.json()["error"]
    r = _post(url, "/v1/recommend", {"history": [], "pool": ["1", "404"], "k": 1})
    assert r.status_code == 422 and "'404'" in r.json()["error"]
    r = _post(url, "/v1/recommend", {"history": [], "pool": ["1"], "k": 0})
    assert r.status_code == 422 and "k" in r.json()["error"]
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert 'llmrec_request_failures_total{path="/v1/recommend",code="422"}' in metrics


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
    url = app["url"]
    body = {"history": ["1"], "candidates": ["2", "3"]}
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
