"""The command line: help everywhere, listing plug-ins, and errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoseg.cli import build_parser, main

COMMANDS = [
    "example", "check", "fingerprint", "plan", "preprocess", "plan-and-preprocess", "list", "train", "evaluate",
    "plan-and-train", "find-best", "predict", "ensemble", "postprocess", "export-model", "import-model",
    "pretrain",
]  # fmt: skip


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: autoseg {command}" in out and len(out.splitlines()) > 3


def test_parser_knows_exactly_these_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)  # type: ignore[union-attr]


def test_console_script_help_is_fast_and_imports_no_torch():
    code = "import sys; from autoseg.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    result = subprocess.run([sys.executable, "-m", "autoseg", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "plan-and-preprocess" in result.stdout


def test_list_planners_and_normalizers(capsys):
    assert main(["list", "planners"]) == 0
    assert any(line.split()[0] == "default" for line in capsys.readouterr().out.splitlines())
    assert main(["list", "normalizers"]) == 0
    out = capsys.readouterr().out
    for name in ("ct", "none", "rescale_to_0_1", "zscore"):
        assert name in out


def test_unknown_planner_suggests_the_right_one(make_dataset, tmp_path, capsys):
    root = make_dataset()
    out = str(tmp_path / "pre")
    assert main(["-q", "fingerprint", str(root), "--preprocessed", out, "--num-workers", "1"]) == 0
    assert main(["plan", str(root), "--preprocessed", out, "--planner", "defualt"]) == 2
    err = capsys.readouterr().err
    assert "unknown planner 'defualt'. Did you mean 'default'" in err and "Traceback" not in err


def test_missing_preprocessed_folder_names_flag_and_variable(make_dataset, monkeypatch, capsys):
    monkeypatch.delenv("AUTOSEG_PREPROCESSED", raising=False)
    assert main(["fingerprint", str(make_dataset())]) == 2
    err = capsys.readouterr().err
    assert "--preprocessed" in err and "AUTOSEG_PREPROCESSED" in err


def test_missing_dataset_folder(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    from autoseg.errors import AutosegError

    with pytest.raises(AutosegError):
        main(["--debug", "check", str(tmp_path / "nope")])


def test_example_then_check_is_clean(tmp_path, capsys):
    assert main(["-q", "example", str(tmp_path), "--num-training", "3", "--num-test", "1", "--size", "24"]) == 0
    assert main(["-q", "check", str(tmp_path / "Dataset001_BrainPhantom"), "--num-workers", "1"]) == 0
    assert "OK (3 training, 1 test cases" in capsys.readouterr().out


def test_unwritable_output_is_a_message_not_a_traceback(make_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["-q", "fingerprint", str(make_dataset()), "--preprocessed", str(blocker), "--num-workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoseg: error:") and "a_file" in err and "Traceback" not in err


def test_list_trainers_and_networks(capsys):
    assert main(["list", "trainers"]) == 0
    assert any(line.split()[0] == "default" for line in capsys.readouterr().out.splitlines())
    assert main(["list", "networks"]) == 0
    assert "plain_unet" in capsys.readouterr().out
