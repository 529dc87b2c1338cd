.PHONY: setup setup-original demo test test-original bench mutation-check

setup:
	bash scripts/setup.sh

# .venv-original: the original OpenFlamingo (open-flamingo 2.0.1, transformers 4.36.2), which the comparison tests run.
setup-original:
	bash scripts/setup_original_env.sh

demo: setup
	.venv/bin/python -m openflamingo_hf.demo

# The comparisons with the original's own code (model, training steps, metrics, benchmark): tests/*vs_original.py.
ORIGINAL_TESTS = $(wildcard tests/test_*vs_original.py)

# The whole suite in two stages, each with its own time: everything else (under 10 min on 2 cores), then the
# comparisons with the original (~1.5-3 min; hence setup-original, which takes a few minutes the first time).
test: setup setup-original
	.venv/bin/python -m pytest -q tests --ignore-glob='*vs_original.py'
	.venv/bin/python -m pytest -q $(ORIGINAL_TESTS)

# Only the comparisons with the original.
test-original: setup setup-original
	.venv/bin/python -m pytest -q $(ORIGINAL_TESTS)

bench: setup
	.venv/bin/python benchmarks/bench_generate.py

# Does the suite notice realistic bugs? One mutant at a time in a copy of the tree (~20-30 min; see the script).
mutation-check: setup setup-original
	.venv/bin/python scripts/mutation_check.py
