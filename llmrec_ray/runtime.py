"""How an llmrec process runs: its environment, its Ray, and where Ray's and the libraries' output goes.

An entry point (the `llmrec` command, the tests' conftest, a benchmark script) calls `configure_environment()`
first: Ray and Hugging Face read these variables, and every process Ray starts inherits them. Then
`ensure_ray(cfg)` attaches to a cluster or starts a local one. `quiet_output(log_path)` keeps the terminal for
our own lines and progress bars: Ray's, Ray Data's, DeepSpeed's and the other libraries' logs and Python's
warnings go to the log file instead, and Ray's workers' output stays in Ray's session logs (`ensure_ray(cfg,
log_path)`); `llmrec -v` skips both and shows everything.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterator, MutableMapping, Optional

from llmrec_ray.config import Config

# Nothing is downloaded at run time: models come from installed packages or the store. Ray's workers inherit these
# from the driver. Setting them in the environment rather than in a runtime_env matters on small machines: workers
# with a runtime_env cannot come from Ray's prestarted pool, so every task and actor would start (and import) a
# second set of worker processes.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# A local Ray listens on loopback only. `_node_ip_address="127.0.0.1"` alone does nothing on Linux: Ray swaps a
# loopback node IP for the machine's reachable address (ray._private.services.resolve_ip_for_localhost) unless
# multi-node clusters are switched off -- Ray's default on macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# elsewhere. Then GCS, raylet, every worker, the dashboard and runtime-env agents and the metrics exporter bind
# 127.0.0.1. What no setting reaches is listed in README "Network exposure" and in tests/test_loopback.py.
# Not for a driver that attaches to a cluster: it would take 127.0.0.1 for its own node's address.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOCAL_RAY_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}  # a local Ray reports nothing (the caller may say otherwise)
LOOPBACK = "127.0.0.1"


def ray_address(cfg: Config) -> Optional[str]:
    """The cluster to attach to: cfg.ray.address, else RAY_ADDRESS (set under `ray job submit`); None: a local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS")


def configure_environment(local_ray: bool = True, environ: MutableMapping[str, str] = os.environ) -> None:
    """Put into `environ` what this process and every process its Ray starts need: WORKER_ENV (values already set
    win) and, when this process will start a local Ray, LOCAL_RAY_ENV. Call it before Ray starts."""
    for key, value in {**WORKER_ENV, **(LOCAL_RAY_DEFAULTS if local_ray else {})}.items():
        environ.setdefault(key, value)
    if local_ray:
        environ.update(LOCAL_RAY_ENV)


def local_num_cpus(cfg: Config) -> int:
    """Logical CPUs for a local Ray: the train workers' and the Serve replicas' own plus 4, or Ray Data's tasks starve
    ("backpressured ... ResourceBudget") while workers and replicas hold every CPU."""
    serve_cpus = 2 * cfg.serve.num_replicas * cfg.serve.num_cpus_per_replica
    return cfg.ray.num_cpus or int(cfg.train.num_workers * cfg.train.cpus_per_worker + serve_cpus + 4)


def start_local_ray(num_cpus: int, **init_kwargs):
    """Start a single-node Ray bound to 127.0.0.1 (the `llmrec` commands and the tests' session Ray); returns
    ray.init's context. Refuses unless configure_environment() ran, and if the node comes up on another address."""
    wrong = {key: os.environ.get(key) for key, value in LOCAL_RAY_ENV.items() if os.environ.get(key) != value}
    if wrong:
        raise RuntimeError(f"a local Ray started with {wrong} in the environment would listen on the network: call "
                           "llmrec_ray.runtime.configure_environment() first (it sets " + str(LOCAL_RAY_ENV) + ")")
    # Imported on use, here and in ensure_ray: commands that never start Ray do not pay for importing it.
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported ray before the variable was set
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOOPBACK,
                       _node_ip_address=LOOPBACK, **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray upgrade changed the switch: refuse to run exposed
        ray.shutdown()
        raise RuntimeError(f"local Ray came up on node IP {node_ip}, not {LOOPBACK}: it would listen on the "
                           f"network; check {LOCAL_RAY_ENV} against this Ray version (tests/test_loopback.py)")
    return context


def ensure_ray(cfg: Config, log_path: Optional[Path] = None) -> None:
    """Attach to a cluster (ray_address) or start a local Ray sized by local_num_cpus. log_path (this process's log
    under quiet_output): the workers' output stays in Ray's session logs instead of being relayed here, Ray Data
    draws no progress bars, and one line says where the logs are."""
    import ray  # on use: see start_local_ray
    from ray.data import DataContext

    quiet = log_path is not None
    if not ray.is_initialized():
        address = ray_address(cfg)
        if address:
            context = ray.init(address=address, log_to_driver=not quiet)
        else:
            context = start_local_ray(local_num_cpus(cfg), log_to_driver=not quiet)
        if quiet:
            print(f"ray: {'attached to ' + address if address else 'a local Ray on ' + LOOPBACK}; logs and warnings: "
                  f"{log_path}, Ray's workers: {Path(context.address_info['session_dir']) / 'logs'} (llmrec -v shows "
                  "them here)")
    DataContext.get_current().enable_progress_bars = not quiet


class _LogFile(io.TextIOBase):
    """A log file opened on its first write: a command that writes nothing to it leaves none behind."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self._file = path, None

    def write(self, text: str) -> int:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # line-buffered: `tail -f` follows it
        return self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        super().close()  # flushes first
        if self._file is not None:
            self._file.close()


# How Ray's driver prints a line on behalf of another process: "(raylet) ...", "(RayTrainWorker pid=12) ...", maybe
# coloured. log_to_driver=False stops the workers' output, but not what the raylet pushes to every driver, such as
# "(raylet) WARNING: 8 PYTHON worker processes have been started ..." (no setting silences it: ray-project/ray#63800).
_RAY_PRINTED = re.compile(r"(\x1b\[[0-9;]*m)*\((raylet|autoscaler|[^()\n]*pid=[^()\n]*)\)")


class _OurStdout(io.TextIOBase):
    """stdout under quiet_output: the lines Ray's driver prints for its other processes and the records of a logging
    handler bound to sys.stdout meanwhile (DeepSpeed binds one when it is imported: transformers imports it on a
    model's save) go to the log, the rest (ours: lines and progress bars) to the terminal. print() writes a line and
    its newline separately: a line that went to the log takes its newline along (from the same thread)."""

    def __init__(self, terminal, log: io.TextIOBase):
        super().__init__()
        self.terminal, self.log, self._to_log_thread = terminal, log, None

    def write(self, text: str) -> int:
        from_handler = isinstance(sys._getframe(1).f_locals.get("self"), logging.Handler)  # the caller: a handler's emit
        if self._to_log_thread is None and (from_handler or _RAY_PRINTED.match(text)):
            self._to_log_thread = threading.get_ident()
        if self._to_log_thread != threading.get_ident():
            return self.terminal.write(text)
        self.log.write(text)
        if text.endswith("\n"):
            self._to_log_thread = None
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()

    def isatty(self) -> bool:  # asked at exit too, by whoever kept this stream (Ray's colorama): maybe closed by then
        return not self.terminal.closed and self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()  # without importing Ray


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler or type(h).__name__ == "PlainRayHandler"]


@contextlib.contextmanager
def quiet_output(log_path: Path) -> Iterator[None]:
    """For the duration, whatever goes to stderr goes to `log_path`: the records of every logger (Ray, Ray Data,
    Ray Serve, Ray Train, DeepSpeed, transformers; also a handler bound to stdout before now), Python warnings and
    libraries' progress bars; so do the lines Ray prints for its raylet. stdout stays on the terminal: our own lines
    and progress bars. A Ray started meanwhile is shut down before the terminal is given back."""
    terminal, terminal_out, log = sys.stderr, sys.stdout, _LogFile(log_path)
    moved = {h: h.stream for h in _stream_handlers() if h.stream in (terminal, terminal_out)}
    for handler in moved:
        handler.setStream(log)
    sys.stderr, sys.stdout = log, _OurStdout(terminal_out, log)
    ray_was_up = _ray_is_up()
    try:
        yield
    finally:
        if _ray_is_up() and not ray_was_up:  # started meanwhile: it stops here, not at exit, or it would print there
            sys.modules["ray"].shutdown()
        sys.stderr, sys.stdout = terminal, terminal_out
        for handler in _stream_handlers():  # handlers made meanwhile took the log file as stderr: give it back
            if handler.stream is log:
                handler.setStream(moved.get(handler, terminal))
        log.close()
