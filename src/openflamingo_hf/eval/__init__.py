"""Few-shot evaluation of OpenFlamingo models: benchmarks, prompts, runner and metrics."""
