"""Few-shot evaluation of OpenFlamingo models: evaluation tasks, their data, prompts, runner and metrics."""
