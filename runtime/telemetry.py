"""What a worker reports in its heartbeats: host load, memory, accelerator memory, Jetson sensors.

Cheap enough to sample every heartbeat (psutil's non-blocking ``cpu_percent``; sysfs
reads). Values are plain numbers so they travel in the msgpack header as they are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import torch

_THERMAL = Path("/sys/devices/virtual/thermal")


class Telemetry:
    """Samples this process and its host; ``device`` selects the accelerator figures."""

    def __init__(self, device: str = "cpu", jetson_sensors: bool = True) -> None:
        self.device = torch.device(device)
        self.proc = psutil.Process(os.getpid())
        self.jetson_sensors = jetson_sensors and _THERMAL.is_dir()
        psutil.cpu_percent(interval=None)  # first call primes the counter
        self.proc.cpu_percent(interval=None)

    def sample(self) -> dict[str, Any]:
        """A flat map of current figures (percent, bytes, degrees C)."""
        vm = psutil.virtual_memory()
        out: dict[str, Any] = {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "proc_cpu_percent": self.proc.cpu_percent(interval=None),
            "mem_total_bytes": int(vm.total),
            "mem_available_bytes": int(vm.available),
            "proc_rss_bytes": int(self.proc.memory_info().rss),
            "load_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        }
        if hasattr(self.proc, "num_fds"):  # POSIX: custody bounds keep this flat whatever peers do
            out["open_fds"] = int(self.proc.num_fds())
        if self.device.type == "cuda" and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(self.device)
            out["gpu_free_bytes"], out["gpu_total_bytes"] = int(free), int(total)
            out["gpu_allocated_bytes"] = int(torch.cuda.memory_allocated(self.device))
        if self.jetson_sensors:
            out.update(_thermal_zones())
        return out


def _thermal_zones(limit: int = 8) -> dict[str, float]:
    """``temp_<zone type>_c`` for the first few thermal zones (Jetson: CPU, GPU, SOC, ...)."""
    out: dict[str, float] = {}
    for zone in sorted(_THERMAL.glob("thermal_zone*"))[:limit]:
        try:
            kind = (zone / "type").read_text().strip().lower().replace("-", "_")[:24]
            out[f"temp_{kind}_c"] = int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    return out
