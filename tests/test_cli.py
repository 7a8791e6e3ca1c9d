import subprocess
import sys

import pytest

from llmrec_ray.cli import build_parser, config_from_args, main


def test_overrides_and_store_shorthand(tmp_path):
    args = build_parser().parse_args(["round", "--store", str(tmp_path), "--set", "train.num_workers=3"])
    cfg = config_from_args(args)
    assert cfg.store.uri == f"file://{tmp_path}" and cfg.train.num_workers == 3  # local paths are made absolute


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
