"""Shared helpers for lmforge's benchmark scripts (``benchmarks/*.py``).

What every benchmark needs, in one place so that all of them measure and report alike:

* the environment: :func:`device_name` (the GPU's name, or the CPU model from ``/proc/cpuinfo``),
  :func:`versions` (python, torch, triton, lightning, lmforge, liger-kernel), :func:`iso_date`, and
  :func:`stamp`, the three together as the columns put on every CSV row;
* timing: :func:`timeit` (``triton.testing.do_bench`` on CUDA, a ``time.perf_counter`` loop on CPU; both
  take the warm-up and measurement budgets in milliseconds and return the mean time of one call in ms)
  and :func:`peak_memory` (the extra CUDA memory a call allocates at its peak);
* reporting: :func:`print_table`, :func:`write_csv` (appends, one header per file) and the matplotlib
  (Agg) plots :func:`plot_bars` and :func:`plot_lines`, which return False instead of failing when
  matplotlib is not installed.

This module never imports triton at import time (only :func:`timeit` does, on CUDA), so a script can
still set ``TRITON_INTERPRET=1`` after importing it and before importing its kernels.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``, so they
``import harness``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import importlib.util
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# Distributions reported by versions(), as (column name, module to look for, distribution name).
_PACKAGES = (
    ("triton", "triton", "triton"),
    ("lightning", "lightning", "lightning"),
    ("lmforge", "lmforge", "lmforge"),
    ("liger-kernel", "liger_kernel", "liger-kernel"),
)
VERSION_KEYS = ("python", "torch", *(name for name, _, _ in _PACKAGES))
STAMP_KEYS = ("date", "device_name", *VERSION_KEYS)


# -- environment ------------------------------------------------------------------------------------
def as_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or the CPU's model name on CPU."""
    device = as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str, distribution: str) -> str:
    """The installed version of a package, "" when it is not installed. Does not import it."""
    if module == "lmforge":  # an editable install's metadata can lag behind the source
        import lmforge

        return lmforge.__version__
    try:
        if importlib.util.find_spec(module) is None:
            return ""
    except (ImportError, ValueError):
        return ""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of python, torch, triton, lightning, lmforge and liger-kernel; "" for one not installed.

    The keys are always the same (:data:`VERSION_KEYS`), so CSV files written on different machines share
    their columns.
    """
    found = {"python": platform.python_version(), "torch": torch.__version__}
    found.update({name: _version(module, dist) for name, module, dist in _PACKAGES})
    return found


def format_versions(found: Mapping[str, str] | None = None) -> str:
    """``torch 2.5.1, triton 3.1.0, ...``: the installed ones only."""
    found = versions() if found is None else found
    return ", ".join(f"{name} {version}" for name, version in found.items() if version)


def iso_date() -> str:
    """Local date and time, ISO 8601 to the second (e.g. ``2026-11-27T07:47:12``)."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def stamp(device: torch.device | str | None = None) -> dict[str, str]:
    """The columns put on every CSV row: date, device_name and the versions."""
    return {"date": iso_date(), "device_name": device_name(device), **versions()}


# -- timing -----------------------------------------------------------------------------------------
def sync(device: torch.device | str | None = None) -> None:
    """Wait for the GPU's queued work (no-op on CPU)."""
    device = as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _timeit_loop(
    fn: Callable[[], Any],
    warmup: float,
    rep: float,
    grad_to_none: Sequence[torch.Tensor] | None,
    device: torch.device,
    min_rep: int,
) -> float:
    """do_bench's scheme with time.perf_counter: estimate one call, then fill the warm-up and rep budgets."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-6)
    for _ in range(max(1, int(warmup / estimate_ms))):
        fn()
    times = []
    for _ in range(max(min_rep, int(rep / estimate_ms))):
        _reset_grads(grad_to_none)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.fmean(times)


def timeit(
    fn: Callable[[], Any],
    warmup: float = 25,
    rep: float = 100,
    *,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    min_rep: int = 5,
) -> float:
    """Mean milliseconds per call of ``fn``, after warm-up.

    ``warmup`` and ``rep`` are time budgets in ms, as in ``triton.testing.do_bench``: one call is timed
    first, then ``warmup / estimate`` untimed calls and ``rep / estimate`` timed ones (at least one of each).
    ``grad_to_none``: tensors whose ``.grad`` is reset before each timed call (for a backward, so that
    gradient accumulation is not timed). On CUDA this is ``do_bench`` (CUDA events, L2 cache flushed
    before each call); on CPU (or without triton) a ``time.perf_counter`` loop of at least ``min_rep`` timed
    calls, since a budget of one or two calls gives the scatter of a shared CPU.
    """
    device = as_device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            with torch.cuda.device(device):
                ms = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="mean")
            return float(ms)
    return _timeit_loop(fn, warmup, rep, grad_to_none, device, min_rep)


def memory_use(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[int, int] | None:
    """CUDA bytes ``fn()`` allocates (at its peak, and still held when it returns) beyond what was
    allocated before; None on CPU. The difference of the two is the call's transient memory."""
    device = as_device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int | None:
    """Bytes of CUDA memory ``fn()`` allocates at its peak beyond what was allocated before; None on CPU."""
    use = memory_use(fn, device)
    return None if use is None else use[0]


# -- reporting --------------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)?\.?\d+([eE][-+]?\d+)?\s*(%|x|ms|s|GiB|MiB)?$")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _is_numeric(column: Sequence[str]) -> bool:
    """Right-align a column whose cells are all numbers (placeholders "", "-" and "n/a" aside)."""
    cells = [c for c in column if c not in ("", "-", "n/a", "nan")]
    return bool(cells) and all(_NUMBER.match(c) for c in cells)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned text table: numbers right-aligned, text left-aligned, a rule under the header."""
    body = [[_cell(v) for v in row] for row in rows]
    columns = list(zip(*body)) if body else [() for _ in headers]
    widths = [max([len(h), *(len(c) for c in col)]) for h, col in zip(headers, columns)]
    right = [_is_numeric(col) for col in columns]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(parts).rstrip()

    head = line(list(headers))
    rule = "-" * max(len(head), sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([head, rule, *(line(cells) for cells in body)])


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print :func:`format_table`. Cells may be str (shown as is), int (with thousands separators),
    float (3 decimals) or None (empty); format numbers yourself for other precisions."""
    print(format_table(headers, rows), flush=True)


def _csv_header(path: Path) -> list[str] | None:
    try:
        with path.open(newline="") as f:
            return next(csv.reader(f), None)
    except OSError:
        return None


def _free_csv_path(path: Path, fields: list[str]) -> Path:
    """``path``, or ``<stem>-2.csv``, ``-3``...: the first that is new or already has exactly these columns."""
    candidate, n = path, 1
    while candidate.exists() and _csv_header(candidate) != fields:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_csv(
    path: Path | str,
    rows: Sequence[Mapping[str, object]],
    *,
    common: Mapping[str, object] | None = None,
    fields: Sequence[str] | None = None,
) -> Path:
    """Append ``rows`` to the CSV file ``path``, writing the header first when the file is new.

    Every row gets the ``common`` columns: date, device name and versions, :func:`stamp` of the default
    device when not given. ``fields``: the columns, in order; common keys that are not among them are left out, a
    row key that is not among them is an error. Default: date and device_name, the rows' keys in order,
    then the versions. A file that exists with other columns is left alone: the rows go to ``<stem>-2.csv``
    (or -3, ...) instead, with a note. Returns the path written.
    """
    path = Path(path)
    extra = stamp() if common is None else dict(common)
    if fields is None:
        keys = dict.fromkeys(k for row in rows for k in row if k not in extra)
        head = [k for k in ("date", "device_name") if k in extra]
        fields = [*head, *keys, *(k for k in extra if k not in head)]
    fields = list(fields)
    unknown = sorted({k for row in rows for k in row} - set(fields))
    if unknown:
        raise ValueError(f"write_csv({path}): columns not in fields: {', '.join(unknown)}")
    target = _free_csv_path(path, fields)
    if target != path:
        print(f"note: {path} has other columns; writing to {target} instead", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    is_new = not target.exists()
    with target.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if is_new:
            writer.writeheader()
        writer.writerows({**extra, **row} for row in rows)
    return target


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_bars(
    path: Path | str,
    values: Mapping[str, float],
    *,
    ylabel: str,
    title: str,
    colors: Sequence[str] | None = None,
    fmt: str = "{:,.0f}",
    figsize: tuple[float, float] = (5, 3.5),
) -> bool:
    """A labelled bar per key of ``values``, saved to ``path``; False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=figsize)
    bars = ax.bar(list(values), list(values.values()), color=list(colors)[: len(values)] if colors else None)
    ax.bar_label(bars, fmt=fmt)
    ax.margins(y=0.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_lines(
    path: Path | str,
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = True,
    ncols: int = 2,
) -> bool:
    """One panel per key of ``panels`` (its title), one line per series (label -> [(x, y), ...]), shared
    legend; saved to ``path``. False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # a series keeps its colour in every panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        xs = sorted({x for points in series.values() for x, _ in points})
        for label, points in series.items():
            points = sorted(points)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label, color=colors[label])
        if logx:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- command line -----------------------------------------------------------------------------------
def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in items if x not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``: for file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def short_error(err: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an error, without PyTorch's "(Triggered internally at ...)", shortened."""
    lines = str(err).strip().splitlines()
    first = re.sub(r"\s*\(Triggered internally at .*", "", lines[0] if lines else "")
    text = f"{type(err).__name__}: {first}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script takes: --out, --warmup, --rep, --device."""
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/out"), help="CSV and plot directory (default benchmarks/out)"
    )
    p.add_argument("--warmup", type=float, default=25, help="warm-up budget per measurement, ms (default 25)")
    p.add_argument("--rep", type=float, default=100, help="timed budget per measurement, ms (default 100)")
    p.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu: the CPU checks even on a GPU machine"
    )


def check_run_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.warmup <= 0 or args.rep <= 0:
        p.error("--warmup and --rep must be positive")


def run_script(
    args: argparse.Namespace,
    cpu_main: Callable[[argparse.Namespace], int],
    gpu_main: Callable[[argparse.Namespace, torch.device], int],
) -> int:
    """Pick the device from --device, print it with the versions and date, and run the GPU measurement or
    the CPU checks (with shorter budgets under --quick)."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {device_name(device)}; {format_versions()}; {iso_date()}")
    if not cuda:
        if args.quick:
            args.warmup, args.rep = min(args.warmup, 10), min(args.rep, 50)
        return cpu_main(args)
    return gpu_main(args, device)
