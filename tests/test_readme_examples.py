"""The README's embedded-model examples are real: its snippets run as printed, and print what the README says.

A README line `print(...)  # text` states that the call prints `text`. The snippets of "Out of the box" and "Quick start"
run on the embedded model (offline); this test runs them and compares every printed line with its comment. It also
checks, on held-out images, that the released models' prompt shapes the README shows ("Output:" captions and
"Question:... Short answer:") are answered correctly.
"""

import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest

from openflamingo_hf.embedded import answer, caption, few_shot_caption_accuracy, load_embedded_model, make_examples
from openflamingo_hf.embedded.world import HELD_OUT_SEED_START, output_caption_text

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Out of the box", "## Quick start")


def section_python_blocks(readme: str, heading: str) -> list[str]:
    """The ```python blocks of the README section that starts with `heading` (up to the next `## `)."""
    start = readme.index(heading)
    end = readme.find("\n## ", start + len(heading))
    return re.findall(r"```python\n(.*?)```", readme[start : end if end != -1 else None], flags=re.S)


def stated_outputs(code: str) -> list[str]:
    """The comment on each line that starts a `print(` statement: what the README says it prints."""
    tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    print_rows = {tok.start[0] for tok in tokens if tok.type == tokenize.NAME and tok.string == "print" and tok.start[1] == 0}
    return [tok.string[1:].strip() for tok in tokens if tok.type == tokenize.COMMENT and tok.start[0] in print_rows]


def readme_snippet(heading: str) -> str:
    """The first ```python block of a section: the runnable example (later blocks may be fragments)."""
    blocks = section_python_blocks((ROOT / "README.md").read_text(encoding="utf-8"), heading)
    assert blocks, f"no python block in the README section {heading!r}"
    return blocks[0]


def test_stated_outputs_parser():
    code = 'x = 1  # not a print\nprint(x)  # 1\nprint(\n    [x, "#"],\n)  # [1, \'#\']\nprint(x)\n'
    assert stated_outputs(code) == ["1"]  # a statement's comment counts on its first line only


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_snippet_prints_what_the_readme_states(heading, tmp_path):
    code = readme_snippet(heading)
    expected = stated_outputs(code)
    assert expected, f"the {heading} snippet states no output (`print(...)  # output`)"
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # transformers' deprecated-task message is a malformed logging call: the snippets must not reach it.
    assert "Logging error" not in completed.stderr, completed.stderr[-3000:]
    assert completed.stdout.splitlines() == expected, completed.stdout


def test_released_prompt_shapes_on_held_out_images():
    examples = make_examples(40, HELD_OUT_SEED_START + 31337)
    images = [e.image for e in examples]
    captions = caption(images, prompt=output_caption_text())
    answers = answer(images, [e.question for e in examples])
    caption_accuracy = np.mean([c == e.caption for c, e in zip(captions, examples)])
    vqa_accuracy = np.mean([a == e.answer for a, e in zip(answers, examples)])
    assert caption_accuracy >= 0.95, list(zip(captions, [e.caption for e in examples]))
    assert vqa_accuracy >= 0.95, list(zip(answers, [e.answer for e in examples]))
    # The few-shot "Output:" prompt of the Quick start and of `openflamingo generate` (4 held-out demonstrations).
    model, processor = load_embedded_model()
    assert few_shot_caption_accuracy(examples[:20], model, processor, shots=4, seed=HELD_OUT_SEED_START + 7) >= 0.95
