"""Facts about the machine a benchmark ran on, written beside every result."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_facts() -> dict[str, Any]:
    """Cores, CPU model, Python and library versions."""
    import gymnasium
    import numpy
    import stable_baselines3
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "stable_baselines3": stable_baselines3.__version__, "gymnasium": gymnasium.__version__,
                     "numpy": numpy.__version__},
    }
