"""Helpers of benchmarks/device_suite.sh and scripts/build_wheelhouse.sh (standard library only, plus `packaging`,
taken from pip's vendored copy where it is not installed, so that any interpreter with pip can run them).

    python benchmarks/_device_suite.py wheels SIDE                  # the requirements of one side of device_wheels.txt
    python benchmarks/_device_suite.py missing-wheels --dir DIR [--python 3.12] REQ...  # REQs with no wheel there
    python benchmarks/_device_suite.py stale-wheels DIR REQ...      # wheels in DIR that no REQ names
    python benchmarks/_device_suite.py missing-dists REQ...          # REQs this python does not have (any version)
    python benchmarks/_device_suite.py check-side ...               # after an install: what imports from where
    python benchmarks/_device_suite.py machine PATH                 # the machine (python, torch, GPU) as JSON
    python benchmarks/_device_suite.py report STATE OUT             # summary.md + results.json from the parts run
    python benchmarks/_device_suite.py tree-size [--json] [CARRY...]  # what would travel to a device machine
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEEL_LIST = REPO / "benchmarks" / "device_wheels.txt"
TRAVEL_LIMIT = 64 * 2**20  # what may travel to the device machine: the tree plus carried paths

try:  # pragma: no cover - which copy is found depends on the interpreter
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags, sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import compatible_tags, cpython_tags, sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version


# ----------------------------------------------------------------------------------------------------------------------
# The wheel list
# ----------------------------------------------------------------------------------------------------------------------


def wheel_list(path: Path = WHEEL_LIST) -> dict[str, list[str]]:
    """{side: [requirement, ...]} from device_wheels.txt (comments and blank lines skipped)."""
    sides: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected 'SIDE REQUIREMENT', got {line!r}")
        sides.setdefault(fields[0], []).append(fields[1])
    return sides


def pinned(requirement: str) -> tuple[str, str | None]:
    """(canonical name, exact version or None) of `name==version` / `name`."""
    parsed = Requirement(requirement)
    versions = [s.version for s in parsed.specifier if s.operator == "=="]
    return canonicalize_name(parsed.name), (versions[0] if versions else None)


def device_tags(python: str) -> set:
    """The wheel tags a CPython `python` (e.g. "3.12") on manylinux x86-64 accepts, as `pip download --platform
    manylinux_2_N_x86_64 ...` asks for them."""
    version = tuple(int(part) for part in python.split(".")[:2])
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return set(cpython_tags(version, platforms=platforms)) | set(compatible_tags(version, platforms=platforms))


def stale_wheels(directory: Path, requirements: list[str]) -> list[Path]:
    """Wheels in `directory` that no requirement names (by name, and by version where it is pinned)."""
    wanted = [pinned(r) for r in requirements]
    stale = []
    for wheel in sorted(directory.glob("*.whl")):
        try:
            name, version, _, _ = parse_wheel_filename(wheel.name)
        except ValueError:
            stale.append(wheel)
            continue
        if not any(name == n and (v is None or Version(v) == version) for n, v in wanted):
            stale.append(wheel)
    return stale


def missing_wheels(directories: list[Path], requirements: list[str], tags: set | None = None) -> list[str]:
    """The requirements that no wheel in `directories` satisfies for `tags` (default: this interpreter's)."""
    tags = set(sys_tags()) if tags is None else tags
    found: dict[str, set[str]] = {}
    for directory in directories:
        for wheel in Path(directory).glob("*.whl") if Path(directory).is_dir() else []:
            try:
                name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
            except ValueError:
                continue
            if wheel_tags & tags:
                found.setdefault(str(name), set()).add(str(version))
    missing = []
    for requirement in requirements:
        name, version = pinned(requirement)
        have = found.get(name, set())
        if not have or (version is not None and Version(version) not in {Version(v) for v in have}):
            missing.append(requirement)
    return missing


def missing_dists(requirements: list[str]) -> list[str]:
    """The requirements whose distribution this interpreter does not have at all (any version counts)."""
    missing = []
    for requirement in requirements:
        try:
            importlib.metadata.version(Requirement(requirement).name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    return missing


# ----------------------------------------------------------------------------------------------------------------------
# After an install
# ----------------------------------------------------------------------------------------------------------------------


def _inside(path: str | os.PathLike | None, directory: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(directory)
        return True
    except ValueError:
        return False


def unsatisfied_requirements(target: Path) -> list[str]:
    """For each distribution installed in `target`: its requirements that what this interpreter sees first does not
    meet (extras left out). Advisory: --no-deps installs leave some on purpose (open-flamingo's torch==2.0.1 pin)."""
    problems = []
    for dist in importlib.metadata.distributions(path=[str(target)]):
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {requirement}: missing")
                continue
            if requirement.specifier and not requirement.specifier.contains(found, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {requirement}: found {found}")
    return sorted(set(problems))


def check_side(side: str, target: Path, expect: list[str], imports: list[str], out: Path | None) -> int:
    """
    Whether a side's install is what it should be: each expected distribution is the one this interpreter finds first,
    at the expected version, from `target`; torch is the machine's own, not in `target`; `imports` import. Prints a
    Markdown table, writes the details as JSON, returns 0 when all hold.
    """
    target = target.resolve()
    report: dict = {"side": side, "target": str(target), "python": platform.python_version(), "packages": [],
                    "errors": []}
    for requirement in expect:
        name, version = pinned(requirement)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            report["errors"].append(f"{name}: not found")
            continue
        where = Path(str(dist.locate_file("")))
        entry = {"name": name, "version": dist.version, "from_target": _inside(where, target), "location": str(where)}
        report["packages"].append(entry)
        if version is not None and Version(dist.version) != Version(version):
            report["errors"].append(f"{name}: {dist.version} is found first, not {version}")
        if not entry["from_target"]:
            report["errors"].append(f"{name}: found outside the target ({where})")
    torch_spec = importlib.util.find_spec("torch")
    torch_origin = torch_spec.origin if torch_spec else None
    report["torch"] = {"location": torch_origin, "version": _version("torch")}
    if torch_origin is None:
        report["errors"].append("torch: not importable (the machine's own torch is expected)")
    elif _inside(torch_origin, target):
        report["errors"].append("torch: installed into the target; the machine's own must stay in use")
    for module in imports:
        try:
            imported = __import__(module)
            report.setdefault("imported", {})[module] = getattr(imported, "__file__", None)
            if not _inside(getattr(imported, "__file__", None), target) and module != "torch":
                report["errors"].append(f"{module}: imported from outside the target ({imported.__file__})")
        except Exception as error:  # noqa: BLE001 (reported, not raised)
            report["errors"].append(f"import {module}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    report["unsatisfied_requirements"] = unsatisfied_requirements(target)
    print(f"{side} side, python {report['python']}, target {target}")
    print("\n| package | version | from the target |\n|---|---|---|")
    for entry in report["packages"]:
        print(f"| {entry['name']} | {entry['version']} | {'yes' if entry['from_target'] else 'NO'} |")
    print(f"| torch (the machine's) | {report['torch']['version']} | "
          f"{'YES' if _inside(torch_origin, target) else 'no'} |")
    if report["unsatisfied_requirements"]:
        print("\nrequirements left unmet by the --no-deps install (advisory):")
        for line in report["unsatisfied_requirements"]:
            print(f"- {line}")
    for error in report["errors"]:
        print(f"ERROR: {error}")
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    return 1 if report["errors"] else 0


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------------------------


def machine(out: Path) -> None:
    """Python, torch and the GPU as this interpreter sees them (no PYTHONPATH: the machine's own packages)."""
    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
                  "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name()
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
            info["cuda_runtime"] = torch.version.cuda
    except Exception as error:  # noqa: BLE001
        info["torch_error"] = f"{type(error).__name__}: {error}"
    for name in ("transformers", "huggingface_hub", "tokenizers", "accelerate", "numpy", "torchvision"):
        info.setdefault("machine_packages", {})[name] = _version(name)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    out.write_text(json.dumps(info, indent=1))


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------


def read_parts(state: Path) -> list[dict]:
    """The parts run so far, from parts.tsv (name, status, rc, seconds, budget, note, command)."""
    parts = []
    table = state / "parts.tsv"
    for line in table.read_text().splitlines() if table.exists() else []:
        name, status, rc, seconds, budget, note, command = (line.split("\t") + [""] * 7)[:7]
        parts.append({"name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                      "seconds": float(seconds) if seconds else None, "budget_s": int(budget) if budget else None,
                      "note": note, "command": command})
    return parts


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def part_table(directory: Path, part: dict, result) -> str:
    """What the summary shows for a part: its printed table, else the partial table in its JSON, else its tails."""
    stdout = directory / "stdout.txt"
    text = stdout.read_text(errors="replace").strip() if stdout.exists() else ""
    if part["status"] == "passed" and text:
        return text
    if isinstance(result, dict) and result.get("table"):
        return "(partial: the rows finished before the part stopped)\n\n" + result["table"]
    shown = []
    if text:
        shown.append("stdout (last lines):\n```\n" + _tail(stdout) + "\n```")
    stderr = _tail(directory / "stderr.txt", 15)
    if stderr:
        shown.append("stderr (last lines):\n```\n" + stderr + "\n```")
    return "\n\n".join(shown) or "(no output)"


def report(state: Path, out: Path) -> None:
    """summary.md (the parts' status and wall time, then every table) and results.json (every sample) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    suite = json.loads((state / "suite.json").read_text()) if (state / "suite.json").exists() else {}
    machine_info = json.loads((state / "machine.json").read_text()) if (state / "machine.json").exists() else {}
    parts = read_parts(state)
    lines = [f"# Device suite: {suite.get('mode', '?')} run", ""]
    lines.append(f"{machine_info.get('date', '')} | python {machine_info.get('python')} | torch "
                 f"{machine_info.get('torch')} | GPU {machine_info.get('gpu', 'none')} | {machine_info.get('cpus')} "
                 f"CPUs | nvidia-smi: {machine_info.get('nvidia_smi') or 'n/a'}")
    lines.append(f"time limit {suite.get('total_s')} s; elapsed {suite.get('elapsed_s', '?')} s"
                 f"{'' if suite.get('finished') else ' (still running or stopped)'}")
    if str(suite.get("mode", "")).startswith("dry"):
        lines += ["", "A dry run: CPU and small shapes. It shows that every part installs and runs; its timings are "
                      "not measurements of anything."]
    lines += ["", "| part | status | wall s | budget s | note |", "|---|---|---|---|---|"]
    for part in parts:
        seconds = f"{part['seconds']:.1f}" if part["seconds"] is not None else "-"
        lines.append(f"| {part['name']} | {part['status']} | {seconds} | {part['budget_s'] or '-'} | "
                     f"{part['note'].replace('|', '/')} |")
    results = {"suite": suite, "machine": machine_info, "parts": []}
    for part in parts:
        directory = state / "parts" / part["name"]
        result = None
        result_path = directory / "result.json"
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text())
            except json.JSONDecodeError as error:
                result = {"unreadable": str(error)}
        results["parts"].append({**part, "result": result, "stdout_tail": _tail(directory / "stdout.txt", 60),
                                 "stderr_tail": _tail(directory / "stderr.txt", 30)})
        lines += ["", f"## {part['name']}: {part['status']}", ""]
        if part["status"] == "skipped":
            lines.append(f"skipped: {part['note']}")
            continue
        lines += [f"`{part['command']}`", "", part_table(directory, part, result)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    temporary = out / "results.json.tmp"
    temporary.write_text(json.dumps(results, indent=1))
    temporary.replace(out / "results.json")


# ----------------------------------------------------------------------------------------------------------------------
# What travels
# ----------------------------------------------------------------------------------------------------------------------


def tree_size(carry: list[str]) -> dict:
    """Bytes that a device call sends: tracked and untracked-not-ignored files, plus the carried paths."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
    files = {REPO / name for name in listing.split("\0") if name}
    for path in carry:
        root = REPO / path
        files.update(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    tree = sum(p.stat().st_size for p in files if p.is_file() and not _carried(p, carry))
    carried = sum(p.stat().st_size for p in files if p.is_file() and _carried(p, carry))
    return {"tree_bytes": tree, "carried_bytes": carried, "total_bytes": tree + carried, "limit_bytes": TRAVEL_LIMIT}


def _carried(path: Path, carry: list[str]) -> bool:
    return any(_inside(path, (REPO / c).resolve()) for c in carry)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    wheels = commands.add_parser("wheels")
    wheels.add_argument("side")
    missing = commands.add_parser("missing-wheels")
    missing.add_argument("--python", help="for a CPython of this version on manylinux x86-64 (default: this one)")
    missing.add_argument("--dir", dest="dirs", action="append", type=Path, required=True, help="a wheel folder")
    missing.add_argument("requirements", nargs="*")
    stale = commands.add_parser("stale-wheels")
    stale.add_argument("directory", type=Path)
    stale.add_argument("requirements", nargs="*")
    dists = commands.add_parser("missing-dists")
    dists.add_argument("requirements", nargs="*")
    check = commands.add_parser("check-side")
    check.add_argument("--side", required=True)
    check.add_argument("--target", required=True, type=Path)
    check.add_argument("--expect", nargs="*", default=[])
    check.add_argument("--imports", nargs="*", default=[])
    check.add_argument("--json", type=Path)
    machine_parser = commands.add_parser("machine")
    machine_parser.add_argument("out", type=Path)
    report_parser = commands.add_parser("report")
    report_parser.add_argument("state", type=Path)
    report_parser.add_argument("out", type=Path)
    size = commands.add_parser("tree-size")
    size.add_argument("--json", action="store_true", help="the byte counts as JSON")
    size.add_argument("carry", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "wheels":
        print("\n".join(wheel_list().get(args.side, [])))
    elif args.command == "missing-wheels":
        tags = device_tags(args.python) if args.python else None
        print("\n".join(missing_wheels(args.dirs, args.requirements, tags)))
    elif args.command == "stale-wheels":
        print("\n".join(str(p) for p in stale_wheels(args.directory, args.requirements)))
    elif args.command == "missing-dists":
        print("\n".join(missing_dists(args.requirements)))
    elif args.command == "check-side":
        return check_side(args.side, args.target, args.expect, args.imports, args.json)
    elif args.command == "machine":
        machine(args.out)
    elif args.command == "report":
        report(args.state, args.out)
    elif args.command == "tree-size":
        sizes = tree_size(args.carry)
        mib = {k: v / 2**20 for k, v in sizes.items()}
        print(json.dumps(sizes) if args.json else
              f"{mib['total_bytes']:.1f} MiB (tree {mib['tree_bytes']:.1f} + carried {', '.join(args.carry) or '-'} "
              f"{mib['carried_bytes']:.1f}) of {mib['limit_bytes']:.0f} MiB")
        return 0 if sizes["total_bytes"] < sizes["limit_bytes"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
