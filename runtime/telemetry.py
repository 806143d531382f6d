"""What a worker reports in its heartbeats: host load, memory, accelerator memory, Jetson sensors.

Cheap enough to sample every heartbeat (psutil's non-blocking ``cpu_percent``; sysfs
reads). Values are plain numbers so they travel in the msgpack header as they are.

Jetson sensors, where the sysfs files exist (else no keys at all):

- ``temp_<zone>_c``: the first thermal zones (``/sys/devices/virtual/thermal``), degrees C;
- ``power_<rail>_mw``: the INA3221 power monitors' rails, milliwatts. JetPack 5/6 (the
  mainline ``ina3221`` hwmon driver): ``/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon*/``
  with ``in<N>_label``, ``in<N>_input`` (bus mV) and ``curr<N>_input`` (mA), so mW = mV x mA / 1000;
  channel 7 is the sum of shunt voltages and labels with "NC" are unconnected, both skipped.
  JetPack 4 (NVIDIA's ``ina3221x`` IIO driver): ``/sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device*/``
  with ``rail_name_<N>`` and ``in_power<N>_input`` (mW).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import psutil
import torch

_THERMAL = Path("/sys/devices/virtual/thermal")
INA3221_ROOTS = (Path("/sys/bus/i2c/drivers/ina3221"), Path("/sys/bus/i2c/drivers/ina3221x"))
MAX_RAILS = 9  # up to three INA3221 chips of three channels (two on AGX boards); bounds the heartbeat map
_SUM_CHANNEL = 7  # mainline driver: in7 is the sum of the shunt voltages (uV), not a rail


class Telemetry:
    """Samples this process and its host; ``device`` selects the accelerator figures."""

    def __init__(self, device: str = "cpu", jetson_sensors: bool = True,
                 power_roots: Sequence[Path] = INA3221_ROOTS) -> None:
        self.device = torch.device(device)
        self.proc = psutil.Process(os.getpid())
        self.jetson_sensors = jetson_sensors and _THERMAL.is_dir()
        self.rails = find_power_rails(power_roots) if jetson_sensors else []  # found once: sysfs does not change
        psutil.cpu_percent(interval=None)  # first call primes the counter
        self.proc.cpu_percent(interval=None)

    def sample(self) -> dict[str, Any]:
        """A flat map of current figures (percent, bytes, degrees C, milliwatts)."""
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
        out.update(read_power(self.rails))
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


@dataclass(frozen=True)
class PowerRail:
    """One INA3221 channel: its key and where its figures are read (``power``: mW; else mV and mA)."""

    key: str  # power_<rail>_mw
    power: Path | None = None
    volts: Path | None = None
    amps: Path | None = None


def find_power_rails(roots: Sequence[Path] = INA3221_ROOTS, limit: int = MAX_RAILS) -> list[PowerRail]:
    """The INA3221 rails under ``roots`` (both driver layouts), at most ``limit``; none when absent."""
    rails: dict[str, PowerRail] = {}
    for root in roots:
        try:
            devices = sorted(p for p in Path(root).iterdir() if p.is_dir())
        except OSError:
            continue
        for dev in devices:
            found = [*(r for f in sorted(dev.glob("hwmon/hwmon*")) for r in _hwmon_rails(f)),
                     *(r for f in sorted(dev.glob("iio:device*")) for r in _iio_rails(f))]
            for rail in found:
                rails.setdefault(rail.key, rail)  # a label seen twice (two chips) keeps the first
    return list(rails.values())[:limit]


def _hwmon_rails(folder: Path) -> list[PowerRail]:
    """JetPack 5/6: ``in<N>_label`` names channel N; bus mV in ``in<N>_input``, mA in ``curr<N>_input``."""
    out = []
    for label in sorted(folder.glob("in*_label")):
        n, name = label.name[2:-len("_label")], _read(label)
        if not n.isdigit() or int(n) == _SUM_CHANNEL or not name or "NC" in re.split(r"[^A-Za-z0-9]+", name):
            continue
        if key := _rail_key(name):
            out.append(PowerRail(key, volts=folder / f"in{n}_input", amps=folder / f"curr{n}_input"))
    return out


def _iio_rails(folder: Path) -> list[PowerRail]:
    """JetPack 4: ``rail_name_<N>`` names channel N; mW in ``in_power<N>_input``."""
    out = []
    for label in sorted(folder.glob("rail_name_*")):
        n, name = label.name[len("rail_name_"):], _read(label)
        if n.isdigit() and name and (key := _rail_key(name)):
            out.append(PowerRail(key, power=folder / f"in_power{n}_input"))
    return out


def read_power(rails: Sequence[PowerRail]) -> dict[str, float]:
    """``power_<rail>_mw`` of each rail that reads now (a rail whose file fails is left out)."""
    out: dict[str, float] = {}
    for rail in rails:
        try:
            if rail.power is not None:
                out[rail.key] = _number(rail.power)
            elif rail.volts is not None and rail.amps is not None:
                out[rail.key] = _number(rail.volts) * _number(rail.amps) / 1000.0  # mV x mA = uW
        except (OSError, ValueError):
            continue
    return out


def _rail_key(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")[:24]
    return f"power_{slug}_mw" if slug else ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(path: Path) -> float:
    """The leading number of a sysfs value ("5123" or "32760 ma")."""
    return float(path.read_text().split()[0])
