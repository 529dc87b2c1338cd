"""The commands' CPU thread default: the cores not already busy, `--threads` and OMP_NUM_THREADS winning."""

import pytest
import torch

from openflamingo_hf import cpu_threads as threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores, load, expected", [(2, 0.1, 2), (2, 0.9, 1), (2, 3.7, 1), (16, 5.2, 11), (8, 0.0, 8)])
def test_default_is_the_cores_not_already_busy(monkeypatch, cores, load, expected):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.default_cpu_threads() == expected


def test_explicit_threads_then_omp_num_threads_then_the_default(monkeypatch):
    monkeypatch.setattr(threads, "default_cpu_threads", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.set_cpu_threads(2) == 2
    assert threads.set_cpu_threads(None) == 1
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.set_cpu_threads(None) == 2  # left as torch read it
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        threads.set_cpu_threads(0)
