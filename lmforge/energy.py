"""What a run really used: energy from the hardware's own counters, wall time, peak memory.

The counters, read at the start and the end of training and summed over what the process can see:

- **GPUs**: NVIDIA's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the
  driver loaded; Volta and later), through ``pynvml`` (the ``nvidia-ml-py`` package). Each rank reads its own
  device; the callback sums the ranks.
- **CPU packages**: Intel/AMD RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``, microjoules, wrapping at
  ``max_energy_range_uj``), where the files are readable (often root only). DRAM is left out (not every machine
  has the domain; counting it on some and not others would make runs incomparable).
These are the counters codecarbon reads too; lmforge reads them itself rather than depending on codecarbon
because codecarbon fills in what it cannot read (a CPU without readable RAPL, which is most cloud machines) with a
model of the CPU's TDP and reports the sum as one measured number, and it looks the location up online unless run
offline. Here what no counter measured stays "not measured".

Nothing here estimates what it cannot read. CO2 is energy x PUE x grid intensity, computed only when an
intensity is given (``grid_g_per_kwh``); :mod:`lmforge.callbacks`' ``EnergyMeter`` records the numbers in the
checkpoint, which the model card reports (the Hub's ``co2_eq_emissions``).
"""

from __future__ import annotations

import glob
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RAPL_ROOT = Path("/sys/class/powercap")
"""Where Linux exposes RAPL counters (a parameter for tests)."""


@dataclass
class Reading:
    """The cumulative counters at one moment: joules per source (None where a source is not readable)."""

    gpu_j: float | None = None
    cpu_j: float | None = None
    raw: dict[str, float] = field(default_factory=dict)
    """Per counter (``rapl:intel-rapl:0``, ``nvml:0``): its raw value in joules, to compute wraparounds."""


def _rapl_domains(root: Path) -> list[Path]:
    """The package-level RAPL domains (``intel-rapl:0``, ``intel-rapl:1``; not their subdomains)."""
    return sorted(Path(p) for p in glob.glob(str(root / "intel-rapl:*")) if Path(p).name.count(":") == 1)


def _read_number(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


class CounterSet:
    """The energy counters this process can read, and the joules they counted since :meth:`start`."""

    def __init__(self, backend: str = "auto", device: int | None = None, rapl_root: Path | None = None) -> None:
        """
        Args:
            backend: auto (NVML on GPUs, RAPL on CPUs, whatever is readable), nvml, rapl, or off.
            device: The CUDA device this process trains on (its GPU's counter); None: no GPU counter.
            rapl_root: Where the RAPL files are (default /sys/class/powercap).
        """
        if backend not in ("auto", "nvml", "rapl", "off"):
            raise ValueError(f"energy backend {backend!r} is not one of auto, nvml, rapl, off")
        self.backend = backend
        self.rapl_root = rapl_root or RAPL_ROOT
        self._nvml = self._open_nvml(device) if backend in ("auto", "nvml") and device is not None else None
        self._rapl = _rapl_domains(self.rapl_root) if backend in ("auto", "rapl") else []
        self._rapl = [d for d in self._rapl if _read_number(d / "energy_uj") is not None]
        self._start: Reading | None = None
        self._last: Reading | None = None
        self._wrapped: dict[str, float] = {}

    @staticmethod
    def _open_nvml(device: int):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises on GPUs without the counter
            return handle
        except Exception:  # no pynvml, no driver, or a GPU older than Volta: not readable
            return None

    @property
    def sources(self) -> list[str]:
        """What is read: ``nvml`` and/or ``rapl``; empty when nothing is readable."""
        return (["nvml"] if self._nvml is not None else []) + (["rapl"] if self._rapl else [])

    def read(self) -> Reading:
        raw: dict[str, float] = {}
        gpu = cpu = None
        if self._nvml is not None:
            import pynvml

            try:
                raw["nvml"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml) / 1e3  # mJ -> J
            except Exception:
                pass
        for domain in self._rapl:
            value = _read_number(domain / "energy_uj")
            if value is not None:
                raw[f"rapl:{domain.name}"] = value / 1e6  # uJ -> J
        previous = self._last.raw if self._last is not None else {}
        for key, value in raw.items():  # a RAPL counter wraps at max_energy_range_uj
            if key in previous and value < previous[key] and key.startswith("rapl:"):
                limit = _read_number(self.rapl_root / key.removeprefix("rapl:") / "max_energy_range_uj")
                self._wrapped[key] = self._wrapped.get(key, 0.0) + (limit or 0.0) / 1e6
        total = {key: value + self._wrapped.get(key, 0.0) for key, value in raw.items()}
        if "nvml" in total:
            gpu = total["nvml"]
        rapl = [v for k, v in total.items() if k.startswith("rapl:")]
        if rapl:
            cpu = sum(rapl)
        reading = Reading(gpu, cpu, raw)
        self._last = reading
        return reading

    def start(self) -> None:
        self._wrapped.clear()
        self._last = None
        self._start = self.read()

    def since_start(self) -> tuple[float | None, float | None]:
        """(GPU joules, CPU joules) since :meth:`start`; None for a source that is not readable."""
        if self._start is None:
            return None, None
        now = self.read()

        def delta(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else max(0.0, b - a)

        return delta(self._start.gpu_j, now.gpu_j), delta(self._start.cpu_j, now.cpu_j)


def peak_memory_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """(bytes, what they are): CUDA's peak allocated memory on a GPU, else the process' peak resident set."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "peak resident set size of the process"


def kwh(joules: float | None) -> float | None:
    return None if joules is None else joules / 3.6e6


def summarize(
    seconds: float,
    gpu_j: float | None,
    cpu_j: float | None,
    sources: list[str],
    pue: float = 1.0,
    grid_g_per_kwh: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What a run records: time, energy by source and in all (x PUE), CO2 when a grid intensity is given."""
    measured = [j for j in (gpu_j, cpu_j) if j is not None]
    total = sum(measured) * pue if measured else None
    out: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "energy_sources": sources,
        "gpu_kwh": kwh(gpu_j),
        "cpu_kwh": kwh(cpu_j),
        "pue": pue,
        "energy_kwh": kwh(total),
        "grid_g_per_kwh": grid_g_per_kwh,
        "co2_g": None if total is None or grid_g_per_kwh is None else kwh(total) * grid_g_per_kwh,
        **extra,
    }
    return out


def describe(measured: dict[str, Any]) -> str:
    """One line: ``energy 0.012 kWh (nvml, PUE 1.1), 5.1 g CO2eq at 420 g/kWh, 3.2 min``."""
    seconds = measured["seconds"]
    parts = [f"{seconds:.1f} s of training" if seconds < 120 else f"{seconds / 60:.1f} min of training"]
    if measured.get("energy_kwh") is None:
        parts.append("energy not measured (no readable GPU or RAPL counter on this machine)")
    else:
        parts.append(
            f"energy {measured['energy_kwh']:.4g} kWh ({' + '.join(measured['energy_sources'])}, PUE {measured['pue']:g})"
        )
        if measured.get("co2_g") is not None:
            parts.append(f"{measured['co2_g']:.3g} g CO2eq at {measured['grid_g_per_kwh']:g} g/kWh")
    if measured.get("peak_memory_bytes"):
        parts.append(f"peak memory {measured['peak_memory_bytes'] / 2**30:.2f} GiB ({measured['peak_memory_what']})")
    return ", ".join(parts)
