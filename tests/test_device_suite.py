"""benchmarks/device_suite.sh and scripts/build_wheelhouse.sh: the scripts' shape, the wheel list, the budgets, the
report, the benchmarks' flags the suite relies on, and (where scripts/build_wheelhouse.sh has built .whl/ and
.whl-cpu/) a short CPU dry run from the wheelhouse.

The whole dry run (every part, about 6 minutes on a busy 2-core machine) is the documented command:

    bash scripts/build_wheelhouse.sh && DEVICE_SUITE_DRY=1 bash benchmarks/device_suite.sh
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
SUITE = BENCHMARKS / "device_suite.sh"
WHEELHOUSE = REPO / "scripts" / "build_wheelhouse.sh"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


helper = _load("_device_suite")
bench = _load("bench_vs_original")


def _plan(dry: bool, **env) -> dict[str, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BUDGET_", "DEVICE_SUITE_"))}
    environment.update(env)
    if dry:
        environment["DEVICE_SUITE_DRY"] = "1"
    out = subprocess.run(["bash", str(SUITE), "--plan"], capture_output=True, text=True, check=True, env=environment)
    return {name: int(budget) for name, budget in (line.split() for line in out.stdout.splitlines())}


def _suite_setting(name: str, dry: bool) -> int:
    """A default of the suite's own (DEVICE_SUITE_TOTAL_S, RESERVE), read from the script's text."""
    text = SUITE.read_text()
    if name == "RESERVE":
        return int(re.search(r"^RESERVE=(\d+)", text, re.MULTILINE).group(1))
    values = re.findall(r"TOTAL=\$\{DEVICE_SUITE_TOTAL_S:-(\d+)\}", text)
    return int(values[0] if dry else values[1])


# ----------------------------------------------------------------------------------------------------------------------
# The scripts
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [SUITE, WHEELHOUSE])
def test_scripts_are_strict_bash_that_parses(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines[:40]
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_unknown_arguments_are_refused():
    for script in (SUITE, WHEELHOUSE):
        result = subprocess.run(["bash", str(script), "--nope"], capture_output=True, text=True)
        assert result.returncode == 2 and "usage" in result.stderr


def test_device_budgets_fit_nine_minutes_and_leave_of9b_its_start():
    plan = _plan(dry=False)
    assert list(plan) == ["install_ours", "install_original", "gpu_tests", "vs_original_of3b", "decode",
                          "train_step_of3b", "vs_original_of9b", "vs_original_of4b"]
    total, reserve = _suite_setting("TOTAL", dry=False), _suite_setting("RESERVE", dry=False)
    assert total <= 9 * 60
    before_of9b = sum(budget for name, budget in plan.items() if not name.startswith(("vs_original_of9b",
                                                                                       "vs_original_of4b")))
    assert before_of9b + reserve + 60 <= total  # of9b starts with at least a minute even if all use their budget


def test_budgets_can_be_set_per_part():
    assert _plan(dry=False, BUDGET_decode="7")["decode"] == 7
    assert _plan(dry=True)["decode"] > _plan(dry=False)["decode"]  # the shared CPU machine gets more time


def test_the_suite_writes_at_most_three_files_under_out():
    """The device tool returns at most 8 files from $OUT; the suite bundles the logs into one archive."""
    text = SUITE.read_text()
    written = set(re.findall(r'"\$OUT_DIR/([A-Za-z0-9_.-]+)"', text))
    assert written == {"summary.md", "results.json", "logs.tar.gz"}


def test_missing_wheelhouse_is_named(tmp_path):
    """Run from a copy without .whl/: the suite stops at once, naming the script that builds it."""
    copy = tmp_path / "repo"
    (copy / "benchmarks").mkdir(parents=True)
    for name in ("device_suite.sh", "_device_suite.py", "device_wheels.txt"):
        (copy / "benchmarks" / name).write_bytes((BENCHMARKS / name).read_bytes())
    result = subprocess.run(["bash", str(copy / "benchmarks" / "device_suite.sh")], capture_output=True, text=True,
                            env={**os.environ, "DEVICE_SUITE_PYTHON": sys.executable, "OUT": str(tmp_path / "out")})
    assert result.returncode == 1 and "scripts/build_wheelhouse.sh" in result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# The wheel list
# ----------------------------------------------------------------------------------------------------------------------


def test_wheel_list_pins_every_carried_wheel_and_never_torch():
    sides = helper.wheel_list()
    assert set(sides) == {"ours", "original", "provided"}
    for side in ("ours", "original"):
        names = [helper.pinned(r)[0] for r in sides[side]]
        assert len(names) == len(set(names)), side  # one version of each per side
        assert all(helper.pinned(r)[1] for r in sides[side]), side  # exact versions: the install is --no-deps
        assert not {"torch", "torchvision", "nvidia-cublas"} & set(names)  # the machine's own stay in use


def test_wheel_list_matches_pyproject_and_the_original_environment():
    from packaging.requirements import Requirement

    pyproject = (REPO / "pyproject.toml").read_text()
    ours = dict(helper.pinned(r) for r in helper.wheel_list()["ours"])
    transformers = Requirement(re.search(r'"(transformers[^"]*)"', pyproject).group(1))
    assert transformers.specifier.contains(ours["transformers"])
    original = dict(helper.pinned(r) for r in helper.wheel_list()["original"])
    setup = (REPO / "scripts" / "setup_original_env.sh").read_text()
    for name in ("transformers", "open-clip-torch", "open-flamingo"):
        assert original[name] in setup, name  # the versions .venv-original is built with


def _touch(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")


def test_missing_and_stale_wheels_by_interpreter_tags(tmp_path):
    _touch(tmp_path, "regex-2026.11.19-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
           "click-8.5.1-py3-none-any.whl", "wcwidth-0.9.4-cp310-abi3-manylinux2014_x86_64.whl",
           "click-8.4.0-py3-none-any.whl")
    requirements = ["regex==2026.11.19", "click==8.5.1", "wcwidth==0.9.4", "h11==0.16.0"]
    device = helper.device_tags("3.12")
    assert helper.missing_wheels([tmp_path], requirements, device) == ["h11==0.16.0"]
    assert helper.missing_wheels([tmp_path], requirements, helper.device_tags("3.11")) == [
        "regex==2026.11.19", "h11==0.16.0"]  # a cp312 wheel does not install on 3.11; abi3 cp310 does
    assert [p.name for p in helper.stale_wheels(tmp_path, requirements)] == ["click-8.4.0-py3-none-any.whl"]


def test_tree_with_the_wheelhouse_stays_under_64_mib():
    sizes = helper.tree_size([".whl"] if (REPO / ".whl").is_dir() else [])
    if not (REPO / ".whl").is_dir():
        pytest.skip(".whl missing: bash scripts/build_wheelhouse.sh")
    assert sizes["total_bytes"] < helper.TRAVEL_LIMIT, sizes


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------


def test_report_keeps_partial_rows_and_failures(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    parts = state / "parts"
    (parts / "decode").mkdir(parents=True)
    (parts / "decode" / "stdout.txt").write_text("| case | ms/token |\n|---|---|\n| eager dynamic | 1.0 |\n")
    (parts / "decode" / "result.json").write_text(json.dumps({"rows": [{"samples": {"long_s": [0.1]}}]}))
    (parts / "vs_original_of3b").mkdir()
    (parts / "vs_original_of3b" / "stdout.txt").write_text("")
    (parts / "vs_original_of3b" / "result.json").write_text(json.dumps({"partial": True, "table": "| greedy B=1 |"}))
    (parts / "train_step_of3b").mkdir()
    (parts / "train_step_of3b" / "stderr.txt").write_text("Traceback\nRuntimeError: CUDA out of memory\n")
    (state / "parts.tsv").write_text(
        "decode\tpassed\t0\t12.5\t40\t\tbench_decode.py --device cuda\n"
        "vs_original_of3b\ttimeout\t124\t150.0\t150\tstopped at its 150 s budget\tbench_vs_original.py\n"
        "train_step_of3b\tfailed\t1\t3.0\t60\texit status 1: RuntimeError\tbench_train_step.py\n"
        "vs_original_of4b\tskipped\t\t\t400\t90 s left\t\n")
    (state / "suite.json").write_text(json.dumps({"mode": "device", "total_s": 530, "elapsed_s": 300}))
    helper.report(state, out)
    summary = (out / "summary.md").read_text()
    assert "| decode | passed | 12.5 | 40 |" in summary and "| eager dynamic | 1.0 |" in summary
    assert "| vs_original_of3b | timeout | 150.0 | 150 | stopped at its 150 s budget |" in summary
    assert "(partial: the rows finished before the part stopped)" in summary and "| greedy B=1 |" in summary
    assert "RuntimeError: CUDA out of memory" in summary and "skipped: 90 s left" in summary
    results = json.loads((out / "results.json").read_text())
    assert [p["status"] for p in results["parts"]] == ["passed", "timeout", "failed", "skipped"]
    assert results["parts"][0]["result"]["rows"][0]["samples"]["long_s"] == [0.1]


def test_check_side_finds_a_target_package(tmp_path, capsys):
    """A fake distribution in a target folder, on sys.path first: found there; torch stays the interpreter's own."""
    target = tmp_path / "site"
    (target / "fakepkg").mkdir(parents=True)
    (target / "fakepkg" / "__init__.py").write_text("")
    info = target / "fakepkg-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.2\nRequires-Dist: nope-pkg>=1\n")
    sys.path.insert(0, str(target))
    try:
        assert helper.check_side("ours", target, ["fakepkg==1.2"], ["fakepkg"], tmp_path / "r.json") == 0
        assert helper.check_side("ours", target, ["fakepkg==1.3"], [], None) == 1
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("fakepkg", None)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["packages"][0]["from_target"] and "fakepkg needs nope-pkg>=1: missing" in (
        report["unsatisfied_requirements"])
    assert "| fakepkg | 1.2 | yes |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# The benchmarks' flags
# ----------------------------------------------------------------------------------------------------------------------


def test_original_interpreter_and_path_from_flags_or_environment(monkeypatch):
    settings, _ = bench.parse_settings(["--device", "cpu"])
    assert settings.original_python == bench.ORIGINAL_PYTHON and settings.original_path is None
    argv = ["--device", "cpu", "--original-python", "/x/python", "--original-path", "/a:/b"]
    settings, _ = bench.parse_settings(argv)
    assert settings.original_python == Path("/x/python") and settings.original_path == "/a:/b"
    monkeypatch.setenv(bench.ORIGINAL_PYTHON_ENV, "/y/python")
    monkeypatch.setenv(bench.ORIGINAL_PATH_ENV, "/t")
    settings, _ = bench.parse_settings(["--device", "cpu"])
    assert settings.original_python == Path("/y/python") and settings.original_path == "/t"


def test_worker_gets_its_own_path_never_ours(monkeypatch, tmp_path):
    launched = {}

    class FakePopen:
        def __init__(self, command, **kwargs):
            launched.update(command=command, env=kwargs["env"])

        def poll(self):
            return 0

    monkeypatch.setattr(bench.subprocess, "Popen", FakePopen)
    monkeypatch.setenv("PYTHONPATH", "/our/target")
    bench.OriginalWorker(python=Path(sys.executable), log_path=tmp_path / "w.log", path="/original/target").close()
    assert launched["command"][0] == sys.executable and launched["env"]["PYTHONPATH"] == "/original/target"
    bench.OriginalWorker(python=Path(sys.executable), log_path=tmp_path / "w.log").close()
    assert "PYTHONPATH" not in launched["env"]  # .venv-original: no path at all, as before


def test_missing_original_python_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--original-python", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and "--original-python" in capsys.readouterr().err


def test_partial_json_is_replaced_whole(tmp_path):
    path = tmp_path / "r.json"
    bench.partial_writer(path)("| table |", {"cases": [], "partial": True})
    assert json.loads(path.read_text()) == {"cases": [], "partial": True, "table": "| table |"}
    bench.write_json(path, {"cases": [1]})
    assert json.loads(path.read_text()) == {"cases": [1]} and not (tmp_path / "r.json.tmp").exists()


# ----------------------------------------------------------------------------------------------------------------------
# A short dry run from the wheelhouse (the install path, three parts, a part stopped by its budget)
# ----------------------------------------------------------------------------------------------------------------------

needs_wheelhouse = pytest.mark.skipif(not ((REPO / ".whl").is_dir() and (REPO / ".whl-cpu").is_dir()),
                                      reason=".whl/.whl-cpu missing: bash scripts/build_wheelhouse.sh")


@needs_wheelhouse
def test_short_dry_run_from_the_wheelhouse(tmp_path):
    """Both installs from the wheelhouse into temporary --target folders, the GPU tests (skipped on CPU), the decode
    benchmark, and the training-step benchmark stopped by a 3-second budget: the suite goes on, keeps every output,
    and fails overall because of the stopped part. About two minutes."""
    out = tmp_path / "out"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BUDGET_", "DEVICE_SUITE_"))}
    environment.update(OUT=str(out), DEVICE_SUITE_DRY="1", DEVICE_SUITE_PARTS="gpu_tests,decode,train_step_of3b",
                       BUDGET_train_step_of3b="3", TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, cwd=REPO, env=environment,
                            timeout=900)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    parts = {p["name"]: p for p in json.loads((out / "results.json").read_text())["parts"]}
    assert list(parts) == ["install_ours", "install_original", "gpu_tests", "decode", "train_step_of3b"]
    assert [parts[n]["status"] for n in parts] == ["passed"] * 4 + ["timeout"], result.stdout[-3000:]
    installed = {p["name"]: p for p in parts["install_ours"]["result"]["packages"]}
    assert installed["transformers"]["from_target"] and installed["openflamingo-hf"]["from_target"]
    assert not parts["install_ours"]["result"]["errors"]
    assert {p["name"] for p in parts["install_original"]["result"]["packages"]} >= {"transformers", "open-flamingo"}
    rows = parts["decode"]["result"]["rows"]
    assert rows[0]["case"] == "eager dynamic" and rows[0]["samples"]["long_s"]
    summary = (out / "summary.md").read_text()
    assert "| train_step_of3b | timeout |" in summary and "stopped at its 3 s budget" in summary
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = logs.getnames()
    assert "./parts/gpu_tests/junit.xml" in names and "./parts/train_step_of3b/stderr.txt" in names
    assert not list(tmp_path.glob("device-suite.*"))  # the temporary targets are removed after a dry run
