"""The README's main command (`make demo` = `python -m openflamingo_hf.demo`) runs end to end without a download."""

from openflamingo_hf.demo import main
from openflamingo_hf.embedded import sample_captions


def test_demo_prints_correct_captions_and_answers(capsys):
    main(["--max_new_tokens", "12"])  # raises SystemExit if the pipeline's answer differs from generate's
    out = capsys.readouterr().out
    assert "Captions" in out and "Questions" in out and "pipeline ->" in out
    # The embedded model gets the bundled images right (each line is marked ok or WRONG against the truth).
    caption_lines = [line for line in out.splitlines() if line.strip().startswith("sample-")][: len(sample_captions())]
    assert sum("[ok]" in line for line in caption_lines) >= len(caption_lines) - 1, out
    for true_caption in sample_captions():
        assert repr(true_caption) in out or "WRONG" in out
    # The video variant on generated clips, forwards and reversed (each caption marked against the truth).
    clip_lines = [line for line in out.splitlines() if "reversed ->" in line]
    assert len(clip_lines) == 4 and sum(line.count("[ok]") for line in clip_lines) >= 6, out
