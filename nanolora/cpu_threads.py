"""How many threads a CPU run gives torch: the cores other processes leave free, looked at
again during the run.

torch splits each CPU op across its threads and waits at the end for the slowest. When
another process wants the same core, the thread there gets a time slice only now and then,
and every op waits for it. Measured on a 2-core machine under a load average of ~7 (other
engineers' test runs), the default run's training step ran at 7-12 tokens/s on 2 threads
and at 56-70 on 1. So a run uses the cores that are idle (at least one), measured from
/proc/stat over the last interval with the run's own CPU time taken out, and looks again at
each log step. OMP_NUM_THREADS, when set, is left to decide, as are systems without /proc/stat.
"""
import os
import time

import torch

TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before anyone changes it: the physical cores


def _busy_cpu_seconds():
    """(seconds any core spent busy since boot, over all cores), or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # the first 8: guest time is in user already


class CPUThreads:
    """threads.update() sets torch's thread count to the cores others left idle since the
    previous call, and returns it."""

    def __init__(self):
        # the processes torchrun starts on this machine share its cores
        self.max_threads = max(1, TORCH_DEFAULT_THREADS // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.enabled = "OMP_NUM_THREADS" not in os.environ and _busy_cpu_seconds() is not None
        self._mark()

    def _mark(self):
        self._wall, self._ours, self._busy = time.monotonic(), time.process_time(), _busy_cpu_seconds()

    def update(self, sample_s: float = 0.0) -> int:
        """sample_s: wait that long first (at the start, when there is no interval yet)."""
        if not self.enabled:
            return torch.get_num_threads()
        time.sleep(sample_s)
        wall, ours, busy = time.monotonic(), time.process_time(), _busy_cpu_seconds()
        others = max(0.0, (busy - self._busy) - (ours - self._ours)) / max(wall - self._wall, 1e-3)  # cores
        threads = max(1, min(self.max_threads, round(os.cpu_count() - others)))
        torch.set_num_threads(threads)
        self._mark()
        return threads
