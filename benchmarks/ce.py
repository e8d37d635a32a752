"""Output loss speed and memory: lmforge's fused linear + cross-entropy against what users have today.

The computation measured, for every provider: the forward and backward of
``loss = cross_entropy(hidden @ W.T, targets)`` (mean over the tokens), with the gradients of ``hidden``
(N, C) and of ``W`` (V, C), in bf16 on CUDA (``--dtype`` for fp16 or fp32). N is the number of tokens,
C the hidden size, V the vocabulary.

Providers, each skipped with a note when it cannot be imported or fails:

* ``lmforge``: ``lmforge.kernels.linear_cross_entropy.linear_cross_entropy`` (``use_triton=True`` on CUDA:
  the Triton row kernel; on CPU the chunked torch path); the (N, V) logits never exist whole;
* ``torch-eager``: ``F.cross_entropy(F.linear(hidden, W).float(), targets)``: the logits upcast to fp32,
  as a typical training script does;
* ``torch-compile``: the same function through ``torch.compile`` (compiled once per shape, untimed);
* ``liger``: ``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss`` (CUDA only);
* ``lmforge@T``: lmforge with a fixed chunk of T tokens, one per value of ``--lmforge-chunks`` (the
  trade-off between the memory of one chunk of logits and the traffic of re-reading W per chunk).

Shapes (tokens, hidden, vocab): the anchors (8192, 768, 50257) and (8192, 4096, 128256), a sweep over
tokens {2048, 4096, 8192, 16384} at (768, 50257) and one over vocab {32000, 50257, 128256, 256000} at
(8192, 2048). ``--quick``: the anchors only. ``--tokens/--hidden/--vocab``: one shape.

Measured side by side in one run, one provider at a time (everything freed in between):

* time: mean ms of one forward + backward, by ``triton.testing.do_bench`` on CUDA (CUDA events, L2
  flushed before each call, ``--warmup`` and ``--rep`` ms budgets, gradients reset to None before each
  call so accumulation is not timed), through ``benchmarks/harness.py``;
* peak extra memory: ``torch.cuda.max_memory_allocated`` during one step, after
  ``reset_peak_memory_stats``, minus what was allocated before it (the inputs). It includes the two
  gradients, (N*C + V*C) elements, which any provider must allocate; that floor is printed per shape.
  A provider that runs out of memory is recorded as "OOM".
* transient memory: that peak minus what the step leaves allocated (its gradients): the memory a
  provider needs only while it runs. ANCHORS.md's memory column matches this reading (Liger's 12 and
  63 MiB are one chunk of its logits; torch.compile's 1572 and 2004 MiB the whole logits), so the
  "mem vs liger" column (transient over Liger's transient) is the one to hold against its bar.
* the floor set by the three matrix products (logits = h @ W.T, dh = dlogits @ W, dW = dlogits.T @ h),
  2*N*C*V FLOPs each: floor ms = 6*N*C*V / (dense bf16 peak FLOP/s), with the card's peak (989 TFLOP/s
  for H100 SXM and H200; ``--peak-tflops`` for another card). "floor %" = floor ms / measured ms: the
  fraction of the card's peak that the step achieves, counting only those three products.
* "vs X" = ms / X's ms at the same shape (below 1: faster than X).

Results: one CSV row per measurement appended to ``<out>/ce.csv`` (device, versions and date on every
row) as soon as it is measured, and printed; a table on stdout at the end, and
``<out>/ce_<dtype>_<device>.png``: time and memory per provider for each shape (two panels), plus
``ce_sweep_...png`` (against tokens and vocab) on the full sweep. A row's "vs X" columns are filled when X
was measured before it at that shape (lmforge is measured first, so its own row has them empty; the table
at the end has them all). Cut short (SIGINT, SIGTERM, e.g. ``timeout -s INT``), the script prints the
table of what it measured and exits with code 130, every row measured already in the CSV.

Without CUDA no speed is claimed: speed claims come only from GPU runs. The script says so, then
(a) checks lmforge's loss and gradients in fp32 against torch eager in float64 at tiny shapes (the chunked
torch path, and the Triton row kernel under ``TRITON_INTERPRET=1`` when triton is installed), and
(b) times lmforge's chunked torch path against torch eager on CPU in fp32 at small shapes. The CPU peak
memory is the peak, during one step, of the bytes held through PyTorch's CPU allocator that were allocated
during that step: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free, summed
here in time order (memory a library allocates outside PyTorch's allocator, such as oneDNN scratch space,
is not seen). This takes well under a minute.

    python benchmarks/ce.py                    # the full sweep (GPU), or the CPU checks
    python benchmarks/ce.py --quick            # the two anchor shapes
    python benchmarks/ce.py --tokens 8192 --hidden 4096 --vocab 128256 --providers lmforge,liger
    python benchmarks/ce.py --quick --lmforge-chunks 128,512,2048   # lmforge's chunk size against the default
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch import Tensor

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (hidden (N, C), weight (V, C), targets (N,)) -> scalar

PROVIDERS = ("lmforge", "torch-eager", "torch-compile", "liger")
CPU_PROVIDERS = ("lmforge", "torch-eager")  # the default on CPU; the others only when asked for
REFERENCES = ("torch-eager", "torch-compile", "liger")  # the "vs X" columns
DTYPES = harness.DTYPES
ANCHORS = ((8192, 768, 50257), (8192, 4096, 128256))
SWEEP_TOKENS = (2048, 4096, 8192, 16384)  # at hidden 768, vocab 50257
TOKENS_AT = (768, 50257)
SWEEP_VOCAB = (32000, 50257, 128256, 256000)  # at tokens 8192, hidden 2048
VOCAB_AT = (8192, 2048)
CPU_SHAPES = ((1024, 256, 8192), (2048, 256, 32000))
# Smoke cases: (tokens, hidden, vocab, chunk_size, fraction of targets ignored).
SMOKE_CASES = ((37, 24, 101, None, 0.0), (64, 32, 1000, 16, 0.25))
SMOKE_TOLERANCE = 1e-5  # max abs error <= tolerance x max |float64 reference|, for loss and both gradients
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Shape:
    """One problem: hidden (tokens, hidden), weight (vocab, hidden), targets (tokens,)."""

    tokens: int
    hidden: int
    vocab: int

    @property
    def flops(self) -> float:
        """The three matrix products, 2*N*C*V FLOPs each."""
        return 6.0 * self.tokens * self.hidden * self.vocab

    def grad_mib(self, dtype: torch.dtype) -> float:
        """The gradients of hidden and W: the extra memory no provider can avoid."""
        return (self.tokens + self.vocab) * self.hidden * dtype.itemsize / 2**20

    @property
    def label(self) -> str:
        return f"N{self.tokens} C{self.hidden} V{self.vocab}"

    @property
    def short(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}"


@dataclass
class Result:
    """One provider at one shape: mean ms and peak extra MiB, or why there are none ("OOM", "failed")."""

    shape: Shape
    provider: str
    ms: float | None
    peak_mib: float | None
    status: str = "ok"
    kept_mib: float | None = None  # what the step leaves allocated: its gradients

    @property
    def transient_mib(self) -> float | None:
        """The peak above what the step leaves allocated: memory needed only while it runs."""
        return None if self.peak_mib is None or self.kept_mib is None else self.peak_mib - self.kept_mib

    @property
    def tflops(self) -> float | None:
        return None if self.ms is None else self.shape.flops / (self.ms * 1e-3) / 1e12


# -- providers --------------------------------------------------------------------------------------
def eager_loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """What users write: bf16 logits, upcast to fp32 for the loss."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)


def load_lmforge(device: torch.device, chunk_size: int | None = None) -> tuple[Loss | None, str]:
    """lmforge's fused loss (the Triton row kernel on CUDA, the chunked torch path on CPU), or why not;
    ``chunk_size`` tokens per chunk (default: lmforge's own choice)."""
    try:
        from lmforge.kernels.linear_cross_entropy import linear_cross_entropy
    except Exception as err:  # a missing or half-written module must not stop the other measurements
        return None, f"cannot import lmforge.kernels.linear_cross_entropy ({harness.short_error(err)})"
    options = dict(ignore_index=IGNORE_INDEX, use_triton=device.type == "cuda", chunk_size=chunk_size)
    return functools.partial(linear_cross_entropy, **options), ""


def load_compile(device: torch.device) -> tuple[Loss | None, str]:
    """torch.compile of :func:`eager_loss`; the compile happens at the first call (and fails there, if it does)."""
    if not hasattr(torch, "compile"):
        return None, "this torch has no torch.compile"
    return torch.compile(eager_loss, dynamic=False), ""


def load_liger(device: torch.device) -> tuple[Loss | None, str]:
    """Liger-Kernel's fused linear cross-entropy (Triton, CUDA only), or why not."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as err:
        return (
            None,
            f"cannot import liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss ({harness.short_error(err)})",
        )
    if device.type != "cuda":
        return None, "Liger-Kernel's Triton kernels need CUDA"
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return lambda hidden, weight, targets: module(weight, hidden, targets), ""


LOADERS: dict[str, Callable[[torch.device], tuple[Loss | None, str]]] = {
    "lmforge": load_lmforge,
    "torch-eager": lambda device: (eager_loss, ""),
    "torch-compile": load_compile,
    "liger": load_liger,
}


def chunk_variant(name: str) -> int | None:
    """T for a provider named ``lmforge@T`` (lmforge with T tokens per chunk), else None."""
    return int(name.split("@", 1)[1]) if name.startswith("lmforge@") else None


def provider_rank(name: str) -> tuple[int, int]:
    """Table and plot order: lmforge, its chunk variants by size, then the references."""
    chunk = chunk_variant(name)
    return (0, chunk) if chunk is not None else (PROVIDERS.index(name) * 2, 0)


def provider_color(name: str, names: Sequence[str]) -> str:
    """A fixed colour per reference provider; the chunk variants take the colours after them."""
    if chunk_variant(name) is None:
        return f"C{PROVIDERS.index(name)}"
    variants = sorted((n for n in names if chunk_variant(n) is not None), key=provider_rank)
    return f"C{len(PROVIDERS) + variants.index(name)}"


def load_providers(names: Sequence[str], device: torch.device) -> dict[str, Loss]:
    """The providers among ``names`` that can be loaded here; a note for each that cannot."""
    found = {}
    for name in names:
        chunk = chunk_variant(name)
        loss, why = LOADERS[name](device) if chunk is None else load_lmforge(device, chunk)
        if loss is None:
            print(f"note: {name} is unavailable, skipped: {why}")
        else:
            found[name] = loss
    return found


# -- measurement ------------------------------------------------------------------------------------
def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Tensor, ...]:
    """hidden ~ N(0, 1), W ~ N(0, 1/C) (logits ~ N(0, 1), as at initialisation), uniform targets."""
    generator = torch.Generator(device=device).manual_seed(seed)
    size = shape.hidden
    hidden = torch.randn((shape.tokens, size), generator=generator, device=device, dtype=dtype)
    weight = torch.randn((shape.vocab, size), generator=generator, device=device, dtype=dtype).mul_(size**-0.5)
    targets = torch.randint(0, shape.vocab, (shape.tokens,), generator=generator, device=device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def measure(
    loss_fn: Loss, name: str, shape: Shape, inputs: tuple[Tensor, ...], args: argparse.Namespace, device: torch.device
) -> Result:
    """Time one forward + backward (the first, untimed call compiles where there is compiling), then its memory."""
    hidden, weight, targets = inputs

    def step() -> None:
        loss_fn(hidden, weight, targets).backward()

    ms = harness.timeit(step, args.warmup, args.rep, grad_to_none=[hidden, weight], device=device, min_rep=3)
    harness.release(device, hidden, weight)
    use = harness.step_memory(step, device)
    if use is None:
        return Result(shape, name, ms, None)
    return Result(shape, name, ms, use[0] / 2**20, kept_mib=use[1] / 2**20)


def make_recorder(args: argparse.Namespace, device: torch.device, preset: str, peak: float | None) -> harness.Recorder:
    """ce.csv's recorder: each result's row, and its line with its memory and the ratios to the references so far."""

    def line(r: Result, results: list[Result]) -> str:
        if r.ms is None:
            return f"    {r.provider:<16} {r.status}"
        memory = "" if r.peak_mib is None else f", peak {r.peak_mib:,.1f} MiB"
        return f"    {r.provider:<16} {r.ms:9.3f} ms{memory}{harness.versus(r, results, REFERENCES, ratio)}"

    def row(r: Result, results: list[Result]) -> dict:
        return csv_row(r, results, preset, peak, args, device)

    return harness.Recorder(args.out / "ce.csv", row, line, preset=preset)


def measure_shape(
    shape: Shape,
    providers: dict[str, Loss],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    dropped: dict[str, str],
    notes: list[str],
    recorder: harness.Recorder,
) -> None:
    """Every provider at one shape, each result recorded. Out of memory: an "OOM" row. Any other failure: a
    "failed" row, and the provider is dropped for the remaining shapes (its reason in ``dropped``)."""
    try:
        inputs = make_inputs(shape, dtype, device)
    except Exception as err:
        if not harness.is_oom(err):
            raise
        harness.release(device)
        for name in providers:
            if name not in dropped:
                recorder.add(Result(shape, name, None, None, "OOM"))
        return
    for name, loss_fn in providers.items():
        if name in dropped:
            continue
        if name == "torch-compile":
            torch._dynamo.reset()  # a fresh compile per shape, so the recompile limit never falls back to eager
        try:
            result = measure(loss_fn, name, shape, inputs, args, device)
        except Exception as err:  # torch.OutOfMemoryError, a compiler that fails, a kernel's own error
            status = "OOM" if harness.is_oom(err) else "failed"
            result = Result(shape, name, None, None, status)
            if status == "failed":
                dropped[name] = f"{shape.label}: {harness.short_error(err)}"
                notes.append(f"{name} failed and was skipped for the remaining shapes: {dropped[name]}")
        recorder.add(result)
        harness.release(device, *inputs[:2])
    del inputs
    harness.release(device)


def run(
    shapes: Sequence[Shape],
    providers: dict[str, Loss],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    recorder: harness.Recorder,
) -> list[Result]:
    """Every shape in turn, each result recorded as soon as it is measured; a KeyboardInterrupt propagates
    (what was recorded stays in ``recorder``), after the notes so far are printed."""
    dropped: dict[str, str] = {}
    with harness.printed_notes() as notes:
        for i, shape in enumerate(shapes, 1):
            print(f"  [{i}/{len(shapes)}] {shape.label}", flush=True)
            measure_shape(shape, providers, args, device, dtype, dropped, notes, recorder)
    return recorder.results


# -- report -----------------------------------------------------------------------------------------
def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    """The card's dense bf16/fp16 peak in TFLOP/s: ``--peak-tflops``, else from its name; None if unknown."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda" or args.dtype_name == "fp32":
        return None
    return harness.peak_tflops(harness.device_name(device))


def floor_ms(shape: Shape, peak: float | None) -> float | None:
    """6*N*C*V FLOPs at the peak, in ms."""
    return None if not peak else shape.flops / (peak * 1e12) * 1e3


def find(results: Sequence[Result], shape: Shape, provider: str) -> Result | None:
    return next((r for r in results if r.shape == shape and r.provider == provider), None)


def ratio(result: Result, results: Sequence[Result], reference: str) -> float | None:
    """``result``'s ms over ``reference``'s at the same shape (None when either has no time)."""
    other = find(results, result.shape, reference)
    if result.ms is None or other is None or other.ms is None:
        return None
    return result.ms / other.ms


def ordered(results: Sequence[Result], shapes: Sequence[Shape]) -> list[Result]:
    """By shape (as swept), then provider (lmforge first)."""
    return sorted(results, key=lambda r: (shapes.index(r.shape), provider_rank(r.provider)))


def memory_ratio(result: Result, results: Sequence[Result], reference: str) -> float | None:
    """``result``'s transient memory over ``reference``'s at the same shape (None when either has none)."""
    other = find(results, result.shape, reference)
    mine = result.transient_mib
    theirs = None if other is None else other.transient_mib
    return None if mine is None or not theirs else mine / theirs


def references_in(results: Sequence[Result]) -> list[str]:
    """The reference providers with at least one time, in REFERENCES order."""
    return [ref for ref in REFERENCES if any(r.provider == ref and r.ms is not None for r in results)]


def print_floors(shapes: Sequence[Shape], peak: float | None, dtype: torch.dtype, device: torch.device) -> None:
    """Per shape: the FLOPs, the matmul floor (CUDA with a known peak) and the gradient memory floor."""
    if device.type == "cuda" and peak:
        print(
            f"floor: 3 matmuls (h @ W.T, dlogits @ W, dlogits.T @ h) of 2*N*C*V FLOPs each = 6*N*C*V FLOPs; "
            f"floor ms = 6*N*C*V / ({peak:g} TFLOP/s, the dense bf16 peak of {harness.device_name(device)})"
        )
    elif device.type == "cuda":
        print("floor: no dense peak is known for this card and dtype; pass --peak-tflops to see the floor")
    for s in shapes:
        floor = floor_ms(s, peak)
        text = f"  {s.label}: 6NCV = {s.flops / 1e12:.3g} TFLOP"
        text += f", floor {floor:.3f} ms" if floor is not None else ""
        text += f"; gradients of h and W alone: {s.grad_mib(dtype):,.1f} MiB"
        text += f"; fp32 logits would be {s.tokens * s.vocab * 4 / 2**20:,.0f} MiB"
        print(text)


def table_row(
    r: Result, results: Sequence[Result], refs: Sequence[str], peak: float | None, cuda: bool
) -> list[object]:
    s = r.shape
    row: list[object] = [s.tokens, s.hidden, s.vocab, r.provider]
    if r.ms is None:
        return row + [r.status, r.status, r.status] + ["-"] * (1 + len(refs) + ("liger" in refs))
    row += [f"{r.ms:.3f}"] + ["n/a" if m is None else f"{m:,.1f}" for m in (r.peak_mib, r.transient_mib)]
    floor = floor_ms(s, peak)
    if cuda:
        row.append("-" if floor is None else f"{100 * floor / r.ms:.1f}%")
    else:
        row.append(f"{r.tflops * 1e3:.1f}")
    for ref in refs:
        value = ratio(r, results, ref)
        row.append("-" if value is None else f"{value:.2f}x")
    if "liger" in refs:
        value = memory_ratio(r, results, "liger")
        row.append("-" if value is None else f"{value:.2f}x")
    return row


def print_results(
    results: Sequence[Result], shapes: Sequence[Shape], peak: float | None, dtype: torch.dtype, device: torch.device
) -> None:
    cuda = device.type == "cuda"
    refs = references_in(results)
    headers = ["tokens", "hidden", "vocab", "provider", "ms", "peak MiB", "transient MiB"]
    headers += ["floor %" if cuda else "GFLOP/s"] + [f"vs {ref.removeprefix('torch-')}" for ref in refs]
    headers += ["mem vs liger"] if "liger" in refs else []
    harness.print_table(headers, [table_row(r, results, refs, peak, cuda) for r in ordered(results, shapes)])
    print_floors(shapes, peak, dtype, device)
    memory = "torch.cuda.max_memory_allocated" if cuda else "torch.profiler allocator events"
    print(f"ms: mean of one forward + backward; peak MiB: extra memory at the peak of one step ({memory})")
    print("transient MiB: that peak minus what the step leaves allocated (its gradients); ANCHORS.md's reading")
    if cuda:
        print("floor % = floor ms / ms x 100 (= achieved 6*N*C*V FLOP/s over the card's peak)")
    else:
        print("GFLOP/s = 6*N*C*V / time (no floor on CPU)")
    if refs:
        print("vs X = ms / X's ms at the same shape (below 1: faster than X)")
    if "liger" in refs:
        print("mem vs liger = transient MiB / Liger's transient MiB at the same shape (the bar: at most 2)")


def csv_row(
    r: Result,
    results: Sequence[Result],
    preset: str,
    peak: float | None,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    """The CSV row of ``r``; its ratios from ``results`` (what was measured so far)."""
    dtype = DTYPES[args.dtype_name]
    floor = floor_ms(r.shape, peak)
    refs = {f"vs_{ref.removeprefix('torch-')}": ratio(r, results, ref) for ref in REFERENCES}
    return {
        "preset": preset,
        "device": device.type,
        "dtype": args.dtype_name,
        "tokens": r.shape.tokens,
        "hidden": r.shape.hidden,
        "vocab": r.shape.vocab,
        "provider": r.provider,
        "status": r.status,
        "ms": "" if r.ms is None else f"{r.ms:.6g}",
        "peak_mib": "" if r.peak_mib is None else f"{r.peak_mib:.1f}",
        "transient_mib": "" if r.transient_mib is None else f"{r.transient_mib:.1f}",
        "mem_vs_liger": "" if (m := memory_ratio(r, results, "liger")) is None else f"{m:.4g}",
        "grad_mib": f"{r.shape.grad_mib(dtype):.1f}",
        "gflop": f"{r.shape.flops / 1e9:.6g}",
        "peak_tflops": "" if peak is None else f"{peak:g}",
        "floor_ms": "" if floor is None else f"{floor:.6g}",
        "floor_fraction": "" if floor is None or r.ms is None else f"{floor / r.ms:.4g}",
        **{key: "" if value is None else f"{value:.4g}" for key, value in refs.items()},
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "warmup_ms": f"{args.warmup:g}",
        "rep_ms": f"{args.rep:g}",
    }


def short_number(value: float) -> str:
    """1,234 or 56.7 or 0.891: thousands separators, three significant digits below 100."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def plot_bars(path: Path, results: Sequence[Result], shapes: Sequence[Shape], title: str) -> bool:
    """Three panels, time, peak and transient memory: a group of bars per shape, one bar per provider; False without
    matplotlib. A provider without a number gets its status ("OOM", "failed") written in its place."""
    plt = harness.pyplot()
    if plt is None:
        return False
    providers = sorted({r.provider for r in results}, key=provider_rank)
    colors = {p: provider_color(p, providers) for p in providers}
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 2.0 + 1.3 * len(shapes)), 11.0))
    panels = (
        ("ms", "forward + backward, ms"),
        ("peak_mib", "peak extra memory, MiB"),
        ("transient_mib", "transient memory, MiB"),
    )
    for ax, (metric, ylabel) in zip(axes, panels):
        values = {p: [bar_value(find(results, shape, p), metric) for shape in shapes] for p in providers}
        harness.grouped_bars(ax, values, colors, short_number, fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(shapes)), [s.short for s in shapes], rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(lambda y, _: short_number(y))
        ax.yaxis.set_minor_formatter(lambda y, _: "")
        ax.margins(y=0.25)
        ax.set_xlabel("tokens x hidden x vocab")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return harness.save_figure(plt, fig, path)


def bar_value(r: Result | None, metric: str) -> float | str | None:
    """A bar's height: the result's ``metric``; its status ("OOM", "failed") when it has none; None without it."""
    if r is None:
        return None
    value = getattr(r, metric)
    return r.status if value is None else value


def sweep_panels(results: Sequence[Result]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Time and memory against tokens (at hidden 768, vocab 50257) and against vocab (at 8192 x 2048)."""
    sweeps = {
        "tokens": (lambda s: (s.hidden, s.vocab) == TOKENS_AT and s.tokens in SWEEP_TOKENS, "tokens", TOKENS_AT),
        "vocab": (lambda s: (s.tokens, s.hidden) == VOCAB_AT and s.vocab in SWEEP_VOCAB, "vocab", VOCAB_AT),
    }
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for axis, (member, attr, at) in sweeps.items():
        chosen = [r for r in results if member(r.shape)]
        if len({getattr(r.shape, attr) for r in chosen}) < 2:
            continue
        fixed = f"hidden {at[0]}, vocab {at[1]}" if axis == "tokens" else f"tokens {at[0]}, hidden {at[1]}"
        for metric, what in (("ms", "ms"), ("peak_mib", "peak MiB")):
            panel = f"{what} against {axis} ({fixed})"
            for r in sorted(chosen, key=lambda r: provider_rank(r.provider)):
                value = getattr(r, metric)
                if value is not None:
                    panels.setdefault(panel, {}).setdefault(r.provider, []).append((getattr(r.shape, attr), value))
    return panels


def write_outputs(
    results: Sequence[Result],
    shapes: Sequence[Shape],
    args: argparse.Namespace,
    device: torch.device,
    recorder: harness.Recorder,
) -> None:
    """Where the CSV rows went, the bar plot and, on a sweep, the line plot."""
    preset = recorder.preset
    if not recorder.wrote():
        return
    name = harness.device_name(device)
    stem = f"ce_{args.dtype_name}_{harness.slug(name)}{'' if preset in ('full', 'cpu') else '_' + preset}"
    title = f"linear + cross-entropy, forward + backward, {args.dtype_name}; {name}"
    png = args.out / f"{stem}.png"
    if not harness.saved_plot(png, plot_bars(png, results, shapes, title)):
        return
    panels = sweep_panels(results)
    sweep_png = args.out / f"ce_sweep_{args.dtype_name}_{harness.slug(name)}.png"
    if panels and harness.plot_lines(
        sweep_png, panels, xlabel="tokens (top row), vocab (bottom row)", ylabel="ms or MiB", title=title
    ):
        print(f"wrote {sweep_png}")


# -- GPU --------------------------------------------------------------------------------------------
def picked_shape(args: argparse.Namespace, default: tuple[int, int, int]) -> list[Shape] | None:
    """The one shape of --tokens/--hidden/--vocab (missing ones from ``default``), or None when none is given."""
    given = (args.tokens, args.hidden, args.vocab)
    if all(v is None for v in given):
        return None
    return [Shape(*(v if v is not None else d for v, d in zip(given, default)))]


def gpu_shapes(args: argparse.Namespace) -> tuple[list[Shape], str]:
    """The shapes to measure and the preset's name."""
    picked = picked_shape(args, ANCHORS[0])
    if picked:
        return picked, "custom"
    anchors = [Shape(*s) for s in ANCHORS]
    if args.quick:
        return anchors, "quick"
    tokens = [Shape(n, *TOKENS_AT) for n in SWEEP_TOKENS]
    vocab = [Shape(*VOCAB_AT, v) for v in SWEEP_VOCAB]
    return list(dict.fromkeys(anchors + tokens + vocab)), "full"


def gpu_main(args: argparse.Namespace, device: torch.device) -> int:
    dtype = DTYPES[args.dtype_name]
    shapes, preset = gpu_shapes(args)
    peak = peak_tflops(args, device)
    print(
        f"{len(shapes)} shape(s), {args.dtype_name}, forward + backward, do_bench {args.warmup:g} ms warm-up + "
        f"{args.rep:g} ms timed per measurement (mean)"
    )
    recorder = make_recorder(args, device, preset, peak)
    return harness.measure_and_report(
        recorder,
        lambda: load_providers(list(args.providers or PROVIDERS) + chunk_names(args), device),
        lambda providers: run(shapes, providers, args, device, dtype, recorder),
        lambda results: print_results(results, shapes, peak, dtype, device),
        lambda: write_outputs(recorder.results, shapes, args, device, recorder),
        cut_report(shapes, peak, dtype, device),
    )


def cut_report(
    shapes: Sequence[Shape], peak: float | None, dtype: torch.dtype, device: torch.device
) -> Callable[[list[Result]], None]:
    """Cut short: the table of the shapes measured so far."""
    return lambda results: print_results(
        results, harness.measured(shapes, results, lambda r: r.shape), peak, dtype, device
    )


# -- CPU checks -------------------------------------------------------------------------------------
def reference(hidden: Tensor, weight: Tensor, targets: Tensor) -> list[Tensor]:
    """Loss and gradients of torch eager in float64."""
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss = F.cross_entropy(F.linear(h64, w64), targets, ignore_index=IGNORE_INDEX)
    loss.backward()
    return [loss.detach(), h64.grad, w64.grad]


def smoke_inputs(tokens: int, hidden: int, vocab: int, ignored: float) -> tuple[Tensor, ...]:
    """fp32 inputs of a smoke case, with ``ignored`` of the targets set to the ignore index."""
    h, w, t = make_inputs(Shape(tokens, hidden, vocab), torch.float32, torch.device("cpu"), seed=1)
    t[torch.rand(tokens, generator=torch.Generator().manual_seed(2)) < ignored] = IGNORE_INDEX
    return h, w, t


def smoke_case(loss_fn: Callable[..., Tensor], path: str, case: tuple, **options: object) -> list[object]:
    """One table row: the case, max abs errors of loss, dh and dW against float64, and pass or FAIL."""
    tokens, hidden, vocab, chunk, ignored = case
    cells: list[object] = [path, tokens, hidden, vocab, chunk or "auto", f"{ignored:.0%}"]
    h, w, t = smoke_inputs(tokens, hidden, vocab, ignored)

    def compute() -> list[Tensor]:
        loss = loss_fn(h, w, t, chunk_size=chunk, ignore_index=IGNORE_INDEX, **options)
        loss.backward()
        return [loss.detach(), h.grad, w.grad]

    expected = lambda: reference(h, w, t)  # noqa: E731
    return harness.smoke_row(cells, compute, expected, tolerance=SMOKE_TOLERANCE, columns=3, relative=True)


def smoke() -> bool | None:
    """(a) lmforge against torch eager in float64; None when lmforge cannot be imported."""
    try:
        from lmforge.kernels.linear_cross_entropy import linear_cross_entropy
    except Exception as err:
        print(f"(a) lmforge is unavailable, no correctness smoke: cannot import it ({harness.short_error(err)})")
        return None
    print(
        f"(a) lmforge linear_cross_entropy, fp32, loss and gradients against torch eager in float64 "
        f"(pass: max abs error <= {SMOKE_TOLERANCE:g} x max |reference|):"
    )
    rows = [smoke_case(linear_cross_entropy, "torch", case) for case in SMOKE_CASES]
    if can_interpret():
        os.environ["TRITON_INTERPRET"] = "1"  # before lmforge.kernels.cross_entropy (and its @triton.jit) is imported
        rows += [smoke_case(linear_cross_entropy, "triton-interp", case, use_triton=True) for case in SMOKE_CASES]
    headers = ["path", "tokens", "hidden", "vocab", "chunk", "ignored", "loss err", "dh err", "dW err", "result"]
    return harness.print_smoke(headers, rows)


def can_interpret() -> bool:
    """triton is installed and lmforge's row kernel not yet built (TRITON_INTERPRET must be set before)."""
    return importlib.util.find_spec("triton") is not None and "lmforge.kernels.cross_entropy" not in sys.modules


def cpu_main(args: argparse.Namespace) -> int:
    harness.no_speed_claim()
    device = torch.device("cpu")
    names = list(args.providers or CPU_PROVIDERS) + chunk_names(args)
    args.dtype_name = "fp32"
    shapes = picked_shape(args, CPU_SHAPES[-1]) or [Shape(*s) for s in CPU_SHAPES]
    recorder = make_recorder(args, device, "cpu", None)
    report = cut_report(shapes, None, torch.float32, device)
    return recorder.until_interrupted(lambda: cpu_checks(args, names, shapes, recorder), report)


def cpu_checks(
    args: argparse.Namespace, names: Sequence[str], shapes: Sequence[Shape], recorder: harness.Recorder
) -> int:
    device = torch.device("cpu")
    passed = smoke() if "lmforge" in names and not args.no_smoke else None
    print()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"(b) forward + backward on CPU, fp32, {torch.get_num_threads()} threads, {args.warmup:g} ms warm-up + "
        f"{args.rep:g} ms timed (at least 3 calls); peak memory from torch.profiler's allocator events; "
        f"load average {harness.load_average()} (other work on the CPU slows and scatters the times; see --threads):"
    )
    providers = load_providers(names, device)
    results = run(shapes, providers, args, device, torch.float32, recorder) if providers else []
    if results:
        print_results(results, shapes, None, torch.float32, device)
    write_outputs(results, shapes, args, device, recorder)
    return 1 if passed is False else 0


# -- command line -----------------------------------------------------------------------------------
def chunk_names(args: argparse.Namespace) -> list[str]:
    """The ``lmforge@T`` providers asked for by --lmforge-chunks."""
    return [f"lmforge@{t}" for t in dict.fromkeys(args.lmforge_chunks or ())]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, "the two anchor shapes only; shorter budgets on CPU")
    p.add_argument("--tokens", type=int, help="one shape: tokens N (the others default to the first anchor)")
    p.add_argument("--hidden", type=int, help="one shape: hidden size C")
    p.add_argument("--vocab", type=int, help="one shape: vocabulary V")
    p.add_argument(
        "--lmforge-chunks",
        type=harness.positive_ints,
        help="also measure lmforge with these fixed chunk sizes in tokens, as providers lmforge@T (e.g. 256,1024)",
    )
    harness.add_bench_args(p, PROVIDERS, cpu_default=CPU_PROVIDERS, dtypes=DTYPES, smoke="the correctness smoke (a)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense peak, TFLOP/s (default: from its name)")
    p.add_argument("--threads", type=int, help="CPU checks: torch.set_num_threads (default: torch's choice)")
    args = harness.parse_bench_args(p, argv)
    if any(v is not None and v <= 0 for v in (args.tokens, args.hidden, args.vocab)):
        p.error("--tokens, --hidden and --vocab must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return harness.bench_main(parse_args, cpu_main, gpu_main, argv)


if __name__ == "__main__":
    sys.exit(main())
