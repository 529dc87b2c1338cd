"""A command whose optional dependencies are missing says which extra to install, in one line, before any work."""

import importlib.util

import pytest

from openflamingo_hf.cli import eval as eval_cli
from openflamingo_hf.cli import main as main_cli
from openflamingo_hf.cli import train as train_cli


def _without(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def _no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the missing extra was reported")

    monkeypatch.setattr(train_cli, "load_processor", fail)
    monkeypatch.setattr(eval_cli, "run", fail)
    monkeypatch.setattr(main_cli, "build_video_inputs", fail)


@pytest.mark.parametrize(
    "command, argv, missing, extra",
    [
        (train_cli.main, ["--model_name_or_path", "org/model", "--finetune_data", __file__, "--output_dir", "o"],
         ("datasets",), "train"),
        (train_cli.main, ["--vision_model", "org/v", "--language_model", "org/l", "--laion_shards", "a.tar",
                          "--mmc4_shards", "b.tar", "--max_steps", "5", "--output_dir", "o"], ("webdataset",), "train"),
        (eval_cli.main, ["--embedded_world", "world"], ("pycocoevalcap",), "eval"),
        (main_cli.main, ["generate", "--video", __file__], ("av",), "video"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys, tmp_path, command, argv, missing, extra):
    monkeypatch.chdir(tmp_path)
    _without(monkeypatch, *missing)
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"pip install 'openflamingo-hf[{extra}]'" in err and missing[0] in err, err
