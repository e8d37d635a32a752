"""Masked attention speed: lmforge's fused kernel with masks against what users have today.

The question: when a batch holds packed documents (that must not see each other) or right-padded rows,
how fast is ``lmforge.kernels.attention.flash_attention`` with ``segment_ids`` or ``key_padding_mask``,
forward and backward, against the ways PyTorch users get the same attention now?

The computation measured, for every provider: ``attention(q, k, v).backward(grad)`` with q, k, v of shape
(B, H, N, D) ~ N(0, 1), self-attention (H_kv = H), causal, in bf16 (``--dtype fp16`` for fp16), H = 16,
D = 128 (``--heads``, ``--head-dim``).

Cases (``--quick``: the first and the third):

* packed documents, N = 8192 x 2 rows, mean document 512 tokens;
* packed documents, N = 16384 x 1 row, mean document 2048 tokens;
* key padding, 8 rows of N = 2048, mean valid length 1344, padding on the right.

Packed documents: each row is filled with documents whose lengths are drawn uniformly between half and
1.5 times the mean (the last one cut to fit); a query attends to the keys of its own document at or
before it (causal within a document). Key padding: each row has a valid length drawn uniformly between
half and 1.5 times the mean (at least 1, at most N); a query attends to the real keys at or before it
(causal; a padding query still attends to the real keys before it, so no row is empty). The lengths
come from ``--seed`` (the same for a case whether or not ``--quick`` is given) and are printed.

Providers, each detected by one trial call (forward and backward) and skipped with a note when it fails:

* ``lmforge``: ``flash_attention(q, k, v, causal=True, segment_ids=...)`` for packed documents,
  ``key_padding_mask=...`` ((B, N) bool, True on real tokens) for key padding;
* ``sdpa-causal-nomask``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, the masks
  ignored: a wrong answer, measured for scale (what plain causal attention over the whole row costs);
* ``sdpa-bool-mask``: ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` with the full (B, 1, N, N)
  boolean mask (causal and same document, or causal and key real), PyTorch's own backend choice;
* ``flex``: ``torch.nn.attention.flex_attention.flex_attention`` through ``torch.compile`` with a
  ``BlockMask`` from ``create_block_mask`` whose mask_mod is the same rule. Compiled once per shape,
  untimed. Not run on CPU unless ``--providers`` names it (this torch has no CPU backward for it).

Only the attention itself is timed: every provider's mask is built once per batch, before the timed
calls (the SDPA boolean mask, Flex's block mask, and lmforge's per-row document and padding bounds,
which it derives from the ids on the first call with a batch's masks and reuses, as the layers of a
model do). Their build time is measured apart ("mask ms": mean ms to build the mask from the segment
ids or lengths), since in training a new batch needs a new mask.

Measured per case and provider:

* time: mean ms of one forward + backward, by ``triton.testing.do_bench`` on CUDA (CUDA events, L2
  flushed before each call, ``--warmup`` and ``--rep`` ms budgets, gradients reset to None before each
  call so accumulation is not timed), through ``benchmarks/harness.py``;
* peak extra memory on CUDA: what one call allocates beyond its inputs and masks, gradients included;
* "attended": the fraction of the causal pairs, B * N * (N + 1) / 2 (about N^2 / 2 per row), that the mask
  keeps: the share of the causal work that a kernel able to skip masked tiles must still do. No FLOP rate is
  given: the useful work depends on the mask, and the providers skip different amounts of it;
* "vs X" = ms / X's ms in the same case (below 1: faster than X), for X = flex and sdpa-causal-nomask.

The bar for lmforge: FlexAttention's time for packed documents, the unmasked causal SDPA time for key
padding (skipping the padding should cost nothing beyond plain causal attention). The reference, measured
elsewhere on an H200 (bf16, H = 16, D = 128, forward + backward, ms), shown beside GPU runs with those
settings:

    case                                         sdpa-causal-nomask  sdpa-bool-mask  flex
    packed docs, N=8192 x 2 rows, mean doc 512                 3.85           12.19  0.83
    packed docs, N=16384 x 1 row, mean doc 2048                7.22           25.18  2.72
    key padding, 8 x 2048, mean valid 1344                     1.16            3.27  1.67

Results: one CSV row per measurement appended to ``<out>/attn_masked.csv`` (device, versions and date on
every row) as soon as it is measured, and printed; a table on stdout at the end, and
``<out>/attn_masked_<dtype>_<device>.png``: ms per provider, a group of bars per case. A row's "vs X"
columns are filled when X was measured before it in that case (lmforge is measured first, so its own row
has them empty; the table at the end has them all). Cut short (SIGINT, SIGTERM, e.g. ``timeout -s INT``),
the script prints the table of what it measured and exits with code 130, every row measured already in
the CSV.

Without CUDA no speed is claimed: speed claims come only from GPU runs. The script says so, then
(a) checks lmforge's kernel under the Triton interpreter (``TRITON_INTERPRET=1``) in fp32 at tiny sizes,
a packed and a padded case, output and the three gradients against the sdpa-bool-mask provider in
float64, and (b) times the torch providers on CPU in fp32 at small sizes (N = 1024, H = 4, D = 64, the
cases' mean lengths scaled to N), to exercise the timing and reporting path. This takes well under a
minute. The exit code is 1 when the check fails.

    python benchmarks/attn_masked.py                  # the three cases (GPU), or the CPU checks
    python benchmarks/attn_masked.py --quick          # the first and the third case
    python benchmarks/attn_masked.py --providers lmforge,flex --dtype fp16 --rep 500
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch import Tensor

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k, v) -> out, the masks bound by a setup

PROVIDERS = ("lmforge", "sdpa-causal-nomask", "sdpa-bool-mask", "flex")
CPU_PROVIDERS = ("lmforge", "sdpa-causal-nomask", "sdpa-bool-mask")  # the default on CPU
REFERENCES = ("flex", "sdpa-causal-nomask")  # the "vs X" columns
BARS = harness.MASKED_BARS  # lmforge's bar per kind of mask: flex for packed documents, plain causal for padding
HEADS, HEAD_DIM = 16, 128
CPU_N, CPU_HEADS, CPU_HEAD_DIM, CPU_MAX_BATCH = 1024, 4, 64, 2
PROBE_N = 256
SMOKE_HEADS, SMOKE_HEAD_DIM = 2, 16
SMOKE_TOLERANCE = 1e-4  # max abs error of fp32 against float64, output and gradients


@dataclass(frozen=True)
class Case:
    """One masking problem: ``batch`` rows of ``n`` tokens; ``mean``: the mean document length (packed)
    or the mean valid length (padding)."""

    kind: str  # "packed" or "padding"
    batch: int
    n: int
    mean: int

    @property
    def label(self) -> str:
        if self.kind == "packed":
            rows = f"{self.batch} row{'s' if self.batch > 1 else ''}"
            return f"packed docs, N={self.n} x {rows}, mean doc {self.mean}"
        return f"key padding, {self.batch} x {self.n}, mean valid {self.mean}"

    @property
    def short(self) -> str:
        if self.kind == "packed":
            return f"packed {self.batch}x{self.n} doc{self.mean}"
        return f"padding {self.batch}x{self.n} valid{self.mean}"


CASES = (Case("packed", 2, 8192, 512), Case("packed", 1, 16384, 2048), Case("padding", 8, 2048, 1344))
QUICK_CASES = (CASES[0], CASES[2])
SMOKE_CASES = (Case("packed", 2, 48, 12), Case("padding", 2, 48, 28))

# The H200 reference (bf16, H=16, D=128, forward + backward, ms), measured elsewhere: ANCHORS.md.
REFERENCE_MS = {(case, provider): ms for case in CASES for provider, ms in harness.ANCHOR_MASKED[case.short].items()}


# -- problems ---------------------------------------------------------------------------------------
def draw_length(rng: random.Random, mean: int, limit: int) -> int:
    """Uniform between half and 1.5 times ``mean``, clipped to [1, limit]."""
    low, high = max(1, math.ceil(mean / 2)), max(1, math.floor(1.5 * mean))
    return max(1, min(limit, rng.randint(low, high)))


def draw_lengths(case: Case, seed: int) -> list[list[int]]:
    """Per row: the document lengths filling it (packed), or the one valid length (padding)."""
    rng = random.Random(f"{seed}:{case.short}")  # a str seed is hashed with sha512: the same everywhere
    rows = []
    for _ in range(case.batch):
        if case.kind == "padding":
            rows.append([draw_length(rng, case.mean, case.n)])
            continue
        docs: list[int] = []
        while sum(docs) < case.n:
            docs.append(draw_length(rng, case.mean, case.n - sum(docs)))
        rows.append(docs)
    return rows


@dataclass
class Problem:
    """A case with its drawn lengths and masks on one device."""

    case: Case
    lengths: list[list[int]]
    segment_ids: Tensor | None  # (B, N) int32, packed documents
    valid: Tensor | None  # (B,) int64 valid lengths, key padding
    key_padding_mask: Tensor | None  # (B, N) bool, True on real tokens

    @property
    def attended_fraction(self) -> float:
        """Pairs (query, key) the mask keeps over the causal pairs, B * N * (N + 1) / 2."""
        n = self.case.n
        kept = 0
        for row in self.lengths:
            if self.case.kind == "packed":
                kept += sum(d * (d + 1) // 2 for d in row)
            else:
                (valid,) = row
                kept += valid * (valid + 1) // 2 + (n - valid) * valid  # padding queries see the real keys
        return kept / (self.case.batch * n * (n + 1) / 2)

    def describe(self) -> str:
        """The drawn lengths, for the log."""
        if self.case.kind == "padding":
            valid = [row[0] for row in self.lengths]
            return f"valid lengths {' '.join(map(str, valid))} (mean {sum(valid) / len(valid):.0f})"
        docs = [d for row in self.lengths for d in row]
        rows = "; ".join(f"row {i}: {' '.join(map(str, row))}" for i, row in enumerate(self.lengths))
        return f"{len(docs)} documents (mean {sum(docs) / len(docs):.0f}), lengths {rows}"


def make_problem(case: Case, seed: int, device: torch.device) -> Problem:
    lengths = draw_lengths(case, seed)
    if case.kind == "packed":
        ids = [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
        segment_ids = torch.stack(ids).to(device=device, dtype=torch.int32)
        return Problem(case, lengths, segment_ids, None, None)
    valid = torch.tensor([row[0] for row in lengths], device=device)
    mask = torch.arange(case.n, device=device)[None, :] < valid[:, None]
    return Problem(case, lengths, None, valid, mask)


def bool_mask(problem: Problem) -> Tensor:
    """(B, 1, N, N) bool, True where query i may attend to key j: causal and same document, or causal and real."""
    n = problem.case.n
    device = (problem.segment_ids if problem.segment_ids is not None else problem.key_padding_mask).device
    pos = torch.arange(n, device=device)
    causal = pos[:, None] >= pos[None, :]
    if problem.segment_ids is not None:
        seg = problem.segment_ids
        keep = causal & (seg[:, :, None] == seg[:, None, :])
    else:
        keep = causal & problem.key_padding_mask[:, None, :]
    return keep[:, None]


def mask_mod(problem: Problem) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention's rule for the same mask: (batch, head, query index, key index) -> keep."""
    if problem.segment_ids is not None:
        seg = problem.segment_ids

        def same_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx >= kv_idx) & (seg[b, q_idx] == seg[b, kv_idx])

        return same_document
    valid = problem.valid

    def real_key(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (kv_idx < valid[b])

    return real_key


# -- providers --------------------------------------------------------------------------------------
# A provider: problem -> attend, with its masks built (untimed); and optionally the mask build to time apart.
Setup = Callable[[Problem], Attend]


def setup_lmforge(problem: Problem) -> Attend:
    from lmforge.kernels.attention import flash_attention

    seg, kpm = problem.segment_ids, problem.key_padding_mask
    return lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=seg, key_padding_mask=kpm)


def setup_nomask(problem: Problem) -> Attend:
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def setup_bool_mask(problem: Problem) -> Attend:
    mask = bool_mask(problem)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_compiled_flex: Callable[..., Tensor] | None = None


def build_block_mask(problem: Problem) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    n = problem.case.n
    device = (problem.segment_ids if problem.segment_ids is not None else problem.valid).device
    return create_block_mask(mask_mod(problem), problem.case.batch, None, n, n, device=device)


def setup_flex(problem: Problem) -> Attend:
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    flex, block_mask = _compiled_flex, build_block_mask(problem)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


SETUPS: dict[str, Setup] = {
    "lmforge": setup_lmforge,
    "sdpa-causal-nomask": setup_nomask,
    "sdpa-bool-mask": setup_bool_mask,
    "flex": setup_flex,
}


def lmforge_bounds(problem: Problem) -> object:
    """lmforge's per-batch mask work: the conversions and the per-row bounds (uncached here)."""
    from lmforge.kernels.attention import _bounds

    seg, kpm = problem.segment_ids, problem.key_padding_mask
    seg = None if seg is None else seg.to(torch.int64).contiguous()
    kpm = None if kpm is None else kpm.to(torch.int8).contiguous()
    return _bounds(kpm, seg, problem.case.batch, problem.case.n, (seg if seg is not None else kpm).device)


MASK_BUILDS: dict[str, Callable[[Problem], object]] = {
    "lmforge": lmforge_bounds,
    "sdpa-bool-mask": bool_mask,
    "flex": build_block_mask,
}


def make_inputs(
    case: Case, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v ~ N(0, 1) requiring grad, and an upstream gradient for the output."""
    generator = torch.Generator(device=device).manual_seed(seed)
    size = (case.batch, heads, case.n, head_dim)
    q, k, v, grad = (torch.randn(size, generator=generator, device=device, dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad


def probe(setup: Setup, kind: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> str:
    """One forward and backward call on a small problem of ``kind``: "" when it works, else why not."""
    case = Case(kind, 1, PROBE_N, PROBE_N // 4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attend = setup(make_problem(case, 0, device))
            q, k, v, grad = make_inputs(case, 2, head_dim, dtype, device)
            attend(q, k, v).backward(grad)
            harness.sync(device)
    except Exception as err:  # a missing module, an unsupported device or dtype, a kernel's own error
        return harness.short_error(err)
    finally:
        harness.release(device)
    return ""


def available_providers(
    names: Sequence[str], cases: Sequence[Case], head_dim: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Setup]:
    """The providers among ``names`` that run a small problem of each kind of mask; a note for each that does not."""
    kinds = list(dict.fromkeys(c.kind for c in cases))
    found = {}
    for name in names:
        reason = next((r for r in (probe(SETUPS[name], kind, head_dim, dtype, device) for kind in kinds) if r), "")
        if reason:
            print(f"note: {name} is unavailable here, skipped: {reason}")
        else:
            found[name] = SETUPS[name]
    return found


# -- measurement ------------------------------------------------------------------------------------
@dataclass
class Result:
    """One provider in one case: mean ms of forward + backward, peak extra MiB (CUDA), mask build ms."""

    case: Case
    provider: str
    ms: float
    peak_mib: float | None
    mask_ms: float | None
    attended: float
    heads: int
    head_dim: int


def measure(
    name: str,
    setup: Setup,
    problem: Problem,
    inputs: tuple[Tensor, ...],
    args: argparse.Namespace,
    device: torch.device,
    shape: tuple[int, int],
) -> Result:
    q, k, v, grad = inputs
    attend = setup(problem)

    def step() -> None:
        attend(q, k, v).backward(grad)

    step()  # compiles where there is compiling (flex, lmforge's autotuner), untimed
    harness.sync(device)
    ms = harness.timeit(step, args.warmup, args.rep, grad_to_none=[q, k, v], device=device)
    harness.reset_grads((q, k, v))
    peak = harness.peak_memory(step, device)
    harness.reset_grads((q, k, v))
    build = MASK_BUILDS.get(name)
    mask_ms = None
    if build is not None:
        mask_ms = harness.timeit(lambda: build(problem), args.warmup, args.rep, device=device, min_rep=3)
    return Result(
        problem.case, name, ms, None if peak is None else peak / 2**20, mask_ms, problem.attended_fraction, *shape
    )


def make_recorder(args: argparse.Namespace, device: torch.device, preset: str) -> harness.Recorder:
    """attn_masked.csv's recorder: each result's row, and its line with the ratios to the references so far."""

    def line(r: Result, results: list[Result]) -> str:
        return f"    {r.provider:<18} {r.ms:9.3f} ms{harness.versus(r, results, REFERENCES, ratio)}"

    def row(r: Result, results: list[Result]) -> dict[str, object]:
        return csv_row(r, results, preset, args, device)

    return harness.Recorder(args.out / "attn_masked.csv", row, line, common=harness.stamp(device), preset=preset)


def run(
    cases: Sequence[Case],
    providers: dict[str, Setup],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    recorder: harness.Recorder,
) -> list[Result]:
    """Every case and provider, each result recorded as soon as it is measured; a KeyboardInterrupt
    propagates (what was recorded stays in ``recorder``), after the notes so far are printed."""
    with harness.printed_notes() as notes:
        for i, case in enumerate(cases, 1):
            problem = make_problem(case, args.seed, device)
            print(
                f"  [{i}/{len(cases)}] {case.label}, H{heads} D{head_dim}: {problem.describe()}; "
                f"attended {problem.attended_fraction:.1%} of the causal pairs",
                flush=True,
            )
            inputs = make_inputs(case, heads, head_dim, dtype, device, seed=i)
            for name, setup in providers.items():
                if name == "flex":
                    torch._dynamo.reset()  # a fresh compile per case, so the recompile limit never falls back to eager
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        result = measure(name, setup, problem, inputs, args, device, (heads, head_dim))
                    except Exception as err:  # torch.OutOfMemoryError, a compiler that fails, a kernel's own error
                        notes.append(f"{case.short} {name}: skipped, {harness.short_error(err)}")
                    else:
                        recorder.add(result)
                harness.release(device, *inputs[:3])
            del inputs, problem
            harness.release(device)
    return recorder.results


# -- report -----------------------------------------------------------------------------------------
def find(results: Sequence[Result], case: Case, provider: str) -> Result | None:
    return next((r for r in results if r.case == case and r.provider == provider), None)


def ratio(result: Result, results: Sequence[Result], reference: str) -> float | None:
    """``result``'s ms over ``reference``'s in the same case (None when the reference has no time)."""
    other = find(results, result.case, reference)
    return None if other is None else result.ms / other.ms


def ordered(results: Sequence[Result], cases: Sequence[Case]) -> list[Result]:
    return sorted(results, key=lambda r: (cases.index(r.case), PROVIDERS.index(r.provider)))


def reference_ms(result: Result, args: argparse.Namespace) -> float | None:
    """The H200 reference for ``result``, when the run has the reference's settings."""
    if (result.heads, result.head_dim, args.dtype_name) != (HEADS, HEAD_DIM, "bf16"):
        return None
    return REFERENCE_MS.get((result.case, result.provider))


def print_results(
    results: Sequence[Result], cases: Sequence[Case], args: argparse.Namespace, device: torch.device
) -> None:
    cuda = device.type == "cuda"
    with_memory = any(r.peak_mib is not None for r in results)
    with_reference = cuda and any(reference_ms(r, args) is not None for r in results)
    headers = ["case", "B", "H", "N", "D", "attended", "provider", "ms"]
    refs = [ref for ref in REFERENCES if any(r.provider == ref for r in results)]
    with_masks = any(r.mask_ms is not None for r in results)
    headers += ["peak MiB"] * with_memory + ["mask ms"] * with_masks + [f"vs {ref}" for ref in refs]
    headers += ["H200 ref ms"] * with_reference
    rows = []
    for r in ordered(results, cases):
        c = r.case
        row: list[object] = [c.short, c.batch, r.heads, c.n, r.head_dim, f"{r.attended:.1%}", r.provider]
        row.append(f"{r.ms:.3f}")
        if with_memory:
            row.append("-" if r.peak_mib is None else f"{r.peak_mib:,.0f}")
        if with_masks:
            row.append("-" if r.mask_ms is None else f"{r.mask_ms:.3f}")
        for ref in refs:
            value = ratio(r, results, ref)
            row.append("-" if value is None else f"{value:.2f}x")
        if with_reference:
            ref_ms = reference_ms(r, args)
            row.append("-" if ref_ms is None else f"{ref_ms:.2f}")
        rows.append(row)
    harness.print_table(headers, rows)
    print("ms: mean of one forward + backward; attended: pairs the mask keeps / causal pairs B*N*(N+1)/2")
    if with_memory:
        print("peak MiB: extra CUDA memory at the peak of one call, gradients included (masks are inputs)")
    if with_masks:
        print("mask ms: building the provider's mask from the ids or lengths, once per batch (not in ms)")
    if refs:
        print("vs X = ms / X's ms in the same case (below 1: faster than X)")
    if with_reference:
        print("H200 ref ms: the reference table (H200, bf16, H=16, D=128), measured elsewhere")
    print_bars(results, cases)


def print_bars(results: Sequence[Result], cases: Sequence[Case]) -> None:
    """lmforge against its bar in each case: flex for packed documents, sdpa-causal-nomask for key padding."""
    for case in cases:
        ours, bar = find(results, case, "lmforge"), BARS[case.kind]
        theirs = find(results, case, bar)
        if ours is None or theirs is None:
            continue
        verdict = "meets the bar" if ours.ms <= theirs.ms else "misses the bar"
        print(
            f"bar, {case.short}: lmforge {ours.ms:.3f} ms against {bar} {theirs.ms:.3f} ms "
            f"= {ours.ms / theirs.ms:.2f}x, {verdict}"
        )


def csv_row(
    r: Result, results: Sequence[Result], preset: str, args: argparse.Namespace, device: torch.device
) -> dict[str, object]:
    """The CSV row of ``r``; its ratios from ``results`` (what was measured so far)."""
    problem_lengths = " | ".join(" ".join(map(str, row)) for row in draw_lengths(r.case, args.seed))
    bar = BARS[r.case.kind]
    vs_bar = ratio(r, results, bar)
    return {
        "preset": preset,
        "device": device.type,
        "dtype": args.dtype_name,
        "case": r.case.short,
        "kind": r.case.kind,
        "batch": r.case.batch,
        "heads": r.heads,
        "seq": r.case.n,
        "head_dim": r.head_dim,
        "mean_len": r.case.mean,
        "seed": args.seed,
        "lengths": problem_lengths,
        "attended_fraction": f"{r.attended:.4g}",
        "provider": r.provider,
        "ms": f"{r.ms:.6g}",
        "peak_mib": "" if r.peak_mib is None else f"{r.peak_mib:.1f}",
        "mask_ms": "" if r.mask_ms is None else f"{r.mask_ms:.6g}",
        **{
            f"vs_{ref.replace('-', '_')}": "" if (x := ratio(r, results, ref)) is None else f"{x:.4g}"
            for ref in REFERENCES
        },
        "bar": bar,
        "vs_bar": "" if vs_bar is None else f"{vs_bar:.4g}",
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "warmup_ms": f"{args.warmup:g}",
        "rep_ms": f"{args.rep:g}",
    }


def plot(path: Path, results: Sequence[Result], cases: Sequence[Case], title: str) -> bool:
    """ms per provider, a group of bars per case; False without matplotlib."""
    plt = harness.pyplot()
    if plt is None:
        return False
    providers = [p for p in PROVIDERS if any(r.provider == p for r in results)]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 2.0 * len(cases)), 4.5))
    values = {p: [None if (r := find(results, case, p)) is None else r.ms for case in cases] for p in providers}
    colors = {p: f"C{PROVIDERS.index(p)}" for p in providers}
    harness.grouped_bars(ax, values, colors, lambda y: f"{y:.3g}", fontsize=7, padding=2)
    ax.set_xticks(range(len(cases)), [c.label.replace(", ", "\n", 1) for c in cases], fontsize=8)
    ax.margins(y=0.15)
    ax.set_ylabel("forward + backward, ms")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return harness.save_figure(plt, fig, path)


def write_outputs(
    cases: Sequence[Case], args: argparse.Namespace, device: torch.device, recorder: harness.Recorder
) -> None:
    """Where the CSV rows went, and the plot."""
    results = recorder.results
    if not recorder.wrote():
        return
    name = harness.device_name(device)
    quick = "_quick" if recorder.preset == "quick" else ""
    png = args.out / f"attn_masked_{args.dtype_name}_{harness.slug(name)}{quick}.png"
    r = results[0]
    title = f"masked attention, forward + backward, {args.dtype_name}, H={r.heads}, D={r.head_dim}; {name}"
    harness.saved_plot(png, plot(png, results, [c for c in cases if any(r.case == c for r in results)], title))


# -- GPU --------------------------------------------------------------------------------------------
def gpu_main(args: argparse.Namespace, device: torch.device) -> int:
    dtype = harness.DTYPES[args.dtype_name]
    cases = list(QUICK_CASES if args.quick else CASES)
    names = args.providers or list(PROVIDERS)
    print(
        f"{len(cases)} case(s), {args.dtype_name}, H={args.heads}, D={args.head_dim}, forward + backward, "
        f"do_bench {args.warmup:g} ms warm-up + {args.rep:g} ms timed per measurement (mean)"
    )
    recorder = make_recorder(args, device, "quick" if args.quick else "default")
    return harness.measure_and_report(
        recorder,
        lambda: available_providers(names, cases, args.head_dim, dtype, device),
        lambda providers: run(cases, providers, args, device, dtype, args.heads, args.head_dim, recorder),
        lambda results: print_results(results, cases, args, device),
        lambda: write_outputs(cases, args, device, recorder),
    )


# -- CPU checks -------------------------------------------------------------------------------------
def smoke_case(case: Case, seed: int) -> list[object]:
    """One table row: the case, max abs errors of out, dq, dk, dv against float64, and pass or FAIL."""
    device = torch.device("cpu")
    problem = make_problem(case, seed, device)
    cells: list[object] = [case.kind, case.batch, SMOKE_HEADS, case.n, SMOKE_HEAD_DIM, problem.describe()]
    q, k, v, grad = make_inputs(case, SMOKE_HEADS, SMOKE_HEAD_DIM, torch.float32, device, seed=seed)

    def compute() -> list[Tensor]:
        out = setup_lmforge(problem)(q, k, v)
        out.backward(grad)
        return [out.detach(), q.grad, k.grad, v.grad]

    def reference() -> list[Tensor]:
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        out64 = setup_bool_mask(problem)(q64, k64, v64)
        out64.backward(grad.double())
        return [out64.detach(), q64.grad, k64.grad, v64.grad]

    return harness.smoke_row(cells, compute, reference, tolerance=SMOKE_TOLERANCE)


def smoke(seed: int) -> bool | None:
    """(a) lmforge's kernel under the Triton interpreter against sdpa-bool-mask in float64; None without lmforge."""
    try:
        import lmforge.kernels.attention  # noqa: F401
    except Exception as err:
        print(
            f"(a) lmforge is unavailable, no correctness smoke: cannot import lmforge.kernels.attention "
            f"({harness.short_error(err)})"
        )
        return None
    print(
        "(a) lmforge kernel under TRITON_INTERPRET=1, fp32, causal, output and gradients against sdpa-bool-mask "
        f"in float64 (tolerance {SMOKE_TOLERANCE:g} max abs):"
    )
    rows = [smoke_case(case, seed) for case in SMOKE_CASES]
    headers = ["mask", "B", "H", "N", "D", "lengths", "out", "dq", "dk", "dv", "result"]
    return harness.print_smoke(headers, rows, "cases; errors are max abs differences")


def cpu_case(case: Case) -> Case:
    """``case`` at CPU size: N = CPU_N, at most CPU_MAX_BATCH rows, the mean length scaled with N."""
    return Case(case.kind, min(case.batch, CPU_MAX_BATCH), CPU_N, max(1, round(case.mean * CPU_N / case.n)))


def cpu_main(args: argparse.Namespace) -> int:
    harness.no_speed_claim()
    os.environ["TRITON_INTERPRET"] = "1"  # before lmforge.kernels.attention (and its @triton.jit) is imported
    device = torch.device("cpu")
    names = args.providers or list(CPU_PROVIDERS)
    args.dtype_name = "fp32"
    cases = list(dict.fromkeys(cpu_case(c) for c in (QUICK_CASES if args.quick else CASES)))
    recorder = make_recorder(args, device, "cpu")
    report = lambda results: print_results(results, cases, args, device)  # noqa: E731
    return recorder.until_interrupted(lambda: cpu_checks(args, names, cases, recorder), report)


def cpu_checks(
    args: argparse.Namespace, names: Sequence[str], cases: Sequence[Case], recorder: harness.Recorder
) -> int:
    device = torch.device("cpu")
    passed = smoke(args.seed) if "lmforge" in names and not args.no_smoke else None
    print()
    print(
        f"(b) torch providers on CPU, fp32, H={CPU_HEADS}, D={CPU_HEAD_DIM}, {torch.get_num_threads()} threads, "
        f"{args.warmup:g} ms warm-up + {args.rep:g} ms timed (at least 5 calls); lmforge's interpreter is not timed:"
    )
    if args.providers is None:
        print(
            "note: flex is not run on CPU by default (FlexAttention has no CPU backward in this torch, and "
            "compiling it on CPU is slow); --providers flex to try it"
        )
    timed = [p for p in names if p != "lmforge"]
    if not timed:
        print("(b) skipped: no torch provider selected")
    providers = available_providers(timed, cases, CPU_HEAD_DIM, torch.float32, device) if timed else {}
    results = run(cases, providers, args, device, torch.float32, CPU_HEADS, CPU_HEAD_DIM, recorder) if providers else []
    if results:
        print_results(results, cases, args, device)
    write_outputs(cases, args, device, recorder)
    return 1 if passed is False else 0


# -- command line -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = harness.bench_parser(__doc__, "the first and the third case; shorter budgets on CPU")
    p.add_argument("--heads", type=int, default=HEADS, help=f"query (and key/value) heads H (default {HEADS}; GPU)")
    p.add_argument("--head-dim", type=int, default=HEAD_DIM, help=f"head dim D (default {HEAD_DIM}; GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document and padding lengths (default 0)")
    harness.add_bench_args(p, PROVIDERS, cpu_default=CPU_PROVIDERS)
    args = harness.parse_bench_args(p, argv)
    if args.heads <= 0 or args.head_dim <= 0:
        p.error("--heads and --head-dim must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return harness.bench_main(parse_args, cpu_main, gpu_main, argv)


if __name__ == "__main__":
    sys.exit(main())
