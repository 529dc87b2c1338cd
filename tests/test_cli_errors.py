"""Error paths of `openflamingo-convert` and `openflamingo-export`: every usage problem is one `prog: error: ...` line
on stderr with exit status 2, found before anything is loaded; outputs are swapped in whole, never mixed with stale
files (tiny models, offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

import openflamingo_hf  # noqa: F401  (registers the Auto classes)
from openflamingo_hf import OpenFlamingoForConditionalGeneration, OpenFlamingoProcessor
from openflamingo_hf.cli import convert as convert_cli
from openflamingo_hf.convert import export_original_state_dict
from openflamingo_hf.hub import ExportError, export_for_hub
from openflamingo_hf.cli.export import main as export_main
from openflamingo_hf.processing.processing_openflamingo import default_image_processor
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, build_tiny_tokenizer
from openflamingo_hf.tiny_models import tiny_openflamingo_config, tiny_text_config

CONVERT = "openflamingo-convert: error:"
EXPORT = "openflamingo-export: error:"


def usage_error(main, argv: list[str], capsys) -> str:
    """Runs a CLI that must stop with argparse's exit status 2 and one line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    return err


def refuse(*args, **kwargs):
    raise AssertionError("a model, tokenizer or config was loaded before the arguments were checked")


@pytest.fixture
def nothing_loads(monkeypatch):
    """Early errors must come before any backbone, tokenizer or model is loaded."""
    for auto_class in (AutoConfig, AutoTokenizer, AutoModelForCausalLM, AutoModelForImageTextToText):
        monkeypatch.setattr(auto_class, "from_pretrained", refuse)


@pytest.fixture
def local_args(tmp_path) -> list[str]:
    """Arguments of a local conversion whose checkpoint is a valid file; the backbones are never reached."""
    torch.save({"perceiver.latents": torch.zeros(4, 8)}, tmp_path / "checkpoint.pt")
    return ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--language-model", str(tmp_path / "lm"),
            "--vision-model", str(tmp_path / "vision"), "--output", str(tmp_path / "out")]


# ----------------------------------------------------------------------------------------------------------------------
# openflamingo-convert: usage errors
# ----------------------------------------------------------------------------------------------------------------------


def test_convert_invalid_json_overrides(local_args, capsys, nothing_loads):
    err = usage_error(convert_cli.main, [*local_args, "--config-overrides", "{perceiver_num_heads: 8}"], capsys)
    assert err.startswith(CONVERT) and "--config-overrides is not valid JSON" in err


def test_convert_unknown_override_field(local_args, capsys, nothing_loads):
    overrides = json.dumps({"perceiver_num_head": 8, "cross_attn_head_dim": 16})
    err = usage_error(convert_cli.main, [*local_args, "--config-overrides", overrides], capsys)
    assert err.startswith(CONVERT)
    assert "'perceiver_num_head' is not a field" in err and "did you mean 'perceiver_num_heads'" in err
    assert "Fields that can be set:" in err and "cross_attn_ff_mult" in err


def test_convert_override_of_a_field_the_converter_sets(local_args, capsys, nothing_loads):
    err = usage_error(convert_cli.main, [*local_args, "--config-overrides", '{"eoc_token_id": 3}'], capsys)
    assert err.startswith(CONVERT) and "'eoc_token_id' cannot be overridden, it is taken from the tokenizer" in err


def test_convert_override_of_the_wrong_type(local_args, capsys, nothing_loads):
    err = usage_error(convert_cli.main, [*local_args, "--config-overrides", '{"perceiver_num_heads": "8"}'], capsys)
    assert err.startswith(CONVERT) and "perceiver_num_heads" in err and "expected int" in err


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_checkpoint(tmp_path: Path, kind: str) -> Path:
    state = {"perceiver.latents": torch.randn(64, 64), "perceiver.norm.weight": torch.randn(64)}
    if kind == "zip":
        torch.save(state, tmp_path / "checkpoint.pt")
        return truncated(tmp_path / "checkpoint.pt")
    if kind == "legacy":  # torch.save's pre-1.6 format: a plain pickle stream, only checked when it is read
        torch.save(state, tmp_path / "checkpoint.bin", _use_new_zipfile_serialization=False)
        return truncated(tmp_path / "checkpoint.bin")
    if kind == "safetensors":
        save_file(state, tmp_path / "checkpoint.safetensors")
        return truncated(tmp_path / "checkpoint.safetensors")
    if kind == "empty":
        (tmp_path / "checkpoint.pt").write_bytes(b"")
        return tmp_path / "checkpoint.pt"
    (tmp_path / "checkpoint.pt").write_bytes(b"<html>404 Not Found</html>")  # kind == "garbage"
    return tmp_path / "checkpoint.pt"


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "empty", "garbage"])
def test_convert_corrupt_checkpoint(tmp_path, capsys, nothing_loads, kind):
    checkpoint = write_checkpoint(tmp_path, kind)
    args = ["--checkpoint", str(checkpoint), "--language-model", str(tmp_path / "lm"), "--vision-model",
            str(tmp_path / "vision"), "--output", str(tmp_path / "out")]
    err = usage_error(convert_cli.main, args, capsys)
    assert err.startswith(CONVERT) and str(checkpoint) in err
    assert any(reason in err for reason in ("truncated or corrupt", "is empty", "is not a checkpoint"))
    assert not (tmp_path / "out").exists()


def test_convert_checkpoint_that_holds_no_state_dict(tmp_path, capsys, nothing_loads):
    torch.save([torch.zeros(2)], tmp_path / "checkpoint.pt")
    args = ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--language-model", str(tmp_path / "lm"),
            "--vision-model", str(tmp_path / "vision"), "--output", str(tmp_path / "out")]
    err = usage_error(convert_cli.main, args, capsys)
    assert err.startswith(CONVERT) and str(tmp_path / "checkpoint.pt") in err and "not a state dict" in err


def test_convert_output_is_a_file(tmp_path, local_args, capsys, nothing_loads):
    (tmp_path / "taken").write_text("a file")
    err = usage_error(convert_cli.main, [*local_args, "--output", str(tmp_path / "taken")], capsys)
    assert err.startswith(CONVERT) and f"--output: {tmp_path / 'taken'} exists and is not a folder" in err


def test_convert_output_under_a_file(tmp_path, local_args, capsys, nothing_loads):
    (tmp_path / "taken").write_text("a file")
    output = tmp_path / "taken" / "converted"
    err = usage_error(convert_cli.main, [*local_args, "--output", str(output)], capsys)
    assert err.startswith(CONVERT) and f"--output: Cannot write {output}" in err and "is a file, not a folder" in err


def read_only(monkeypatch, folder: Path) -> None:
    """The tests run as root, for whom every folder is writable: os.access is what the CLIs consult."""
    real_access = os.access

    def access(path, mode, **kwargs):
        if Path(path).absolute() == folder and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_convert_output_in_a_read_only_folder(tmp_path, local_args, capsys, monkeypatch, nothing_loads):
    (tmp_path / "locked").mkdir()
    read_only(monkeypatch, tmp_path / "locked")
    output = tmp_path / "locked" / "converted"
    err = usage_error(convert_cli.main, [*local_args, "--output", str(output)], capsys)
    assert err.startswith(CONVERT) and f"--output: Cannot write {output}" in err and "is not writable" in err


def test_convert_non_empty_output_without_overwrite(tmp_path, local_args, capsys, nothing_loads):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    err = usage_error(convert_cli.main, local_args, capsys)
    assert err.startswith(CONVERT) and "not empty (it holds notes.txt)" in err and "--overwrite" in err


def test_convert_unwritable_report(tmp_path, local_args, capsys, monkeypatch, nothing_loads):
    (tmp_path / "reports").mkdir()
    read_only(monkeypatch, tmp_path / "reports")
    report = tmp_path / "reports" / "report.json"
    err = usage_error(convert_cli.main, [*local_args, "--report", str(report)], capsys)
    assert err.startswith(CONVERT) and f"--report {report} cannot be written" in err

    err = usage_error(convert_cli.main, [*local_args, "--report", str(tmp_path)], capsys)
    assert err.startswith(CONVERT) and f"--report {tmp_path} is a folder" in err


def test_convert_unknown_option(local_args, capsys, nothing_loads):
    err = usage_error(convert_cli.main, [*local_args, "--shard-size", "1GB"], capsys)
    assert err.startswith(CONVERT) and "unrecognized arguments: --shard-size 1GB" in err


# ----------------------------------------------------------------------------------------------------------------------
# openflamingo-convert: outputs are swapped in whole
# ----------------------------------------------------------------------------------------------------------------------


def write_local_release(folder: Path):
    """A tiny original checkpoint with its backbones and tokenizer on disk; returns the model and the CLI arguments."""
    processor = OpenFlamingoProcessor(tokenizer=build_tiny_tokenizer())
    torch.manual_seed(0)
    text_config = tiny_text_config("gpt_neox", vocab_size=len(processor.tokenizer),
                                   pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=0, bos_token_id=0)
    config = tiny_openflamingo_config("gpt_neox", text_config=text_config)
    processor.update_model_config(config)
    model = OpenFlamingoForConditionalGeneration(config).eval()
    torch.save(export_original_state_dict(model), folder / "checkpoint.pt")
    model.language_model.save_pretrained(folder / "lm")
    model.vision_model.save_pretrained(folder / "vision")
    image_processor = default_image_processor()
    image_processor.size, image_processor.crop_size = {"shortest_edge": 30}, {"height": 30, "width": 30}
    image_processor.save_pretrained(folder / "vision")
    build_tiny_tokenizer().save_pretrained(folder / "tokenizer")
    overrides = {key: getattr(config, key) for key in
                 ("perceiver_num_heads", "perceiver_head_dim", "cross_attn_num_heads", "cross_attn_head_dim")}
    args = ["--language-model", str(folder / "lm"), "--vision-model", str(folder / "vision"),
            "--tokenizer", str(folder / "tokenizer"), "--config-overrides", json.dumps(overrides)]
    return model, args


def shifted_checkpoint(folder: Path) -> Path:
    """The same checkpoint with other Perceiver latents: a second conversion whose weights differ from the first."""
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    state["perceiver.latents"] = state["perceiver.latents"] + 1.0
    torch.save(state, folder / "checkpoint2.pt")
    return folder / "checkpoint2.pt"


@pytest.mark.parametrize("first, second", [("5GB", "300KB"), ("300KB", "5GB")], ids=["then-sharded", "then-single"])
def test_convert_overwrite_leaves_no_stale_weights(tmp_path, capsys, first, second):
    model, args = write_local_release(tmp_path)
    out = tmp_path / "out"
    assert convert_cli.main([*args, "--checkpoint", str(tmp_path / "checkpoint.pt"), "--output", str(out),
                             "--max-shard-size", first]) == 0
    first_files = {p.name for p in out.iterdir()}

    fresh = tmp_path / "fresh"
    checkpoint2 = str(shifted_checkpoint(tmp_path))
    assert convert_cli.main([*args, "--checkpoint", checkpoint2, "--output", str(fresh), "--max-shard-size", second]) == 0
    assert convert_cli.main([*args, "--checkpoint", checkpoint2, "--output", str(out), "--max-shard-size", second,
                             "--overwrite"]) == 0

    second_files = {p.name for p in out.iterdir()}
    assert second_files == {p.name for p in fresh.iterdir()} and first_files - second_files  # the stale ones are gone
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder left
    loaded = OpenFlamingoForConditionalGeneration.from_pretrained(out).state_dict()
    expected = {**model.state_dict(), "perceiver.latents": model.state_dict()["perceiver.latents"] + 1.0}
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())


def test_convert_write_failure_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    _, args = write_local_release(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous conversion")

    def disk_full(self, save_directory, *args, **kwargs):
        raise OSError(28, "No space left on device", str(Path(save_directory) / "tokenizer.json"))

    monkeypatch.setattr(OpenFlamingoProcessor, "save_pretrained", disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main([*args, "--checkpoint", str(tmp_path / "checkpoint.pt"), "--output", str(out), "--overwrite"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # after progress bars
    assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith(CONVERT)
    err = errors[0]
    assert f"Could not write {out}" in err and str(out / "tokenizer.json") in err and ".staging-" not in err
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the previous conversion"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------------------------------
# openflamingo-export
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path) -> Path:
    model, processor = build_tiny_model_and_processor("llama")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_export_missing_model_folder(tmp_path, capsys, nothing_loads):
    missing = tmp_path / "no" / "such" / "model"
    err = usage_error(export_main, ["--model", str(missing), "--output", str(tmp_path / "out")], capsys)
    assert err.startswith(EXPORT) and f"--model {missing}: no such folder" in err


def test_export_model_folder_without_config(tmp_path, capsys, nothing_loads):
    (tmp_path / "empty").mkdir()
    err = usage_error(export_main, ["--model", str(tmp_path / "empty"), "--output", str(tmp_path / "out")], capsys)
    assert err.startswith(EXPORT) and f"--model {tmp_path / 'empty'} has no config.json" in err


def test_export_output_is_a_file(saved_model, tmp_path, capsys, nothing_loads):
    (tmp_path / "taken").write_text("a file")
    err = usage_error(export_main, ["--model", str(saved_model), "--output", str(tmp_path / "taken")], capsys)
    assert err.startswith(EXPORT) and f"{tmp_path / 'taken'} exists and is not a folder" in err


def test_export_output_in_a_read_only_folder(saved_model, tmp_path, capsys, monkeypatch, nothing_loads):
    (tmp_path / "locked").mkdir()
    read_only(monkeypatch, tmp_path / "locked")
    output = tmp_path / "locked" / "hub"
    err = usage_error(export_main, ["--model", str(saved_model), "--output", str(output)], capsys)
    assert err.startswith(EXPORT) and f"Cannot write {output}" in err and "is not writable" in err


def test_export_non_empty_output_without_overwrite(saved_model, tmp_path, capsys, nothing_loads):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    err = usage_error(export_main, ["--model", str(saved_model), "--output", str(tmp_path / "out")], capsys)
    assert err.startswith(EXPORT) and "not empty (it holds notes.txt)" in err and "--overwrite" in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_export_unknown_option(saved_model, tmp_path, capsys, nothing_loads):
    err = usage_error(export_main, ["--model", str(saved_model), "--output", str(tmp_path / "o"), "--shards"], capsys)
    assert err.startswith(EXPORT) and "unrecognized arguments: --shards" in err


def test_export_write_failure_names_the_output_folder(tmp_path, monkeypatch):
    model, processor = build_tiny_model_and_processor("llama")
    out = tmp_path / "hub"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def permission_denied(save_directory, *args, **kwargs):
        raise OSError(13, "Permission denied", str(Path(save_directory) / "model.safetensors"))

    monkeypatch.setattr(model, "save_pretrained", permission_denied)
    with pytest.raises(ExportError) as error:
        export_for_hub(model, processor, out, overwrite=True)
    message = str(error.value)
    assert f"Could not write {out}" in message and str(out / "model.safetensors") in message
    assert "Permission denied" in message and ".staging-" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["hub"]  # the staging folder is gone
    assert (out / "config.json").read_text() == "{}"  # the previous export is untouched
