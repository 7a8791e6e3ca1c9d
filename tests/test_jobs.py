"""The Ray job entrypoints, submitted for real: a local Ray head (`ray start --head`, own ports and temp dir),
the Jobs API, the tiny synthetic config. Stopped by process group, never `ray stop`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from llmrec_ray.runtime import configure_environment
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on free ports, shared by this module's tests; yields a JobSubmissionClient."""
    tmp_path = tmp_path_factory.mktemp("rayhead")
    port, dash, agent = free_port(), free_port(), free_port()
    # The entrypoint's `python` must be this venv's (as with an activated venv or the cluster image).
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    configure_environment(environ=env)  # a single-node head on loopback only, offline, like cluster/local.yaml's
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the client must agree with the head
    temp_dir = Path("/tmp") / f"rayj{os.getpid()}{port}"  # short: Ray's socket paths have a length limit
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "4", "--port", str(port),
           "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp_dir),
           "--block"]
    log = open(tmp_path / "ray-head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Ray head did not start: {(tmp_path / 'ray-head.log').read_text()[-2000:]}")
                time.sleep(1)
        yield client
    finally:
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)  # `ray start --block` often outlives 30 s here; the group's SIGKILL leaves nothing behind
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


EXCLUDES = [".venv", ".git", "llmrec-store*", "**/__pycache__", ".pytest_cache", "*.png"]


def _submit(client, entrypoint: str) -> str:
    # The dashboard answers before its job agent registers: "No available agent to submit job" means retry.
    deadline = time.time() + 90
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
        except (RuntimeError, ConnectionError) as exc:  # requests' ConnectionError subclasses the builtin one
            if not ("No available agent" in str(exc) or isinstance(exc, ConnectionError)) or time.time() > deadline:
                raise
            time.sleep(2)


def _wait(client, job_id, timeout_s: float):
    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job did not finish in {timeout_s} s:\n" + client.get_job_logs(job_id)[-4000:]
        time.sleep(2)
    return status, client.get_job_logs(job_id)


def test_import_job_writes_shards(ray_head, tmp_path):
    store = tmp_path / "store"
    job_id = _submit(ray_head, f"python jobs/import_data.py --config jobs/configs/tiny-synth.yaml --set store.uri=file://{store}")
    status, logs = _wait(ray_head, job_id, 300)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert sorted((store / "interactions").rglob("*.parquet")), logs[-4000:]


def test_round_job_promotes_a_model(ray_head, tmp_path):
    store = tmp_path / "store"
    args = f"--config jobs/configs/tiny-synth.yaml --set store.uri=file://{store}"
    job_id = _submit(ray_head, f"python jobs/import_data.py synth {args} && python jobs/round.py {args}")
    status, logs = _wait(ray_head, job_id, 900)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    # The round trained and registered a candidate; the gate decided (a 10-step tiny model may not beat
    # chance, and then must NOT be promoted). The pointer exists exactly when the gate said promote.
    info = json.loads((store / "registry" / "versions" / "v0001" / "version.json").read_text())
    assert info["gate"]["decision"] in ("promote", "reject") and info["shards"], logs[-4000:]
    assert (store / "registry" / "promoted.json").is_file() == (info["gate"]["decision"] == "promote"), info["gate"]
    # the round deleted its Ray Train storage (checkpoints, staged tables) once the candidate's export was copied
    # out: each MiniLM round left ~0.5 GB there before
    left = [p for p in (store / "ray-train").rglob("*") if p.is_file()]
    assert not left, f"the round left its Ray Train storage behind: {left[:5]}"
