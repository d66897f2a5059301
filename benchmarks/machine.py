"""One line describing the machine a benchmark ran on (CPU model, cores, RAM, GPU, Python, torch), for the
headers of the tables that go into benchmarks/README.md."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    import torch  # imported here: run_all.py prints the header before any benchmark loads torch itself

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")
