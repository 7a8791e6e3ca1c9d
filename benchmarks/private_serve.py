"""A private Ray Serve for the serving benchmarks: a file store holding the tests' 30-item catalogue and hybrid exports
(tests/test_serve.py's helpers), the first one promoted (bench_serve, bench_flood, load_test); a local Ray with Serve's
HTTP proxy on 127.0.0.1 and `run_quietly`, a benchmark's main with the libraries' output in a log file and our lines
on the terminal (those and bench_recommend)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_serve import _promote, _write_catalog, _write_export  # noqa: E402 - tests/ holds the fixture helpers

from llmrec_ray.runtime import configure_environment, quiet_output  # noqa: E402
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


def run_quietly(main: Callable[[], int], log_path: Path) -> int:
    """main() with Ray's, Serve's and the other libraries' output in `log_path` (llmrec_ray.runtime.quiet_output)
    and the benchmark's own lines on the terminal; returns main's exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"library logs: {log_path}", flush=True)
    with quiet_output(log_path):
        return main()
