"""What the benchmarks print about the machine they ran on (shared by the scripts here)."""

from __future__ import annotations

import os
import platform
import sys

import torch


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> str:
    """One line: python, torch, CPU, core count, torch threads and the load average now."""
    return (
        f"python {sys.version.split()[0]}, torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load average {load_average()}"
    )
