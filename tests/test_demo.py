"""The README's main command (`make demo` = `python -m openflamingo_hf.demo`) runs end to end without a download."""

from openflamingo_hf.demo import few_shot_prompt, main


def test_demo_runs_and_pipeline_agrees_with_generate(capsys):
    main(["--max_new_tokens", "5"])  # raises SystemExit if the pipeline's caption differs from generate's
    out = capsys.readouterr().out
    assert "beam search (3 beams)" in out and "pipeline, greedy" in out


def test_few_shot_prompt_format():
    assert few_shot_prompt(["a cat."], "Output:") == "<image>Output:a cat.<|endofchunk|><image>Output:"
