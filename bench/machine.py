"""Machine description stored with every benchmark result (results are only comparable on the same machine)."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> dict:
    """CPU model, cores, library versions, torch threads, BLAS and the load average when the run started."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "blas": "mkl" if torch.backends.mkl.is_available() else "other", "loadavg_start": os.getloadavg()}
