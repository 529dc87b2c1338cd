"""The package's commands answer fast: `--help`, `--version` and argument errors load no torch, the library never
imports the command modules, `import openflamingo_hf` still registers every Auto class, and a Hub id that cannot be
downloaded fails in one line instead of minutes of retries. Every check runs in a fresh interpreter, since a test
process has torch loaded already."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import openflamingo_hf

SRC = Path(openflamingo_hf.__file__).parents[1]
PACKAGE_DIR = SRC / "openflamingo_hf"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env or ENV,
                          timeout=timeout)


# Runs `main(argv)` of a command module as its console script does, then reports whether torch was imported.
RUN_COMMAND = """
import json, sys
module, argv = sys.argv[1], sys.argv[2:]
main = __import__(module, fromlist=["main"]).main
try:
    code = main(argv)
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def run_command(module: str, *argv: str) -> tuple[int, bool, str]:
    """(exit status, torch imported, stderr without the report line) of a command run in a fresh interpreter."""
    completed = run_python(RUN_COMMAND, module, *argv)
    *err, report = completed.stderr.strip().splitlines()
    result = json.loads(report)
    return result["code"], result["torch"], "\n".join(err)


@pytest.mark.parametrize(
    "module, argv, status",
    [
        ("openflamingo_hf.cli.main", ["--help"], 0),
        ("openflamingo_hf.cli.main", ["--version"], 0),
        ("openflamingo_hf.cli.main", ["generate", "--help"], 0),
        ("openflamingo_hf.cli.main", ["generate", "--max_new_tokens", "0"], 2),
        ("openflamingo_hf.cli.main", ["generate", "--image", "no-such-image.png"], 2),
        ("openflamingo_hf.cli.main", ["frobnicate"], 2),
        ("openflamingo_hf.cli.main", ["export", "--help"], 0),
        ("openflamingo_hf.cli.main", ["serve", "--help"], 0),
        ("openflamingo_hf.cli.main", ["serve", "--port", "70000"], 2),
        ("openflamingo_hf.cli.export", ["--model", "no/such/folder/x", "--output", "out"], 2),
        ("openflamingo_hf.cli.export", ["--bogus"], 2),
        ("openflamingo_hf.cli.main", ["eval", "--help"], 0),
        ("openflamingo_hf.cli.main", ["eval", "--shots", "-1"], 2),
        ("openflamingo_hf.cli.eval", ["--help"], 0),
        ("openflamingo_hf.cli.eval", ["--bogus"], 2),
        ("openflamingo_hf.cli.eval", ["--eval_vqav2", "--vqav2_dataset", "data", "--shots", "-1"], 2),
        ("openflamingo_hf.cli.eval", ["--eval_coco"], 2),
        ("openflamingo_hf.cli.eval", ["--embedded_world", "world", "--num_trials", "4"], 2),
    ],
)
def test_help_version_and_argument_errors_load_no_torch(module, argv, status):
    code, torch_loaded, err = run_command(module, *argv)
    assert code == status, err
    assert not torch_loaded, f"{module} {' '.join(argv)} imported torch"
    if status == 2:
        assert len(err.splitlines()) == 1 and ": error: " in err, err


@pytest.mark.parametrize(
    "module, argv, status",
    [
        ("openflamingo_hf.cli.main", ["releases"], 0),
        ("openflamingo_hf.cli.main", ["convert", "--help"], 0),
        ("openflamingo_hf.cli.convert", ["--output", "out"], 2),
    ],
)
def test_release_commands_load_no_torch(module, argv, status):
    # These read the release facts (`openflamingo_hf.release_data`, plain JSON), which import neither torch nor
    # transformers.
    code, torch_loaded, err = run_command(module, *argv)
    assert code == status, err
    assert not torch_loaded, f"{module} {' '.join(argv)} imported torch"


def test_module_entry_point_loads_no_torch_for_version():
    """`python -m openflamingo_hf.cli` (runpy) is a command start too: `-X importtime` lists every import."""
    completed = subprocess.run([sys.executable, "-X", "importtime", "-m", "openflamingo_hf.cli", "--version"],
                               capture_output=True, text=True, env=ENV, timeout=240)
    assert completed.returncode == 0 and completed.stdout.startswith("openflamingo "), completed.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines() if "|" in line]
    assert "openflamingo_hf.cli.main" in imported
    assert "torch" not in imported


def test_import_registers_every_auto_class_and_loads_no_command_module():
    code = """
import json, sys
import openflamingo_hf
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
config = AutoConfig.for_model("openflamingo")
mosaic = AutoConfig.for_model("mosaic_gpt")
names = {
    "config": type(config).__name__,
    "model": AutoModel._model_mapping[type(config)].__name__,
    "image_text_to_text": AutoModelForImageTextToText._model_mapping[type(config)].__name__,
    "processor": PROCESSOR_MAPPING[type(config)].__name__,
    "mosaic_config": type(mosaic).__name__,
    "mosaic_causal_lm": AutoModelForCausalLM._model_mapping[type(mosaic)].__name__,
}
ours = [name for name in sys.modules if name.startswith("openflamingo_hf")]
exported = {name: getattr(openflamingo_hf, name).__name__ for name in openflamingo_hf.__all__}
print(json.dumps({"names": names, "ours": ours, "exported": exported}))
"""
    completed = run_python(code)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["names"] == {
        "config": "OpenFlamingoConfig",
        "model": "OpenFlamingoModel",
        "image_text_to_text": "OpenFlamingoForConditionalGeneration",
        "processor": "OpenFlamingoProcessor",
        "mosaic_config": "MosaicGPTConfig",
        "mosaic_causal_lm": "MosaicGPTForCausalLM",
    }
    assert result["exported"] == {name: name for name in openflamingo_hf.__all__}
    command_modules = [name for name in result["ours"] if name.startswith("openflamingo_hf.cli")]
    assert not command_modules, command_modules
    argparse_based = [name for name in result["ours"] if _uses_argparse(name)]
    assert not argparse_based, argparse_based


def _uses_argparse(module_name: str) -> bool:
    path = PACKAGE_DIR.joinpath(*module_name.split(".")[1:])
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return file.is_file() and any(word in file.read_text() for word in ("import argparse", "HfArgumentParser"))


def test_a_command_module_registers_on_demand():
    """A command process imports the package lazily; `register_auto_classes` (what the commands call before loading
    a model) and the first use of a class register the Auto classes."""
    code = """
import sys
import openflamingo_hf.cli.main
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
before = "openflamingo" in CONFIG_MAPPING
from openflamingo_hf import OpenFlamingoConfig
print(before, "openflamingo" in CONFIG_MAPPING, CONFIG_MAPPING["openflamingo"] is OpenFlamingoConfig)
"""
    completed = run_python(code)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["False", "True", "True"]


def test_no_library_module_imports_the_commands():
    offenders = []
    for path in PACKAGE_DIR.rglob("*.py"):
        relative = path.relative_to(PACKAGE_DIR)
        if relative.parts[0] == "cli":
            continue
        package = ["openflamingo_hf", *relative.parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            offenders += [f"{relative}:{node.lineno} {name}" for name in names
                          if name == "openflamingo_hf.cli" or name.startswith("openflamingo_hf.cli.")]
    assert not offenders, offenders


@pytest.fixture
def unreachable_hub(tmp_path):
    """An empty Hugging Face cache and a Hub endpoint that refuses connections."""
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["-m", "openflamingo_hf.cli.main", "generate", "--model", "fake-org/no-such-model", "--prompt", "hi"],
         "openflamingo generate"),
        (["-m", "openflamingo_hf.cli.export", "--model", "fake-org/no-such-model", "--output", "OUT"],
         "openflamingo-export"),
        (["-m", "openflamingo_hf.cli.train", "--model_name_or_path", "fake-org/no-such-model", "--finetune_data",
          "DATA", "--output_dir", "OUT"], "openflamingo-train"),
        (["-m", "openflamingo_hf.cli.eval", "--model", "fake-org/no-such-model", "--eval_vqav2", "--vqav2_dataset",
          "OUT"], "openflamingo-eval"),
    ],
    ids=["generate", "export", "train", "eval"],
)
def test_unreachable_hub_id_fails_fast_in_one_line(argv, prog, unreachable_hub, tmp_path):
    (tmp_path / "data.jsonl").write_text('{"prompt": "<image>Q", "answer": "A", "images": []}\n')
    argv = [arg.replace("OUT", str(tmp_path / "out")).replace("DATA", str(tmp_path / "data.jsonl")) for arg in argv]
    start = time.monotonic()
    completed = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=unreachable_hub,
                               timeout=240)
    elapsed = time.monotonic() - start
    assert completed.returncode == 2, completed.stderr[-2000:]
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith(f"{prog}: error:") and "fake-org/no-such-model" in line and "cannot be reached" in line
    # The command's own start (imports) takes a few seconds on a busy machine; one refused connection adds nothing.
    assert elapsed < 60, elapsed


def test_offline_mode_names_the_uncached_id(unreachable_hub):
    env = {**unreachable_hub, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "openflamingo_hf.cli.main", "generate", "--model", "fake-org/no-such-model"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert completed.returncode == 2
    (line,) = completed.stderr.strip().splitlines()
    assert "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


def test_unknown_hub_repository_is_named_at_once(unreachable_hub):
    """A Hub that answers "no such repository" (a local stand-in server): one line saying so, nothing loaded."""
    import http.server
    import threading

    class NoSuchRepository(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepository)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**unreachable_hub, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        completed = subprocess.run(
            [sys.executable, "-m", "openflamingo_hf.cli.main", "generate", "--model", "fake-org/no-such-model"],
            capture_output=True, text=True, env=env, timeout=240,
        )
    finally:
        server.shutdown()
    assert completed.returncode == 2
    (line,) = completed.stderr.strip().splitlines()
    assert line.startswith("openflamingo generate: error: --model fake-org/no-such-model: no such repository")
