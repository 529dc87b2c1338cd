"""How many CPU threads torch uses in this package's commands (`openflamingo`, `-train`, `-eval`, the demo).

torch's default is one intra-op thread per core. On a small machine that is also doing other work that is the worst
choice for the small matrices of a tiny model: on 2 busy cores, captioning with the embedded model took 10-20x longer
with two threads than with one (the threads wait for each other at every op). So a command's default is the cores
that are not already busy: `os.cpu_count()` minus the 1-minute load average, at least 1. `--threads N` wins, and so does
`OMP_NUM_THREADS` when it is set (torch reads it itself).
"""

from __future__ import annotations

import os

THREADS_HELP = (
    "CPU threads for torch (default: the cores not already busy, i.e. the core count minus the 1-minute load "
    "average, at least 1; OMP_NUM_THREADS, when set, is kept). Ignored for the GPU's work."
)


def default_cpu_threads() -> int:
    """The cores not already busy: `os.cpu_count()` minus the rounded 1-minute load average, at least 1."""
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(cores, cores - busy))


def set_cpu_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads: `threads`, else torch's own choice when OMP_NUM_THREADS is set, else
    `default_cpu_threads()`. Returns the number in use."""
    if threads is not None and threads < 1:  # checked before importing torch: an argument error answers at once
        raise ValueError(f"--threads must be at least 1, got {threads}.")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_cpu_threads())
    return torch.get_num_threads()


__all__ = ["THREADS_HELP", "default_cpu_threads", "set_cpu_threads"]
