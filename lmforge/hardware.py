"""What ``lmforge estimate`` knows about hardware and electricity: a table of accelerators (memory, dense peak
FLOP/s, board power, a typical rental price) and a table of grid carbon intensities by region.

Every figure is a round public number, good for a budget, not for a benchmark:

- Peak FLOP/s are the vendors' dense tensor-core figures (no 2:4 sparsity): bf16 (fp16 on the V100, which has
  no bf16), and plain fp32 (no TF32: PyTorch's default ``float32_matmul_precision`` is "highest"). Sources:
  the NVIDIA H100/H200, A100, V100 and L4 datasheets, the Ada (RTX 4090) architecture whitepaper (fp16 with
  fp32 accumulation). The CPU line is a nominal 16-core AVX-512 server.
- Memory is what ``torch.cuda.get_device_properties(...).total_memory`` reports on such a card (the H200's
  141 GB are about 139.8 GiB, an H100's 80 GB about 79.2 GiB); the CPU line uses this machine's RAM.
- Power is the board's maximum (TDP/TBP): training runs near it, so time x TDP is the usual estimate (as
  Luccioni et al. 2022 do for BLOOM and the Llama 2 paper for its Table 2).
- Prices are typical on-demand cloud prices per GPU-hour in 2025 (USD), to be overridden with ``--price``.
- Grid intensities are annual averages (g CO2eq per kWh) from Ember's Global Electricity Review 2024 (2023
  data); override with ``--grid``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmforge.errors import UserError

GIB = 1 << 30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    peak_tflops: float
    """Dense 16-bit tensor-core peak (bf16; fp16 where there is no bf16)."""
    fp32_tflops: float
    """Dense fp32 peak (no TF32)."""
    power_w: float
    """Board power (TDP)."""
    price_usd_per_hour: float
    bf16: bool
    """Whether it runs bf16 (lmforge's ``precision: null`` picks bf16-mixed there, 32-true elsewhere)."""
    label: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 64.0


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("h100", 79.2, 989.0, 67.0, 700.0, 3.0, True, "NVIDIA H100 SXM 80GB"),
        Accelerator("h200", 139.8, 989.0, 67.0, 700.0, 3.5, True, "NVIDIA H200 SXM 141GB"),
        Accelerator("a100-80gb", 79.2, 312.0, 19.5, 400.0, 1.8, True, "NVIDIA A100 SXM 80GB"),
        Accelerator("a100-40gb", 39.4, 312.0, 19.5, 400.0, 1.3, True, "NVIDIA A100 SXM 40GB"),
        Accelerator("v100", 31.7, 125.0, 15.7, 300.0, 0.9, False, "NVIDIA V100 SXM2 32GB (fp16 tensor cores)"),
        Accelerator("l4", 22.0, 121.0, 30.3, 72.0, 0.8, True, "NVIDIA L4 24GB"),
        Accelerator("rtx4090", 23.6, 165.2, 82.6, 450.0, 0.6, True, "NVIDIA GeForce RTX 4090 24GB"),
        Accelerator("cpu", _host_memory_gib(), 2.0, 2.0, 150.0, 0.0, False, "CPU (nominal 16-core AVX-512 server)"),
    )
}

# g CO2eq per kWh, annual averages of 2023 (Ember, Global Electricity Review 2024).
REGIONS: dict[str, float] = {
    "world": 481.0,
    "us": 369.0,
    "eu": 244.0,
    "france": 56.0,
    "germany": 381.0,
    "uk": 238.0,
    "sweden": 41.0,
    "norway": 30.0,
    "canada": 128.0,
    "china": 582.0,
    "india": 713.0,
    "japan": 485.0,
}
DEFAULT_REGION = "world"
DEFAULT_PUE = 1.2
"""Power usage effectiveness of a typical modern data centre (Uptime Institute surveys: 1.1 for the best
hyperscale sites, 1.5-1.6 on average)."""


def accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name.lower()]
    except KeyError:
        raise UserError(f"estimate: --gpu {name!r} is not one of {', '.join(ACCELERATORS)}") from None


def key_for_device(device_name: str | None) -> str | None:
    """The table's key for a CUDA device name as torch reports it ("NVIDIA H200" -> "h200"); "cpu" for None;
    None for a card the table does not hold."""
    if not device_name:
        return "cpu"
    name = device_name.lower().replace(" ", "").replace("-", "")
    if "a100" in name:
        return "a100-80gb" if "80g" in name else "a100-40gb"
    for key in ("h200", "h100", "v100", "l4", "rtx4090"):
        if key in name:
            return key
    return None


def grid_intensity(region: str) -> float:
    try:
        return REGIONS[region.lower()]
    except KeyError:
        raise UserError(
            f"estimate: --region {region!r} is not one of {', '.join(REGIONS)}; or give --grid G_CO2_PER_KWH"
        ) from None
