"""Attention speed: lmforge's fused Triton kernel against PyTorch's scaled_dot_product_attention backends.

The question: at the shapes of GPT pretraining, how fast is ``lmforge.kernels.attention.flash_attention``
compared with what PyTorch offers, forward, backward and both?

Providers, each detected by one trial call (forward and backward) and skipped with a note when it fails:

* ``lmforge``: ``flash_attention(q, k, v, causal=...)`` from ``lmforge.kernels.attention``;
* ``flash``, ``cudnn``, ``efficient``, ``math``: ``F.scaled_dot_product_attention`` with one backend forced by
  ``torch.nn.attention.sdpa_kernel`` (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION, MATH); ``math``
  materialises the N x N scores, so it only runs up to ``--math-max-n``;
* ``sdpa-default``: ``F.scaled_dot_product_attention`` with no backend forced: what users get.

Shapes: the anchor sweep keeps the tokens per batch and the model width fixed, B * N = 16384 and
H * D = 2048 (B = 16384 // N, H = 2048 // D, self-attention, H_kv = H), for D in {64, 128},
N in {1024, 2048, 4096, 8192, 16384}, causal and not, in bf16 (``--dtype fp16`` for fp16).

Modes, all with q, k, v that require grad (attention as in training):

* ``fwd``: one forward call;
* ``bwd``: the backward alone: the forward runs once, then ``out.backward(grad, retain_graph=True)`` is timed;
* ``fwd+bwd``: ``attention(q, k, v).backward(grad)``.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 cache flushed before each call, ``--warmup`` and
``--rep`` milliseconds of warm-up and timed calls, mean reported; gradients reset to None before each call so
accumulation is not timed), through ``benchmarks/harness.py``. TFLOP/s counts the FlashAttention convention:
forward = 4 * B * H * N^2 * D, halved when causal; backward = 2.5 x forward; forward+backward = 3.5 x forward.
The ratio column is lmforge's TFLOP/s over the provider's at the same shape and mode (above 1: lmforge is
faster). Peak memory is what one call allocates beyond its inputs, on CUDA. On CUDA, after each lmforge
measurement, the tile configs the Triton autotuner chose for that shape are recorded, one per kernel that ran
(``fwd 128x64 w8 s3 | dkdv 32x128 w8 s2 | dq 128x32 w4 s2``: BLOCK_M x BLOCK_N, warps, pipeline stages),
printed under the table and kept in the CSV's ``lmforge_configs`` column, to tune the config lists from.

Results: one CSV row per measurement appended to ``<out>/attn.csv`` (device name, versions and date on
every row) as soon as it is measured, and printed; a table on stdout at the end, and a plot
``<out>/attn_<dtype>_<device>.png`` of TFLOP/s against N, one panel per (D, causal), forward+backward.
A row's ``lmforge_ratio`` is filled when lmforge was measured before it at that shape and mode (lmforge
is measured first unless ``--providers`` says otherwise). ``--tiles-json PATH`` writes the tiles lmforge's
autotuners chose (``tuned_tiles()``, for ``pin_tiles``) to PATH after every lmforge measurement.

Cut short (SIGINT, SIGTERM, e.g. ``timeout -s INT``), the script prints the table of what it measured and
exits with code 130; every row measured is already in the CSV. ``--order priority`` measures the anchor
sweep's most telling shapes first (N=4096, D=128 causal first; then the other anchor lengths, D=128 before
64, causal before not; N 2048 and 8192 last), and ``--shapes D:N:causal,...`` names the shapes outright.

Without CUDA no speed is claimed: speed claims come only from GPU runs. The script then says so and checks
instead (a) the kernel's correctness under the Triton interpreter (``TRITON_INTERPRET=1``) at tiny sizes in
fp32, outputs and gradients against the math SDPA in float64, and (b) times the torch SDPA backends on CPU
at one small shape, fp32, to exercise the timing and reporting path. This takes well under a minute.

    python benchmarks/attn.py                       # the anchor sweep (GPU), or the CPU checks
    python benchmarks/attn.py --quick               # a few shapes
    python benchmarks/attn.py --d 128 --n 4096,8192 --causal yes --modes fwd+bwd --providers lmforge,flash
    python benchmarks/attn.py --order priority --modes fwd+bwd,fwd --providers lmforge,cudnn,flash
    python benchmarks/attn.py --shapes 128:4096:yes,64:4096:no --tiles-json tiles.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

Attention = Callable[[Tensor, Tensor, Tensor, bool], Tensor]

SDPA_BACKENDS: dict[str, SDPBackend | None] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "sdpa-default": None,
}
PROVIDERS = ("lmforge", *SDPA_BACKENDS)
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_MULTIPLIER = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
TOKENS, HIDDEN = 16384, 2048  # B * N and H * D of the anchor sweep
ANCHOR_N = (1024, 2048, 4096, 8192, 16384)
ANCHOR_D = (64, 128)
QUICK_N = (1024, 4096)
QUICK_D = (128,)
SMOKE_N = (17, 64)  # 17: a partial tile
SMOKE_TOLERANCE = 1e-4  # max abs error of fp32 against float64, outputs and gradients
FLOP_NOTE = (
    "FLOPs (FlashAttention convention): forward = 4*B*H*N^2*D, halved when causal; backward = 2.5 x forward; "
    "forward+backward = 3.5 x forward. TFLOP/s = FLOPs / time."
)


@dataclass(frozen=True)
class Shape:
    """One attention problem: q (b, h, n, d), k and v (b, h_kv, n, d); h_kv = h unless given."""

    b: int
    h: int
    n: int
    d: int
    causal: bool
    h_kv: int = 0

    @property
    def kv_heads(self) -> int:
        return self.h_kv or self.h

    def flops(self, mode: str) -> float:
        forward = 4 * self.b * self.h * self.n * self.n * self.d * (0.5 if self.causal else 1.0)
        return forward * FLOP_MULTIPLIER[mode]

    @property
    def label(self) -> str:
        kv = f" Hkv{self.kv_heads}" if self.kv_heads != self.h else ""
        return f"B{self.b} H{self.h}{kv} N{self.n} D{self.d} {'causal' if self.causal else 'non-causal'}"


@dataclass
class Result:
    """The mean time of one provider on one shape and mode."""

    shape: Shape
    mode: str
    provider: str
    ms: float
    peak_mib: float | None
    configs: str = ""  # lmforge on CUDA: the autotuner's choice per kernel, e.g. "fwd 128x64 w8 s3 | dq 64x32 w4 s3"

    @property
    def tflops(self) -> float:
        return self.shape.flops(self.mode) / (self.ms * 1e-3) / 1e12


# -- providers --------------------------------------------------------------------------------------
def sdpa(backend: SDPBackend | None) -> Attention:
    """F.scaled_dot_product_attention, with ``backend`` forced (None: PyTorch's own choice)."""

    def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        gqa = k.size(1) != q.size(1)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return attend


def load_lmforge() -> tuple[Attention | None, str]:
    """lmforge's kernel as an Attention, or None and why it cannot be imported."""
    try:
        from lmforge.kernels.attention import flash_attention
    except Exception as err:  # a missing or half-written module must not stop the SDPA measurements
        return None, short_error(err)

    def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        return flash_attention(q, k, v, causal=causal)

    return attend, ""


# lmforge's autotuned kernels, in the order they run, with their short names
LMFORGE_KERNELS = (("fwd", "_attn_fwd"), ("bwd", "_attn_bwd"), ("dkdv", "_attn_bwd_dkdv"), ("dq", "_attn_bwd_dq"))


def lmforge_autotuners() -> list[tuple[str, object]]:
    """(short name, autotuned kernel) of lmforge's attention kernels; empty when the module or one is missing."""
    module = sys.modules.get("lmforge.kernels.attention")
    if module is None:
        return []
    return [(short, getattr(module, name)) for short, name in LMFORGE_KERNELS if hasattr(module, name)]


def reset_lmforge_configs() -> None:
    """Forget the configs chosen so far, so that the next reading names only the kernels of one measurement."""
    for _, kernel in lmforge_autotuners():
        if hasattr(kernel, "best_config"):
            kernel.best_config = None


def lmforge_configs() -> str:
    """The configs the autotuner chose since :func:`reset_lmforge_configs`, e.g. "fwd 128x64 w8 s3 | dq 64x32 w4 s3"."""
    parts = []
    for short, kernel in lmforge_autotuners():
        config = getattr(kernel, "best_config", None)
        if config is not None:
            kw = config.kwargs
            block = f"{kw.get('BLOCK_M', '?')}x{kw.get('BLOCK_N', '?')}"
            parts.append(f"{short} {block} w{config.num_warps} s{config.num_stages}")
    return " | ".join(parts)


def write_tuned_tiles(path: Path | None) -> None:
    """lmforge's ``tuned_tiles()`` (what its autotuners chose so far) as JSON at ``path``, replaced whole."""
    module = sys.modules.get("lmforge.kernels.attention")
    if path is None or module is None or not hasattr(module, "tuned_tiles"):
        return
    harness.replace_file(path, json.dumps(module.tuned_tiles(), indent=1, sort_keys=True) + "\n")


def short_error(err: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """The first sentence of an error, with the first two warnings PyTorch gave about it (why no kernel fits)."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {first_sentence(lines[0] if lines else '')}"
    reasons = [first_sentence(str(w.message)) for w in caught[:2]]
    return text + (f" ({'; '.join(r for r in reasons if r)})" if any(reasons) else "")


def first_sentence(text: str, limit: int = 120) -> str:
    """``text`` up to its first full stop, without PyTorch's "(Triggered internally at ...)" trailer."""
    text = re.sub(r"\s*\(Triggered internally at .*", "", text.strip().splitlines()[0] if text.strip() else "")
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Tensor, ...]:
    """q, k, v ~ N(0, 1), requiring grad."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(heads: int) -> Tensor:
        size = (shape.b, heads, shape.n, shape.d)
        return torch.randn(size, generator=generator, device=device, dtype=dtype).requires_grad_()

    return randn(shape.h), randn(shape.kv_heads), randn(shape.kv_heads)


def probe(attend: Attention, shape: Shape, dtype: torch.dtype, device: torch.device) -> str:
    """One forward and backward call: "" when it works, else the reason it does not."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            q, k, v = make_inputs(shape, dtype, device)
            out = attend(q, k, v, shape.causal)
            out.backward(torch.randn_like(out))
            harness.sync(device)
        except Exception as err:
            return short_error(err, caught)
        finally:
            harness.release(device)
    return ""


def available_providers(
    names: Sequence[str], shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device
) -> dict[str, Attention]:
    """The providers among ``names`` that run a small problem of each head dim; a note for each that does not."""
    lmforge, why = load_lmforge() if "lmforge" in names else (None, "")
    found: dict[str, Attention] = {}
    for name in names:
        attend = lmforge if name == "lmforge" else sdpa(SDPA_BACKENDS[name])
        if attend is None:
            print(f"note: lmforge is unavailable, skipped: cannot import lmforge.kernels.attention ({why})")
            continue
        head_dims = sorted({s.d for s in shapes})
        reasons = [probe(attend, Shape(1, 2, 256, d, shapes[0].causal), dtype, device) for d in head_dims]
        reason = next((r for r in reasons if r), "")
        if reason:
            print(f"note: {name} is unavailable here, skipped: {reason}")
        else:
            found[name] = attend
    return found


# -- measurement ------------------------------------------------------------------------------------
def bench_fn(attend: Attention, mode: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Callable[[], object]:
    """The call to time for ``mode``; for ``bwd`` the forward runs here, once."""
    if mode == "fwd":
        return lambda: attend(q, k, v, causal)
    grad = torch.randn_like(q)  # the output has q's shape
    if mode == "bwd":
        out = attend(q, k, v, causal)
        return lambda: out.backward(grad, retain_graph=True)
    return lambda: attend(q, k, v, causal).backward(grad)


def measure(
    attend: Attention,
    name: str,
    shape: Shape,
    mode: str,
    inputs: tuple[Tensor, ...],
    args: argparse.Namespace,
    device: torch.device,
) -> Result:
    track_configs = name == "lmforge" and device.type == "cuda"
    if track_configs:
        reset_lmforge_configs()
    fn = bench_fn(attend, mode, *inputs, shape.causal)
    ms = harness.timeit(fn, args.warmup, args.rep, grad_to_none=list(inputs), device=device)
    harness.reset_grads(inputs)
    peak = harness.peak_memory(fn, device)
    harness.reset_grads(inputs)
    configs = lmforge_configs() if track_configs else ""
    return Result(shape, mode, name, ms, None if peak is None else peak / 2**20, configs)


def measure_shape(
    shape: Shape,
    providers: dict[str, Attention],
    modes: Sequence[str],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    recorder: Recorder,
) -> list[str]:
    """Every provider and mode at one shape, each result recorded; a note for each that fails (out of
    memory, unsupported)."""
    notes = []
    inputs = make_inputs(shape, dtype, device)
    for name, attend in providers.items():
        if name == "math" and shape.n > args.math_max_n:
            continue
        for mode in modes:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result = measure(attend, name, shape, mode, inputs, args, device)
                except Exception as err:  # torch.OutOfMemoryError, "No available kernel", a kernel's own error
                    notes.append(f"{shape.label} {mode} {name}: skipped, {short_error(err, caught)}")
                else:
                    recorder.add(result)
            harness.release(device, *inputs)
    del inputs
    harness.release(device)
    return notes


class Recorder(harness.Recorder):
    """harness.Recorder of attn.csv, which also rewrites --tiles-json after every lmforge result."""

    def __init__(self, args: argparse.Namespace, device: torch.device, preset: str) -> None:
        def row(result: Result, results: list[Result]) -> dict:
            return csv_row(result, results, args.dtype_name, preset, args, device)

        super().__init__(args.out / "attn.csv", row, progress_line, common=harness.stamp(device), preset=preset)
        self.tiles_json = args.tiles_json

    def add(self, result: Result) -> None:
        super().add(result)
        if result.provider == "lmforge":
            write_tuned_tiles(self.tiles_json)


def progress_line(result: Result, results: list[Result]) -> str:
    ratio = lmforge_ratio(result, results)
    versus = f", lmforge/x {ratio:.2f}" if ratio is not None and result.provider != "lmforge" else ""
    return (
        f"    {result.provider:<12} {result.mode:<7} {result.ms:9.3f} ms {harness.fmt_tflops(result.tflops):>7} TFLOP/s"
        f"{versus}{'  ' + result.configs if result.configs else ''}"
    )


def run(
    shapes: Sequence[Shape],
    providers: dict[str, Attention],
    modes: Sequence[str],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    recorder: Recorder,
) -> list[Result]:
    """Every shape in turn, each result recorded as soon as it is measured; a KeyboardInterrupt propagates
    (what was recorded stays in ``recorder``), after the notes so far are printed."""
    with harness.printed_notes() as notes:
        for i, shape in enumerate(shapes, 1):
            print(f"  [{i}/{len(shapes)}] {shape.label}", flush=True)
            notes += measure_shape(shape, providers, modes, args, device, dtype, recorder)
        if "math" in providers and any(s.n > args.math_max_n for s in shapes):
            notes.append(f"math: run only for N <= {args.math_max_n} (--math-max-n); it materialises the N x N scores")
    return recorder.results


# -- report -----------------------------------------------------------------------------------------
def ordered(results: list[Result], shapes: Sequence[Shape], modes: Sequence[str]) -> list[Result]:
    """By shape (as swept), then mode, then provider (lmforge first)."""
    return sorted(results, key=lambda r: (shapes.index(r.shape), modes.index(r.mode), PROVIDERS.index(r.provider)))


def lmforge_ratio(result: Result, results: list[Result]) -> float | None:
    """lmforge's TFLOP/s over ``result``'s at the same shape and mode (None when lmforge has no number)."""
    ours = next(
        (r for r in results if r.provider == "lmforge" and (r.shape, r.mode) == (result.shape, result.mode)), None
    )
    return None if ours is None else ours.tflops / result.tflops


def print_results(results: list[Result], shapes: Sequence[Shape], modes: Sequence[str]) -> None:
    with_ratio = any(r.provider == "lmforge" for r in results)
    with_memory = any(r.peak_mib is not None for r in results)
    headers = ["B", "H", "N", "D", "causal", "mode", "provider", "ms", "TFLOP/s"]
    headers += ["lmforge/x"] * with_ratio + ["peak MiB"] * with_memory
    rows = []
    for r in ordered(results, shapes, modes):
        s = r.shape
        row = [s.b, s.h, s.n, s.d, "yes" if s.causal else "no", r.mode, r.provider, f"{r.ms:.3f}"]
        row.append(harness.fmt_tflops(r.tflops))
        if with_ratio:
            ratio = lmforge_ratio(r, results)
            row.append("-" if ratio is None else f"{ratio:.2f}")
        if with_memory:
            row.append("-" if r.peak_mib is None else f"{r.peak_mib:,.0f}")
        rows.append(row)
    harness.print_table(headers, rows)
    print(FLOP_NOTE)
    if with_ratio:
        print("lmforge/x = lmforge TFLOP/s / provider TFLOP/s at the same shape and mode (above 1: lmforge is faster)")
    tuned = [r for r in ordered(results, shapes, modes) if r.configs]
    if tuned:
        print("lmforge autotuned configs (BLOCK_M x BLOCK_N, warps, stages):")
        width = max(len(f"{r.shape.label} {r.mode}") for r in tuned)
        for r in tuned:
            print(f"  {f'{r.shape.label} {r.mode}':<{width}}  {r.configs}")


def csv_row(
    r: Result, results: list[Result], dtype: str, preset: str, args: argparse.Namespace, device: torch.device
) -> dict:
    """The CSV row of ``r``; its lmforge ratio from ``results`` (what was measured so far)."""
    ratio = lmforge_ratio(r, results)
    row = {
        "preset": preset,
        "device": device.type,
        "dtype": dtype,
        "batch": r.shape.b,
        "heads": r.shape.h,
        "kv_heads": r.shape.kv_heads,
        "seq": r.shape.n,
        "head_dim": r.shape.d,
        "causal": int(r.shape.causal),
        "mode": r.mode,
        "provider": r.provider,
        "ms": f"{r.ms:.6g}",
        "tflops": f"{r.tflops:.6g}",
        "gflop": f"{r.shape.flops(r.mode) / 1e9:.6g}",
        "lmforge_ratio": "" if ratio is None else f"{ratio:.4g}",
        "peak_mib": "" if r.peak_mib is None else f"{r.peak_mib:.1f}",
        "warmup_ms": f"{args.warmup:g}",
        "rep_ms": f"{args.rep:g}",
    }
    if device.type == "cuda":  # the CPU CSV keeps its columns: no kernel is tuned there
        row["lmforge_configs"] = r.configs
    return row


def plot(path: Path, results: list[Result], mode: str, title: str) -> bool:
    """TFLOP/s against N, one line per provider, one panel per (D, causal); False without matplotlib."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in sorted(results, key=lambda r: (r.shape.d, not r.shape.causal, PROVIDERS.index(r.provider))):
        if r.mode == mode:
            panel = f"D={r.shape.d}, {'causal' if r.shape.causal else 'not causal'}"
            panels.setdefault(panel, {}).setdefault(r.provider, []).append((r.shape.n, r.tflops))
    return harness.plot_lines(path, panels, xlabel="N (sequence length)", ylabel=f"{mode} TFLOP/s", title=title)


def write_outputs(args: argparse.Namespace, device: torch.device, recorder: Recorder) -> None:
    """Where the CSV rows went, and on a sweep the plot (forward+backward, else the first mode measured)."""
    results = recorder.results
    if not recorder.wrote():
        return
    name = harness.device_name(device)
    if len({r.shape.n for r in results}) < 2:
        print("no plot: a single sequence length")
        return
    mode = "fwd+bwd" if any(r.mode == "fwd+bwd" for r in results) else results[0].mode
    png = args.out / f"attn_{args.dtype_name}_{harness.slug(name)}{'_quick' if args.quick else ''}.png"
    title = f"{mode} attention, {args.dtype_name}, B*N = {args.tokens}, H*D = {args.hidden}; {name}"
    harness.saved_plot(png, plot(png, results, mode, title))


# -- GPU sweep --------------------------------------------------------------------------------------
# --order priority: N=4096 first, then the other lengths of ANCHORS.md's table, then the rest; within a
# length D=128 before 64 and causal before not
PRIORITY_N = (4096, 16384, 1024, 8192, 2048)
ANCHOR_TABLE_N = (1024, 4096, 16384)


def priority(shape: Shape) -> tuple:
    rank = PRIORITY_N.index(shape.n) if shape.n in PRIORITY_N else len(PRIORITY_N)
    return (shape.n not in ANCHOR_TABLE_N, shape.n != 4096, shape.d != 128, not shape.causal, rank, shape.n, shape.d)


def sweep_shapes(args: argparse.Namespace) -> list[Shape]:
    def make(d: int, n: int, causal: bool) -> Shape:
        return Shape(max(1, args.tokens // n), max(1, args.hidden // d), n, d, causal)

    if args.shapes:
        return [make(d, n, causal) for d, n, causal in args.shapes]
    ns = args.n or (QUICK_N if args.quick else ANCHOR_N)
    ds = args.d or (QUICK_D if args.quick else ANCHOR_D)
    shapes = [make(d, n, causal) for d in ds for causal in args.causal for n in ns]
    return sorted(shapes, key=priority) if args.order == "priority" else shapes


def gpu_main(args: argparse.Namespace, device: torch.device) -> int:
    dtype = harness.DTYPES[args.dtype_name]
    shapes = sweep_shapes(args)
    modes = args.modes or list(MODES)
    print(
        f"{len(shapes)} shape(s) x {len(modes)} mode(s), {args.dtype_name}, do_bench {args.warmup:g} ms warm-up + "
        f"{args.rep:g} ms timed per measurement (mean)"
    )
    preset = "custom" if args.n or args.d or args.shapes else ("quick" if args.quick else "anchor")
    recorder = Recorder(args, device, preset)
    return harness.measure_and_report(
        recorder,
        lambda: available_providers(args.providers, shapes, dtype, device),
        lambda providers: run(shapes, providers, modes, args, device, dtype, recorder),
        lambda results: print_results(results, shapes, modes),
        lambda: write_outputs(args, device, recorder),
    )


# -- CPU checks -------------------------------------------------------------------------------------
def reference(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, causal: bool) -> list[Tensor]:
    """Output and gradients of the math SDPA in float64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, enable_gqa=k.size(1) != q.size(1))
    out.backward(grad.double())
    return [out.detach(), q64.grad, k64.grad, v64.grad]


def smoke_case(attend: Attention, shape: Shape) -> list[object]:
    """One table row: the shape, max abs errors of out, dq, dk, dv against float64, and pass or FAIL."""
    cells: list[object] = [shape.b, shape.h, shape.kv_heads, shape.n, shape.d, "yes" if shape.causal else "no"]
    q, k, v = make_inputs(shape, torch.float32, torch.device("cpu"))
    grad = torch.randn_like(q)

    def compute() -> list[Tensor]:
        out = attend(q, k, v, shape.causal)
        out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    expected = lambda: reference(q, k, v, grad, shape.causal)  # noqa: E731
    return harness.smoke_row(cells, compute, expected, tolerance=SMOKE_TOLERANCE, describe=short_error)


def smoke(causal_values: Sequence[bool]) -> bool | None:
    """(a) lmforge's kernel under the Triton interpreter against float64; None when it cannot be imported."""
    attend, why = load_lmforge()
    if attend is None:
        print(f"(a) lmforge is unavailable, no correctness smoke: cannot import lmforge.kernels.attention ({why})")
        return None
    shapes = [Shape(1, 2, n, 32, causal, h_kv) for h_kv in (2, 1) for n in SMOKE_N for causal in causal_values]
    print(
        "(a) lmforge kernel under TRITON_INTERPRET=1, fp32, against the math SDPA in float64 "
        f"(tolerance {SMOKE_TOLERANCE:g}):"
    )
    rows = [smoke_case(attend, shape) for shape in shapes]
    headers = ["B", "H", "H_kv", "N", "D", "causal", "out", "dq", "dk", "dv", "result"]
    return harness.print_smoke(headers, rows, "cases; errors are max abs differences")


def cpu_timing(args: argparse.Namespace, recorder: Recorder) -> list[Result]:
    """(b) The torch SDPA backends on CPU at one small shape in fp32 (lmforge's interpreter is not timed)."""
    device = torch.device("cpu")
    shapes = cpu_shapes(args)
    modes = args.modes or ["fwd", "fwd+bwd"]
    names = [p for p in args.providers if p != "lmforge"]
    print(
        f"(b) torch SDPA on CPU, fp32, {torch.get_num_threads()} threads, {args.warmup:g} ms warm-up + "
        f"{args.rep:g} ms timed (at least 5 calls):"
    )
    providers = available_providers(names, shapes, torch.float32, device)
    if not providers:
        print("(b) skipped: no SDPA provider selected or available")
        return []
    results = run(shapes, providers, modes, args, device, torch.float32, recorder)
    print_results(results, shapes, modes)
    return results


def cpu_shapes(args: argparse.Namespace) -> list[Shape]:
    return [Shape(1, 4, 512, 64, causal) for causal in args.causal]


def cpu_main(args: argparse.Namespace) -> int:
    harness.no_speed_claim("measured")
    os.environ["TRITON_INTERPRET"] = "1"  # before lmforge.kernels.attention (and its @triton.jit) is imported
    args.dtype_name = "fp32"
    recorder = Recorder(args, torch.device("cpu"), "cpu")
    modes = args.modes or ["fwd", "fwd+bwd"]
    report = lambda results: print_results(results, cpu_shapes(args), modes)  # noqa: E731
    return recorder.until_interrupted(lambda: cpu_checks(args, recorder), report)


def cpu_checks(args: argparse.Namespace, recorder: Recorder) -> int:
    passed = None if args.no_smoke or "lmforge" not in args.providers else smoke(args.causal)
    print()
    cpu_timing(args, recorder)
    write_outputs(args, torch.device("cpu"), recorder)
    return 1 if passed is False else 0


# -- command line -----------------------------------------------------------------------------------
def shape_list(text: str) -> list[tuple[int, int, bool]]:
    """``128:4096:yes,64:1024:no``: (D, N, causal) per item; causal is yes/no (or causal/full)."""
    shapes = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            d, n, causal = item.split(":")
            shapes.append((int(d), int(n), {"yes": True, "causal": True, "no": False, "full": False}[causal]))
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"{item!r}: expected D:N:yes or D:N:no, e.g. 128:4096:yes") from None
    if not shapes:
        raise argparse.ArgumentTypeError("no shape given")
    return shapes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, f"a few shapes: D {QUICK_D}, N {QUICK_N}; shorter on CPU")
    p.add_argument("--d", type=harness.int_list, help="head dims, comma-separated (default 64,128)")
    p.add_argument("--n", type=harness.int_list, help="sequence lengths, comma-separated (default 1024,...,16384)")
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    p.add_argument(
        "--order",
        choices=("sweep", "priority"),
        default="sweep",
        help="sweep: by D, causal, N (default); priority: N=4096 D=128 causal first, then by importance",
    )
    p.add_argument(
        "--shapes", type=shape_list, help="GPU: exactly these shapes, in this order: D:N:yes|no,... (overrides --d/--n)"
    )
    p.add_argument("--tiles-json", type=Path, help="write lmforge's tuned_tiles() here after each lmforge measurement")
    p.add_argument(
        "--modes",
        type=harness.choice_list(MODES),
        help="comma-separated subset of fwd,bwd,fwd+bwd (default all; CPU: fwd,fwd+bwd)",
    )
    harness.add_bench_args(p, PROVIDERS, default=PROVIDERS)
    p.add_argument("--math-max-n", type=int, default=2048, help="longest N for the math backend (default 2048)")
    p.add_argument("--tokens", type=int, default=TOKENS, help=f"B * N of the sweep (default {TOKENS})")
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"H * D of the sweep (default {HIDDEN})")
    args = harness.parse_bench_args(p, argv)
    args.causal = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return harness.bench_main(parse_args, cpu_main, gpu_main, argv)


if __name__ == "__main__":
    sys.exit(main())
