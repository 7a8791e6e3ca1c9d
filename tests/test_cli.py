import logging
import subprocess
import sys
import time

import pytest

from llmrec_ray import cli, commands
from llmrec_ray.cli import build_parser, config_from_args, main
from llmrec_ray.runtime import quiet_output
from llmrec_ray.store import Store
from tests.conftest import free_port, make_store_cfg


def test_overrides_and_store_shorthand(tmp_path):
    args = build_parser().parse_args(["round", "--store", str(tmp_path), "--set", "train.num_workers=3"])
    cfg = config_from_args(args)
    assert cfg.store.uri == f"file://{tmp_path}" and cfg.train.num_workers == 3  # local paths are made absolute


def test_demo_reads_its_config_file(tmp_path):
    cfg = config_from_args(build_parser().parse_args(["demo", "--store", str(tmp_path)]))
    assert cfg.model.max_seq_len == 64 and cfg.eval.gate_auc_tolerance == 0.02 and cfg.data.max_rows_per_round == 400
    other = build_parser().parse_args(["demo", "--config", str(cli.DEMO_CONFIG.parent / "tiny-synth.yaml")])
    assert config_from_args(other).model.backbone == "tiny" and other.rounds == 2


def test_quiet_output_keeps_our_lines_and_sends_the_rest_to_the_log(tmp_path, capsys):
    log = tmp_path / "logs" / "round.log"
    with quiet_output(log):
        print("nothing but our own line")
    assert not log.exists()  # nothing for the log: no file
    library = logging.getLogger("test-quiet-library")
    library.addHandler(logging.StreamHandler(sys.stderr))  # bound to the terminal before quiet_output, as Ray's are
    library.propagate = False
    with quiet_output(log):
        print("round 1/3: promote v0001")
        print("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: ...")
        print("(RayTrainWorker pid=12) step 3")
        library.warning("a library's warning")
        print("a library's progress bar", file=sys.stderr)
        deepspeed = logging.getLogger("test-quiet-deepspeed")  # as DeepSpeed's logger, made by an import meanwhile:
        deepspeed.propagate = False  # a handler bound to sys.stdout, DeepSpeed's format
        deepspeed.addHandler(logging.StreamHandler(sys.stdout))
        deepspeed.handlers[0].setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d] "
                                                             "%(message)s"))
        deepspeed.warning("Setting accelerator to CPU")
        print("round 2/3: keep v0001")
    library.warning("after")  # its handler is back on the terminal
    out = capsys.readouterr()
    assert out.out == "nothing but our own line\nround 1/3: promote v0001\nround 2/3: keep v0001\n" and out.err == "after\n"
    logged = log.read_text().splitlines()[1:]
    assert logged[:3] == ["(RayTrainWorker pid=12) step 3", "a library's warning", "a library's progress bar"]
    assert len(logged) == 4 and "] [WARNING] [test_cli.py:" in logged[3] and logged[3].endswith("] Setting accelerator to CPU")


def test_bad_config_key_is_a_clear_error(capsys):
    assert main(["round", "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "lr_first" in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["models", "list", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "llmrec_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "llmrec demo" in out.stdout


@pytest.mark.parametrize("argv", [["data", "import", "nosuch"], ["run"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_train_init_from_is_checked(tmp_path, capsys):
    assert main(["train", "--store", str(tmp_path), "--init-from", "latest"]) == 2
    assert "--init-from 'latest'" in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path), "--init-from", "v0042"]) == 3
    assert "no version 'v0042'" in capsys.readouterr().err


# --- clear errors: one line naming the problem and the fix, non-zero exit, nothing written, Ray not started ------
@pytest.fixture
def no_ray(monkeypatch):
    """Records every attempt to start (or attach to) Ray; a command under test must fail before one."""
    calls = []
    monkeypatch.setattr(commands, "ensure_ray", lambda cfg, log_path=None: calls.append(cfg))
    return calls


def _one_error_line(capsys) -> str:
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmrec: error: ") and "Traceback" not in out.err, out.err
    return lines[0]


S3_CASES = {  # name: (store overrides, words the message must hold)
    "wrong secret": ({"secret_access_key": "not-the-secret"}, ["rejected the credentials", "SignatureDoesNotMatch",
                                                              "AWS_SECRET_ACCESS_KEY", "store.access_key_id"]),
    "unknown key id": ({"access_key_id": "no-such-key"}, ["rejected the credentials", "InvalidAccessKeyId"]),
    "missing bucket": ({"bucket": "no-such-bucket"}, ["bucket 'no-such-bucket' does not exist", "create it"]),
    "unreachable endpoint": ({"endpoint_url": "closed-port"}, ["cannot reach the S3 endpoint", "store.endpoint_url"]),
}


@pytest.mark.s3
@pytest.mark.parametrize("case", sorted(S3_CASES))
@pytest.mark.parametrize("command", [["round"], ["data", "import", "movielens"]])
def test_s3_errors_are_one_line(case, command, s3_server, tmp_path, no_ray, capsys):
    good = make_store_cfg("s3", tmp_path, s3_server)
    bucket = good.uri.split("/")[2]
    store = {"endpoint_url": good.endpoint_url, "access_key_id": good.access_key_id,
             "secret_access_key": good.secret_access_key, "bucket": bucket}
    overrides, words = S3_CASES[case]
    store.update(overrides)
    if store["endpoint_url"] == "closed-port":
        store["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    argv = [*command, "--store", f"s3://{store['bucket']}/llmrec"] + [
        a for k in ("endpoint_url", "access_key_id", "secret_access_key") for a in ("--set", f"store.{k}={store[k]}")]
    assert main(argv) == 3
    line = _one_error_line(capsys)
    assert all(w in line for w in words), line
    assert "not-the-secret" not in line  # credentials are named, never printed
    assert no_ray == [] and s3_server["client"].list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


@pytest.mark.s3
def test_s3_errors_through_pyarrow_are_explained(s3_server, tmp_path):
    """Ray Data and the store's listings go through pyarrow, whose errors read differently from boto3's."""
    cfg = make_store_cfg("s3", tmp_path, s3_server).model_copy(update={"secret_access_key": "not-the-secret"})
    store = Store.from_config(cfg)
    with pytest.raises(OSError) as exc:
        store.list("interactions")
    assert "AWS Error" in str(exc.value)
    wrapped = RuntimeError("a Ray task failed")
    wrapped.__cause__ = exc.value
    for err in (exc.value, wrapped):  # a HEAD answered 403 without a body: bad keys and missing rights read the same
        message = str(store.explain(err))
        assert "S3 denied access" in message and "AWS_SECRET_ACCESS_KEY" in message, message
    assert store.explain(ValueError("unrelated")) is None


@pytest.mark.parametrize("override, words", [
    ("train.num_workers=[1", ["not valid YAML", "train.num_workers"]),
    ("train.lr_first=: x", ["not valid YAML", "train.lr_first"]),
    ("train.num_workers=abc", ["train.num_workers='abc'", "integer"]),
])
def test_malformed_set_value_is_one_line(override, words, tmp_path, no_ray, capsys):
    assert main(["round", "--store", str(tmp_path), "--set", override, "--set", "train.zero_stage=9"]) == 2
    line = _one_error_line(capsys)
    assert all(w in line for w in words), line
    assert no_ray == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["round"], ["run", "--rounds", "1"], ["train"], ["data", "status"],
                                  ["data", "ingest"], ["models", "list"], ["models", "promote", "v0001"],
                                  ["serve"], ["continuous"]])
def test_missing_store_fails_before_ray(argv, tmp_path, no_ray, capsys):
    missing = tmp_path / "no-such-store"
    assert main([*argv, "--store", str(missing)]) == 3
    line = _one_error_line(capsys)
    assert f"store file://{missing} does not exist" in line and "llmrec data import movielens" in line
    assert no_ray == [] and not missing.exists()


def test_missing_s3_store_fails_before_ray(s3_server, tmp_path, no_ray, capsys):
    cfg = make_store_cfg("s3", tmp_path, s3_server)  # the bucket exists, the prefix holds nothing
    assert main(["round", "--store", cfg.uri, "--set", f"store.endpoint_url={cfg.endpoint_url}",
                 "--set", f"store.access_key_id={cfg.access_key_id}",
                 "--set", f"store.secret_access_key={cfg.secret_access_key}"]) == 3
    assert f"store {cfg.uri} does not exist" in _one_error_line(capsys) and no_ray == []


def test_commands_that_create_a_store_do_not_need_one(tmp_path, capsys):
    store = tmp_path / "new-store"
    assert main(["data", "synth", "--store", str(store), "--set", "synth.num_events=500", "--set", "synth.num_users=50",
                 "--set", "synth.num_items=20", "--set", "synth.num_periods=2"]) == 0
    assert "imported synth" in capsys.readouterr().out and store.is_dir()


def test_train_init_from_is_rejected_before_anything_is_written(tmp_path, no_ray, capsys):
    assert main(["train", "--store", str(tmp_path), "--init-from", "x;y"]) == 2
    assert "--init-from 'x;y'" in _one_error_line(capsys)
    assert main(["train", "--store", str(tmp_path), "--init-from", "v0042"]) == 3
    assert "no version 'v0042'" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == [] and no_ray == []  # no ledger.json


def test_train_from_a_damaged_version_fails_before_ray(tmp_path, no_ray, capsys):
    from llmrec_ray.config import config_from_dict
    from llmrec_ray.model import build_model, save_export
    from llmrec_ray.registry import Registry, model_prefix

    store_dir = tmp_path / "store"
    assert main(["data", "import", "movielens", "--store", str(store_dir)]) == 0
    capsys.readouterr()
    cfg = config_from_dict({"model": {"backbone": "tiny", "max_seq_len": 32}})
    export = save_export(*build_model(cfg.model), cfg, tmp_path / "export")
    store = Store.from_config(make_store_cfg("file", tmp_path))  # the store imported above: tmp_path / "store"
    v = Registry(store).create_version(export, parent=None, shards=[])
    store.write_bytes(f"{model_prefix(v)}/config.json", b"{}")  # changed after registration
    capsys.readouterr()  # the libraries' lines while building the export
    assert main(["train", "--store", str(store_dir), "--init-from", v]) == 3
    line = _one_error_line(capsys)
    assert f"{v}: the model files" in line and "do not match the checksum" in line and no_ray == []


@pytest.mark.parametrize("argv", [["-v", "models", "list"], ["models", "list", "-v"], ["models", "list", "--verbose"]])
def test_verbose_adds_the_traceback(argv, tmp_path, capsys):
    assert main([*argv, "--store", str(tmp_path / "missing")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("llmrec: error: store ")


def test_unexpected_errors_are_one_line_too(tmp_path, monkeypatch, capsys):
    def broken(args, cfg):
        raise KeyError("boom")

    monkeypatch.setitem(cli.COMMANDS, "models", broken)
    assert main(["models", "list", "--store", str(tmp_path)]) == 1
    line = _one_error_line(capsys)
    assert "KeyError" in line and "boom" in line and "-v" in line


def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(args, cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "models", interrupted)
    monkeypatch.setitem(cli.COMMANDS, "serve", interrupted)
    assert main(["models", "list", "--store", str(tmp_path)]) == 130
    out = capsys.readouterr()
    assert out.err == "llmrec: interrupted\n" and out.out == ""  # no traceback
    assert main(["serve", "--store", str(tmp_path)]) == 0  # how `llmrec serve` is meant to stop
    out = capsys.readouterr()
    assert out.out.strip() == "serve: stopped" and out.err == ""
    assert main(["serve", "--store", str(tmp_path), "--set", "ray.address=ray://10.0.0.1:10001"]) == 0
    assert "keeps running on the Ray cluster at ray://10.0.0.1:10001" in capsys.readouterr().out


def test_serve_without_a_promoted_model_fails_before_ray(tmp_path, no_ray, capsys):
    # else Ray starts, Serve retries replicas that can never turn healthy, and reports "Deploying application failed"
    store = tmp_path / "store"
    assert main(["data", "import", "movielens", "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["serve", "--store", str(store)]) == 3
    line = _one_error_line(capsys)
    assert "nothing to serve" in line and "no promoted model" in line and "llmrec round" in line and not no_ray


def test_console_error_is_one_line_and_quick(tmp_path):
    """The real command in a fresh process: one line, exit 3, no Ray (a local Ray alone takes 3-5 s to start)."""
    missing = tmp_path / "nope"
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "llmrec_ray.cli", "round", "--store", str(missing)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "does not exist" in out.stderr and not missing.exists() and time.time() - start < 60


@pytest.mark.slow
@pytest.mark.ray
def test_what_outlives_a_killed_driver(tmp_path):
    """`kill -9` of an `llmrec` driver that started a local Ray: GCS, raylet, dashboard head, monitors and workers go
    at once (Ray starts them with PR_SET_PDEATHSIG, or they watch the raylet); the dashboard agent and the runtime-env
    agent, children of the raylet, notice within a second but then wait for Ray's 60 s timeout publishing "raylet
    died" to the dead GCS before they exit. No Ray setting shortens it (README: "When a driver is killed")."""
    import os
    import shutil
    import signal
    import tempfile

    import psutil

    store = tmp_path / "store"
    store.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="llmrec-kill-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llmrec_ray.cli", "continuous", "--store", str(store),
                             "--set", "ray.num_cpus=2", "--set", "continuous.poll_interval_s=5"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while "continuous: watching" not in (tmp_path / "driver.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-2000:]
            time.sleep(1)
        time.sleep(3)  # the raylet starts its agents and prestarted workers
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = {p.pid: " ".join(p.cmdline())[:200] for p in tree}
        assert any("raylet" in n for n in names.values()) and any("DashboardAgent" in n for n in names.values())
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def alive() -> dict[int, str]:
            return {p.pid: names[p.pid] for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}

        time.sleep(10)
        lingering = alive()
        assert all("ray::DashboardAgent" in n or "ray::RuntimeEnvAgent" in n for n in lingering.values()), lingering
        deadline = time.time() + 110
        while alive() and time.time() < deadline:
            time.sleep(2)
        assert not alive(), f"still alive {time.time() - deadline + 120:.0f} s after kill -9: {alive()}"
    finally:
        for p in tree:  # by PID, never `ray stop`
            try:
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
