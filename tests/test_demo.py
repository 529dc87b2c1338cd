"""The README's main command (`make demo` = `python -m openflamingo_hf.demo`) runs end to end without a download."""

from openflamingo_hf.demo import main


def test_demo_runs_and_pipeline_agrees_with_generate(capsys):
    main(["--max_new_tokens", "5"])  # raises SystemExit if the pipeline's caption differs from generate's
    out = capsys.readouterr().out
    assert "beam search (3 beams)" in out and "pipeline, greedy" in out
