"""The example training scripts run end to end (a few steps each), so that the shipped models stay reproducible."""

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoConfig

import openflamingo_hf  # noqa: F401  (registers the Auto classes)

ROOT = Path(__file__).resolve().parents[1]


def test_train_embedded_video_runs_its_stages_and_reports(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "train_embedded_video.py"), "--output_dir", str(tmp_path),
               "--warmup_steps", "3", "--warmup_clips", "100", "--warmup_images", "100", "--steps", "2",
               "--batch_size", "2", "--probe_every", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "stage 0 step 3:" in completed.stdout and "stage mix: 2 steps" in completed.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"clip_caption_exact", "clip_direction", "clip_reversed_direction", "caption_exact"} <= set(report["scores"])
    assert AutoConfig.from_pretrained(tmp_path / "model").perceiver_max_num_frames == 4
