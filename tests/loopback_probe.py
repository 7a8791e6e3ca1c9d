"""Run by tests/test_loopback.py in a process of its own (a second Ray cannot start inside pytest's).

Starts Ray exactly as the `llmrec` commands do (runtime.configure_environment + ensure_ray), puts on it what a round and `llmrec serve`
put on it -- Serve's proxy and a replica (on cfg.serve.host, as serve.run_serve binds it), a Ray Train gloo
process group over 2 workers, idle task workers -- and, while all of that is up, prints every listening TCP
socket of this process tree as one JSON line. Usage: python tests/loopback_probe.py SERVE_PORT
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time


def process_title(argv: list[str]) -> str:
    """'ray::RayTrainWorker', 'gcs_server', 'dashboard.py', ...: what a reader of the report needs."""
    if argv and argv[0].startswith("ray::"):
        return argv[0].split()[0]
    scripts = [a for a in argv if a.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else argv[0]) if argv else "?"


def listening_sockets() -> list[dict]:
    import psutil

    me = psutil.Process()
    rows = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            title, conns = process_title(proc.cmdline()), proc.net_connections(kind="inet")
        except psutil.Error:  # exited between listing and reading
            continue
        rows += [{"ip": c.laddr.ip, "port": c.laddr.port, "pid": proc.pid, "process": title}
                 for c in conns if c.status == psutil.CONN_LISTEN]
    return rows


def unauthenticated_grpc_call(port: int) -> str:
    """The status a gRPC call without Ray's auth token gets from a server on this port."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def reachable_ports(ip: str, ports: set[int]) -> list[int]:
    """The ports that accept a TCP connection on `ip` (the machine's network address)."""
    import socket

    open_ports = []
    for port in sorted(ports):
        try:
            socket.create_connection((ip, port), timeout=2).close()
            open_ports.append(port)
        except OSError:
            pass
    return open_ports


def train_loop(config: dict) -> None:
    """Hold the gloo process group open until the driver has scanned."""
    import torch.distributed as dist

    signals = pathlib.Path(config["signal_dir"])
    dist.barrier()
    if dist.get_rank() == 0:
        (signals / "master_port").write_text(os.environ["MASTER_PORT"])  # torch's TCPStore listens here
    (signals / f"ready{dist.get_rank()}").touch()
    deadline = time.time() + 300
    while not (signals / "scanned").exists() and time.time() < deadline:
        time.sleep(0.2)


def main(serve_port: int) -> None:
    import urllib.request

    import ray
    from ray import serve
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmrec_ray.config import load_config
    from llmrec_ray.runtime import configure_environment, ensure_ray

    cfg = load_config(None, ["ray.num_cpus=4"])
    configure_environment()
    ensure_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": serve_port})

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, request) -> str:
            return "ok"

    serve.run(Echo.bind(), name="probe", route_prefix="/probe")
    assert urllib.request.urlopen(f"http://{cfg.serve.host}:{serve_port}/probe", timeout=60).read() == b"ok"

    signals = pathlib.Path(tempfile.mkdtemp(prefix="loopback-probe-"))
    from ray._common.network_utils import node_ip_address_from_perspective

    report: dict = {"node_ip": ray.util.get_node_ip_address(), "serve_port": serve_port,
                    "metrics_export_port": ray.nodes()[0]["MetricsExportPort"],
                    "network_ip": node_ip_address_from_perspective(None)}  # the address Ray would use by default
    metrics_url = f"http://127.0.0.1:{report['metrics_export_port']}/metrics"
    report["metrics_on_loopback"] = b"# TYPE" in urllib.request.urlopen(metrics_url, timeout=30).read()

    def scan_while_training() -> None:
        try:
            while not all((signals / f"ready{r}").exists() for r in (0, 1)):
                time.sleep(0.2)
            time.sleep(1.0)  # let every process finish binding
            report["sockets"] = listening_sockets()
            report["tcpstore_port"] = int((signals / "master_port").read_text())
            replicas = [s for s in report["sockets"] if s["process"].startswith("ray::ServeReplica")]
            if not ipaddress.ip_address(report["network_ip"]).is_loopback:  # a machine with a network
                report["reachable_from_network"] = reachable_ports(report["network_ip"],
                                                                   {s["port"] for s in report["sockets"]})
            report["unauthenticated_grpc"] = {str(s["port"]): unauthenticated_grpc_call(s["port"]) for s in replicas}
        finally:
            (signals / "scanned").touch()

    scanner = threading.Thread(target=scan_while_training, daemon=True)
    scanner.start()
    result = TorchTrainer(train_loop, train_loop_config={"signal_dir": str(signals)},
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(storage_path=str(signals / "train"), name="probe")).fit()
    scanner.join(timeout=60)
    report["train_error"] = None if result.error is None else repr(result.error)
    print("LOOPBACK_REPORT " + json.dumps(report), flush=True)
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(signals, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
