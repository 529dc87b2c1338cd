#!/usr/bin/env python3
"""Mutation check: does the test suite notice realistic bugs?

    .venv/bin/python scripts/mutation_check.py            # every mutant below (~30 min on 2 busy cores)
    .venv/bin/python scripts/mutation_check.py --list     # the mutants and the tests each one runs
    .venv/bin/python scripts/mutation_check.py -k gate    # only mutants whose name or module contains "gate"
    .venv/bin/python scripts/mutation_check.py -k tanh -k "real-image"   # several keywords: either matches
    .venv/bin/python scripts/mutation_check.py --module metrics --no-baseline

Each mutant is one realistic bug, written down as data: a file, a snippet of it and what the snippet becomes (a
dropped mask, `tanh(gate)` as `gate`, demonstrations from the wrong split, ...). The script copies the working tree
(tracked and untracked files that git does not ignore) to a temporary folder once, then for each mutant writes the
mutated file in the copy, runs that module's tests there (`pytest -x`, with `PYTHONPATH=<copy>/src` so the copy's
package is the one imported) and puts the file back. A mutant is *killed* when the tests fail (or time out) and
*survives* when they pass. The working tree is never written to.

Before the mutants, each distinct list of tests runs once on the unmutated copy (the baseline): a test that already
fails would kill every mutant and make the score meaningless, so the run stops there (`--no-baseline` skips it).

Output: one row per mutant (result, seconds, first failing test) and the score, killed / (killed + survived). A
mutant whose snippet is no longer in its file (the code moved on) is reported as `stale`, not scored, and makes the
exit status 2: update its snippet. The exit status is 1 when the score is below `--fail-under` (default 0: report
only). Not part of the test suite; README "Development" says when to run it.

Adding a mutant: append a `Mutant(...)` to `MUTANTS`. The snippet must occur exactly once in the file; the tests
should be the ones a developer would run for that module (`TESTS`); they run in the suite's order and `-x` stops at
the first failure. A mutant that survives is a finding: write a test for the property it breaks (see
tests/test_properties.py), not a test for the mutant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELING = "src/openflamingo_hf/modeling/modeling_openflamingo.py"
PROCESSING = "src/openflamingo_hf/processing/processing_openflamingo.py"
COLLATOR = "src/openflamingo_hf/trainer/collator.py"
TRAINER = "src/openflamingo_hf/trainer/trainer.py"
METRICS = "src/openflamingo_hf/eval/metrics.py"
EVALUATE = "src/openflamingo_hf/eval/evaluate.py"

# The tests a developer runs for each module (paths that do not exist are left out, with a note); they run in the
# suite's order.
TESTS = {
    "modeling": ["tests/test_properties.py", "tests/test_modeling.py", "tests/test_correctness.py",
                 "tests/test_vs_original.py"],
    "processing": ["tests/test_properties.py", "tests/test_processing.py", "tests/test_processing_images.py"],
    "trainer": ["tests/test_trainer.py", "tests/test_trainer_data.py", "tests/test_embedding_rows.py",
                "tests/test_vs_original.py"],
    "metrics": ["tests/test_eval_metrics.py", "tests/test_eval_vs_original.py"],
    "evaluate": ["tests/test_properties.py", "tests/test_eval.py"],
}

# Where the collator's padding is checked (fine-tuning batches, mixed image / video batches).
COLLATOR_TESTS = ("tests/test_collator.py", "tests/test_finetune.py", "tests/test_video_training.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # a key of TESTS
    path: str
    original: str
    mutated: str
    extra_tests: tuple[str, ...] = field(default=())
    test_override: tuple[str, ...] = field(default=())  # --tests

    @property
    def tests(self) -> list[str]:
        """The mutant's tests in the suite's own (alphabetical) order: some tests rely on running before others in
        one process (a warning that transformers logs once per process)."""
        if self.test_override:
            return list(self.test_override)
        return sorted(set(TESTS[self.module]) | set(self.extra_tests))


MUTANTS = [
    # ---------------------------------------------------------------------------------------------- modeling
    Mutant("gated block: tanh(attn_gate) -> attn_gate", "modeling", MODELING,
           "hidden_states = hidden_states + self.attn_gate.tanh() * attn_out",
           "hidden_states = hidden_states + self.attn_gate * attn_out"),
    Mutant("gated block: tanh(ff_gate) -> ff_gate", "modeling", MODELING,
           "return hidden_states + self.ff_gate.tanh() * self.ff(hidden_states)",
           "return hidden_states + self.ff_gate * self.ff(hidden_states)"),
    Mutant("gated block: feed-forward gated by the attention gate", "modeling", MODELING,
           "return hidden_states + self.ff_gate.tanh() * self.ff(hidden_states)",
           "return hidden_states + self.attn_gate.tanh() * self.ff(hidden_states)"),
    Mutant("decode step: real-image mask dropped from the immediate-image lookup", "modeling", MODELING,
           "has_media = (media_index >= 1) & (media_index <= image_mask.shape[1]) & real",
           "has_media = (media_index >= 1) & (media_index <= image_mask.shape[1])"),
    Mutant("cross-attention mask: immediate media -> every earlier image", "modeling", MODELING,
           "visible = key_image[None, None, :] == media_index[:, :, None]",
           "visible = key_image[None, None, :] <= media_index[:, :, None]"),
    Mutant("cross-attention mask: padding image slots attendable", "modeling", MODELING,
           "visible = visible & image_mask[:, None, :]",
           "visible = visible"),
    Mutant("cross-attention: keys and values swapped", "modeling", MODELING,
           "key, value = self.to_kv(media).chunk(2, dim=-1)",
           "value, key = self.to_kv(media).chunk(2, dim=-1)"),
    Mutant("Perceiver: latents attend the media only, not [media; latents]", "modeling", MODELING,
           "k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)",
           "k, v = self.to_kv(media).chunk(2, dim=-1)"),
    Mutant("Perceiver: final LayerNorm dropped", "modeling", MODELING,
           "return self.norm(latents).unflatten(0, (batch_size, num_images))",
           "return latents.unflatten(0, (batch_size, num_images))"),
    Mutant("vision features: CLS token kept", "modeling", MODELING,
           "features = features[:, 1:]",
           "features = features[:, :]"),
    Mutant("media index: an <image> token does not see its own image", "modeling", MODELING,
           "return (input_ids == self.config.media_token_id).cumsum(dim=-1)",
           "return (input_ids == self.config.media_token_id).cumsum(dim=-1) - (input_ids == "
           "self.config.media_token_id).long()"),
    Mutant("position ids: not derived from the attention mask (left padding shifts positions)", "modeling", MODELING,
           "if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:",
           "if False:"),
    # ---------------------------------------------------------------------------------------------- processing
    Mutant("processor: extra images of a flat list silently dropped", "processing", PROCESSING,
           "if start != len(images):",
           "if start > len(images):"),
    Mutant("processor: more images than markers accepted", "processing", PROCESSING,
           "if num_markers != count:",
           "if num_markers > count:"),
    Mutant("processor: markers appended (not prepended) to marker-less text", "processing", PROCESSING,
           "texts[idx] = self.image_token * len(rows[idx]) + sample",
           "texts[idx] = sample + self.image_token * len(rows[idx])"),
    Mutant("processor: right padding by default (prompts no longer flush with generation)", "processing",
           PROCESSING, 'default_padding_side = "left"', 'default_padding_side = "right"'),
    Mutant("processor: padding image slots filled with ones", "processing", PROCESSING,
           "pixel_values = like.new_zeros(",
           "pixel_values = like.new_ones("),
    Mutant("processor: truncation that drops a marker goes unnoticed", "processing", PROCESSING,
           "if num_kept == num_markers:",
           "if num_kept <= num_markers:"),
    Mutant("pretraining labels: <image> tokens carry loss", "processing", PROCESSING,
           "masked = input_ids == self.image_token_id",
           "masked = torch.zeros_like(input_ids, dtype=torch.bool)",
           extra_tests=("tests/test_trainer_data.py",)),
    Mutant("pretraining labels: <|endofchunk|> masked too", "processing", PROCESSING,
           "return before_first_image | (kind_before == 2)",
           "return before_first_image | (kind_before == 2) | (input_ids == eoc_id)",
           extra_tests=("tests/test_trainer_data.py",)),
    # ---------------------------------------------------------------------------------------------- trainer
    Mutant("collator: label padding is the pad id, not -100", "trainer", COLLATOR,
           "labels = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)",
           "labels = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)",
           extra_tests=COLLATOR_TESTS),
    Mutant("collator: attention mask 1 on padding", "trainer", COLLATOR,
           "attention_mask = torch.zeros((len(ids), length), dtype=torch.long)",
           "attention_mask = torch.ones((len(ids), length), dtype=torch.long)",
           extra_tests=COLLATOR_TESTS),
    Mutant("recipe freezing: Perceiver frozen", "trainer", TRAINER,
           "model.perceiver.requires_grad_(True)",
           "model.perceiver.requires_grad_(False)"),
    Mutant("trainer: stream loss multipliers ignored", "trainer", TRAINER,
           "weighted = loss * self.loss_multipliers.get(name, 1.0) / self.current_gradient_accumulation_steps",
           "weighted = loss / self.current_gradient_accumulation_steps"),
    Mutant("trainer: weight decay on the Perceiver too", "trainer", TRAINER,
           '"gated_cross_attn_layers" in name\n',
           '("gated_cross_attn_layers" in name or "perceiver" in name)\n'),
    Mutant("trainer: trained embedding rows never written back to the model", "trainer", TRAINER,
           "self.weight.index_copy_(0, self.ids, self.param.to(self.weight.dtype))",
           "pass"),
    # ---------------------------------------------------------------------------------------------- eval
    Mutant("VQA accuracy: min(1, matches / 3) without the cap", "metrics", METRICS,
           "per_left_out.append(min(1.0, matching / 3))",
           "per_left_out.append(matching / 3)"),
    Mutant("VQA accuracy: the prediction not normalised like the answers", "metrics", METRICS,
           "prediction = _normalise_answer(prediction)",
           "prediction = _clean_whitespace(prediction)"),
    Mutant("ROC-AUC: computed on thresholded labels instead of scores", "metrics", METRICS,
           "roc_auc_score(as_int, [float(score) for score in scores])",
           "roc_auc_score(as_int, [float(score >= 0.5) for score in scores])"),
    Mutant("CIDEr: references not PTB-tokenized", "metrics", METRICS,
           "Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(res))",
           "Cider().compute_score({k: [c['caption'] for c in v] for k, v in gts.items()}, tokenizer.tokenize(res))"),
    Mutant("evaluation: demonstrations drawn from the evaluation split", "evaluate", EVALUATE,
           "pool = query_set(data.train, settings.query_set_size, seed)",
           "pool = query_set(data.test, settings.query_set_size, seed)"),
    Mutant("evaluation: queries drawn from the train split", "evaluate", EVALUATE,
           "queries = subsample(data.test, settings.num_samples, seed)",
           "queries = subsample(data.train, settings.num_samples, seed)"),
]

# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------

KILLED, SURVIVED, TIMEOUT, STALE, ERROR = "killed", "SURVIVED", "killed (timeout)", "stale", "error"


@dataclass
class Outcome:
    mutant: Mutant
    result: str
    seconds: float = 0.0
    detail: str = ""


def working_tree_files() -> list[str]:
    """Tracked files and untracked ones that git does not ignore, relative to the repository root."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def make_copy(destination: Path) -> None:
    for name in working_tree_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    # The environments are used as they are (tests look for .venv-original beside the repository).
    for venv in (".venv", ".venv-original"):
        if (REPO / venv).exists():
            (destination / venv).symlink_to(REPO / venv)


def existing(tests: list[str], root: Path) -> list[str]:
    return [t for t in tests if (root / t.split("::")[0]).exists()]


def run_tests(root: Path, tests: list[str], timeout: float, python: str) -> tuple[int | None, float, str]:
    """(pytest's exit status or None on timeout, seconds, output)."""
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ""
        return None, time.perf_counter() - start, output if isinstance(output, str) else output.decode()
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.MULTILINE)
    if match:
        return match.group(1)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:120] if lines else ""


def check_package_is_the_copy(root: Path, python: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    where = subprocess.run([python, "-c", "import openflamingo_hf; print(openflamingo_hf.__file__)"], cwd=root,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"mutation_check: the copy's package is not the one imported ({where}); aborting.")


def apply_and_test(mutant: Mutant, root: Path, timeout: float, python: str) -> Outcome:
    path = root / mutant.path
    source = path.read_text()
    count = source.count(mutant.original)
    if count != 1:
        return Outcome(mutant, STALE, detail=f"snippet found {count} times in {mutant.path}")
    tests = existing(mutant.tests, root)
    try:
        path.write_text(source.replace(mutant.original, mutant.mutated))
        status, seconds, output = run_tests(root, tests, timeout, python)
    finally:
        path.write_text(source)
    if status is None:
        return Outcome(mutant, TIMEOUT, seconds, f"no result within {timeout:.0f} s")
    if status == 0:
        return Outcome(mutant, SURVIVED, seconds, "all tests passed")
    if status in (1, 2):  # failures, or an error while collecting the tests (the mutant broke an import)
        return Outcome(mutant, KILLED, seconds, first_failure(output))
    return Outcome(mutant, ERROR, seconds, f"pytest exit status {status}: {first_failure(output)}")


def print_table(outcomes: list[Outcome]) -> None:
    print("\n| # | mutant | module | result | s | first failing test / note |")
    print("|---|---|---|---|---|---|")
    for k, o in enumerate(outcomes, 1):
        print(f"| {k} | {o.mutant.name} | {o.mutant.module} | {o.result} | {o.seconds:.0f} | "
              f"{o.detail.replace('|', '/')} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="keywords", action="append",
                        help="only mutants whose name or module contains this (case-insensitive; repeat for more)")
    parser.add_argument("--module", choices=sorted(TESTS), action="append", help="only this module's mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--tests", action="append", metavar="PATH",
                        help="run these tests (pytest paths / node ids; repeatable) instead of each mutant's own")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on unmutated code")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    parser.add_argument("--fail-under", type=float, default=0.0, help="exit 1 if the score (%%) is below this")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this file")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest (default: this one)")
    return parser.parse_args(argv)


def select(args: argparse.Namespace) -> list[Mutant]:
    chosen = MUTANTS
    chosen = [m for m in chosen if _matches(m, args)]
    if args.tests:  # the same mutants, judged by the given tests only
        chosen = [dataclasses.replace(m, test_override=tuple(args.tests)) for m in chosen]
    return chosen


def _matches(mutant: Mutant, args: argparse.Namespace) -> bool:
    if args.module and mutant.module not in args.module:
        return False
    if args.keywords:
        return any(word.lower() in mutant.name.lower() or word.lower() in mutant.module for word in args.keywords)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mutants = select(args)
    if not mutants:
        print("mutation_check: no mutant matches", file=sys.stderr)
        return 2
    if args.list:
        for k, m in enumerate(mutants, 1):
            print(f"{k:2d}. [{m.module}] {m.name}\n    {m.path}: {m.original!r}\n    -> {m.mutated!r}\n"
                  f"    tests: {' '.join(existing(m.tests, REPO))}")
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as folder:
        root = Path(folder) / "repo"
        root.mkdir()
        make_copy(root)
        check_package_is_the_copy(root, args.python)
        for missing in sorted({t for m in mutants for t in m.tests} - set(existing([t for m in mutants
                                                                                 for t in m.tests], root))):
            print(f"note: {missing} does not exist here; left out")
        if not args.no_baseline:
            for tests in dict.fromkeys(tuple(existing(m.tests, root)) for m in mutants):
                status, seconds, output = run_tests(root, list(tests), args.timeout, args.python)
                print(f"baseline {' '.join(tests)}: {'passed' if status == 0 else 'FAILED'} ({seconds:.0f} s)",
                      flush=True)
                if status != 0:
                    print(output[-3000:], file=sys.stderr)
                    print("mutation_check: the tests fail without any mutant; fix them first (or pass "
                          "--no-baseline to see the table anyway).", file=sys.stderr)
                    return 2
        outcomes = []
        for k, mutant in enumerate(mutants, 1):
            outcome = apply_and_test(mutant, root, args.timeout, args.python)
            outcomes.append(outcome)
            print(f"[{k}/{len(mutants)}] {outcome.result:8s} {outcome.seconds:5.0f} s  {mutant.name}", flush=True)
    print_table(outcomes)
    scored = [o for o in outcomes if o.result in (KILLED, SURVIVED, TIMEOUT)]
    killed = [o for o in scored if o.result != SURVIVED]
    score = 100.0 * len(killed) / len(scored) if scored else 0.0
    minutes = (time.perf_counter() - start) / 60
    print(f"\nmutation score: {len(killed)}/{len(scored)} killed ({score:.0f}%) in {minutes:.1f} min")
    for o in outcomes:
        if o.result == SURVIVED:
            print(f"  survived: {o.mutant.name} ({o.mutant.path})")
    if args.json:
        args.json.write_text(json.dumps({"score": score, "killed": len(killed), "scored": len(scored),
                                         "minutes": minutes, "mutants": [
                                             {"name": o.mutant.name, "module": o.mutant.module,
                                              "result": o.result, "seconds": o.seconds, "detail": o.detail}
                                             for o in outcomes]}, indent=1))
    if any(o.result in (STALE, ERROR) for o in outcomes):
        return 2
    return 1 if score < args.fail_under else 0


if __name__ == "__main__":
    sys.exit(main())
