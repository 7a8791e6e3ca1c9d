"""A private Ray Serve for the serving benchmarks (bench_serve, bench_flood, load_test): a file store holding the
tests' 30-item catalogue and hybrid exports (tests/test_serve.py's helpers), the first one promoted, and a local
Ray with Serve's HTTP proxy on 127.0.0.1."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_serve import _promote, _write_catalog, _write_export  # noqa: E402 - tests/ holds the fixture helpers

from llmrec_ray.runtime import configure_environment  # noqa: E402
from llmrec_ray.store import Store  # noqa: E402


def write_store(cfg, tmp: Path, biases: dict[str, float]) -> Store:
    """The catalogue and one export per version (its text part and tables shifted by its bias); the first promoted."""
    store = Store.from_config(cfg.store)
    _write_catalog(store)
    for version, bias in biases.items():
        _write_export(store, cfg, version, bias, tmp)
    first = next(iter(biases))
    _promote(store, first, [first])
    return store


def promote(store: Store, version: str, history: list[str]) -> None:
    _promote(store, version, history)


def start_ray_serve(port: int, num_cpus: int, prefix: str) -> str:
    """A local Ray (its own temp dir) and Serve's HTTP proxy on 127.0.0.1:port; returns the base URL."""
    import ray
    from ray import serve

    configure_environment()  # offline Hugging Face and Ray's variables, for this process and Ray's workers
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
