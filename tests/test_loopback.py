"""A local Ray started by `llmrec` listens on loopback only: a scan of every listening socket of its process tree
while Serve and a Ray Train process group are up (tests/loopback_probe.py, in a process of its own)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@dataclass(frozen=True)
class Allowed:
    """A socket that no Ray setting binds to loopback, named, with why and what guards it."""

    reason: str
    matches: Callable[[dict, dict], bool]  # (socket, probe report) -> is it this socket?


# Each entry is also described in README.md, "Network exposure".
ALLOWED = {
    "serve-replica-inter-deployment-grpc": Allowed(
        reason="Ray Serve starts a gRPC server in every replica for deployment-to-deployment calls and binds it "
               "with a hard-coded '[::]:0' (ray/serve/_private/replica.py, _on_initialized); no Serve or Ray "
               "option sets its host. It carries Ray's token-auth interceptor: calls without the cluster token "
               "are refused (asserted below).",
        matches=lambda s, r: s["process"].startswith("ray::ServeReplica") and _is_wildcard(s["ip"])),
    "torch-tcpstore": Allowed(
        reason="torch.distributed's TCPStore (the rendezvous of the gloo process group Ray Train sets up on rank 0, "
               "at MASTER_PORT) listens on every local address; neither torch nor Ray Train's TorchConfig has a bind "
               "host. It is up only while a training run lasts; the gloo connections themselves bind 127.0.0.1.",
        matches=lambda s, r: s["process"] == "ray::RayTrainWorker" and s["port"] == r["tcpstore_port"]),
}


def _is_wildcard(ip: str) -> bool:
    return ip in ("::", "0.0.0.0")


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback  # '::ffff:127.0.0.1': a v6 socket on 127.0.0.1


@pytest.fixture(scope="module")
def probe() -> dict:
    temp_dir = tempfile.mkdtemp(prefix="lbp-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}  # local Ray, default auth
    env.update({"RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    try:
        run = subprocess.run([sys.executable, str(REPO / "tests" / "loopback_probe.py"), str(free_port())], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("LOOPBACK_REPORT ")]
    assert run.returncode == 0 and lines, f"probe failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(lines[-1][len("LOOPBACK_REPORT "):])


def test_local_ray_serve_and_train_listen_on_loopback_only(probe):
    assert probe["node_ip"] == "127.0.0.1"
    assert probe["train_error"] is None
    sockets = probe["sockets"]
    # The scan saw every kind of process it claims to cover (else "nothing exposed" would prove nothing).
    seen = {s["process"] for s in sockets}
    for process in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ProxyActor",
                    "ray::RayTrainWorker", "loopback_probe.py"):
        assert process in seen, (process, sorted(seen))
    assert any(p.startswith("ray::ServeReplica") for p in seen), sorted(seen)
    assert any(s["port"] == probe["serve_port"] and s["ip"] == "127.0.0.1" for s in sockets)  # Serve on cfg.serve.host

    exposed = [s for s in sockets if not _is_loopback(s["ip"])]
    allowed = {name: [s for s in exposed if entry.matches(s, probe)] for name, entry in ALLOWED.items()}
    unexplained = [s for s in exposed if not any(s in hits for hits in allowed.values())]
    assert not unexplained, f"listening beyond loopback: {unexplained}"
    assert all(_is_wildcard(s["ip"]) for s in exposed)  # never a specific network interface's address
    print(f"\n{len(sockets)} listening sockets, {len(exposed)} beyond loopback: "
          + ", ".join(f"{name} x{len(hits)}" for name, hits in allowed.items()))


def test_replica_grpc_on_all_interfaces_refuses_calls_without_the_ray_token(probe):
    replica_wildcard = [s for s in probe["sockets"] if ALLOWED["serve-replica-inter-deployment-grpc"].matches(s, probe)]
    assert len(replica_wildcard) == 1  # one replica, one such server
    assert probe["unauthenticated_grpc"][str(replica_wildcard[0]["port"])] == "UNAUTHENTICATED"


def test_metrics_exporter_answers_on_loopback_only(probe):
    assert probe["metrics_on_loopback"]  # GET http://127.0.0.1:<port>/metrics is Ray's Prometheus exporter
    assert [s["ip"] for s in probe["sockets"] if s["port"] == probe["metrics_export_port"]] == ["127.0.0.1"]


def test_only_the_allow_list_answers_on_the_machines_network_address(probe):
    """A connection test, not just bind addresses: every scanned port tried on the machine's network IP."""
    if "reachable_from_network" not in probe:
        pytest.skip(f"this machine has no network address ({probe['network_ip']})")
    allowed_ports = {s["port"] for s in probe["sockets"] if any(e.matches(s, probe) for e in ALLOWED.values())}
    assert set(probe["reachable_from_network"]) <= allowed_ports, probe["reachable_from_network"]
    assert probe["serve_port"] not in probe["reachable_from_network"]
    print(f"\non {probe['network_ip']}: {len(probe['sockets'])} ports tried, open: {probe['reachable_from_network']}")
