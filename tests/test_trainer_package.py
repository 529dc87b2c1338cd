"""The `openflamingo_hf.trainer` package: what each module imports, its exports, the recipe's `TrainingArguments`."""

import dataclasses
import importlib
import subprocess
import sys
import textwrap

import pytest
from transformers import TrainingArguments

import openflamingo_hf.trainer as trainer_package
from openflamingo_hf.trainer import OpenFlamingoTrainingArguments

pytest.importorskip("datasets")
pytest.importorskip("webdataset")

RECIPE_DEFAULTS = {
    "learning_rate": 1e-4,
    "weight_decay": 0.1,
    "warmup_steps": 5000,
    "lr_scheduler_type": "constant_with_warmup",
    "remove_unused_columns": False,
}


def _modules_after_import(module: str) -> set[str]:
    """The `openflamingo_hf` / transformers-Trainer modules a fresh interpreter holds after importing `module`."""
    code = textwrap.dedent(f"""
        import sys
        import {module}
        print("\\n".join(name for name in sys.modules
                         if name.startswith("openflamingo_hf.") or name == "transformers.trainer"))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_writing_shards_does_not_import_the_recipe():
    loaded = _modules_after_import("openflamingo_hf.trainer.shard_writing")
    assert "openflamingo_hf.trainer.shard_writing" in loaded
    for recipe in ("openflamingo_hf.trainer.data", "openflamingo_hf.trainer.trainer",
                   "openflamingo_hf.trainer.finetune", "transformers.trainer"):
        assert recipe not in loaded, recipe


def test_the_training_arguments_module_does_not_import_the_trainer():
    loaded = _modules_after_import("openflamingo_hf.trainer.training_args")
    assert "openflamingo_hf.trainer.trainer" not in loaded and "openflamingo_hf.trainer.data" not in loaded


@pytest.mark.parametrize("name", trainer_package.__all__)
def test_every_export_is_the_object_its_module_defines(name):
    value = getattr(trainer_package, name)
    defining = importlib.import_module(f"openflamingo_hf.trainer.{trainer_package._MODULE_OF[name]}")
    assert value is getattr(defining, name)
    assert name in dir(trainer_package)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        trainer_package.no_such_name  # noqa: B018


def test_python_users_get_the_recipe_defaults(tmp_path):
    args = OpenFlamingoTrainingArguments(output_dir=str(tmp_path))
    plain = TrainingArguments(output_dir=str(tmp_path))
    for field, value in RECIPE_DEFAULTS.items():
        assert getattr(args, field) == value, field
        assert getattr(plain, field) != value, field  # so the defaults are the recipe's, not transformers'
    assert isinstance(args, TrainingArguments)


def test_the_command_line_uses_the_same_defaults(tmp_path):
    from openflamingo_hf.cli.train import build_parser

    _, _, parsed = build_parser().parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert type(parsed) is OpenFlamingoTrainingArguments
    python = OpenFlamingoTrainingArguments(output_dir=str(tmp_path))
    for field in dataclasses.fields(OpenFlamingoTrainingArguments):
        if field.init:
            assert getattr(parsed, field.name) == getattr(python, field.name), field.name
