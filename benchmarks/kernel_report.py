"""What lmforge's Triton kernels compile to on a GPU architecture, without the GPU.

Speed needs a GPU; what the compiler makes of a kernel does not. For every autotune configuration of
lmforge's kernels (after the same pruning the autotuner applies), this compiles the kernel ahead of time
for an NVIDIA target (``sm_90`` = H100/H200 by default, ``--arch 80`` for A100) with Triton's own
compiler and ``ptxas``, then reads back, per configuration:

* **shared**: the shared memory Triton lays out for the kernel (KiB). Over the card's limit per block
  (227 KiB on sm_90, 163 KiB on sm_80) the launch fails with OutOfResources: the autotuner skips such
  a configuration, and when none fits, ``attention: auto`` falls back to torch;
* **regs** and **stack**: registers per thread (255 at most) and the stack frame; a stack frame with
  ``LDL``/``STL`` instructions in the SASS means **spills** to local memory, much slower;
* the SASS instruction mix: ``HGMMA`` (Hopper's warpgroup tensor-core MMA) or ``HMMA`` (the older
  per-warp MMA), ``MUFU.EX2`` (the exponentials of the softmax), ``LDL+STL`` (spill traffic),
  **async**: ``LDGSTS`` + ``UTMALDG``, asynchronous global-to-shared copies (cp.async, TMA), which a
  software-pipelined loop issues ahead of the products (a loop of synchronous loads has none);
* **verdict**: ok, spills, shared memory over the limit, or the compiler's error.

Attention kernels: ``attn-fwd``; ``attn-bwd``, the fused five-product backward (dQ by atomics) with
its ``attn-delta`` (which also zeroes the dQ buffer) and ``attn-dq-cast``; ``attn-dkdv`` and
``attn-dq``, the deterministic two-kernel backward. WIDE (64-bit in-tile offsets, for huge strides
only) is compiled off, as training launches it.

The kernels are compiled as a training launch specialises them: contiguous bf16 (``--dtype``) tensors,
pointers and strides divisible by 16, unit strides and a group size of 1 (multi-head attention) folded
in as constants, sequence length divisible by 16. Variants: head dims ``--head-dims`` (64 and 128),
causal or not, without masks (``--masks`` adds key padding, segment ids and, causal only, the sliding window).

Results: a table on stdout and ``<out>/kernel_report.csv`` (target, versions and date on every row).
This runs on any machine with triton installed (it carries ``ptxas`` and ``cuobjdump``); it never
needs a GPU. Each compilation takes a few seconds: ``--jobs`` compiles in parallel, ``--quick`` takes
one configuration per kernel.

    python benchmarks/kernel_report.py                      # every config, sm_90, bf16, D 64 and 128
    python benchmarks/kernel_report.py --quick --arch 80,90 # one config per kernel, A100 and H100
    python benchmarks/kernel_report.py --kernels attn-fwd --head-dims 128 --masks
    python benchmarks/kernel_report.py --kernels attn-dkdv --head-dims 256 --tiles 32x32w8s2,16x64w8s2
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import harness

# Dynamic shared memory a block may opt into, bytes, by compute capability (CUDA programming guide).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"bf16": "bf16", "fp16": "fp16"}
KERNELS = ("attn-fwd", "attn-bwd", "attn-dkdv", "attn-dq", "attn-delta", "attn-dq-cast", "ce-rows", "scale")
SASS_OPS = ("HGMMA", "HMMA", "MUFU.EX2", "LDL", "STL", "LDGSTS", "UTMALDG")


@dataclass(frozen=True)
class Job:
    """One compilation: a kernel, its variant (constants) and one launch configuration."""

    kernel: str
    variant: str
    arch: int
    dtype: str
    constants: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    config: str


@dataclass
class Report:
    job: Job
    shared: int | None = None
    regs: int | None = None
    stack: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @property
    def spill_ops(self) -> int:
        return self.ops.get("LDL", 0) + self.ops.get("STL", 0)

    @property
    def async_ops(self) -> int:
        """Asynchronous global-to-shared copies (cp.async as LDGSTS, TMA as UTMALDG): the loads that a
        software-pipelined loop issues ahead of their use. A loop whose loads are synchronous has none."""
        return self.ops.get("LDGSTS", 0) + self.ops.get("UTMALDG", 0)

    @property
    def verdict(self) -> str:
        if self.error:
            return f"compile error: {self.error}"
        problems = []
        if self.shared is not None and self.shared > SHARED_LIMIT.get(self.job.arch, SHARED_LIMIT[90]):
            problems.append("shared memory over the limit")
        if self.spill_ops or (self.stack or 0) > 0:
            problems.append("spills")
        return ", ".join(problems) or "ok"


# -- what to compile --------------------------------------------------------------------------------
def _attention_pointers(kernel: str, dtype: str) -> dict[str, str]:
    """The pointer types of an attention kernel's runtime arguments."""
    fp = f"*{dtype}"
    # the fused backward and the deterministic dK/dV kernel share one body, so one argument list
    dkdv = dict(Q=fp, K=fp, V=fp, DO=fp, LSE="*fp32", DELTA="*fp32", DK=fp, DV=fp, DQA="*fp32", KPM="*i8",
                SEG="*i64", BOUNDS="*i32")  # fmt: skip
    return {
        "attn-fwd": dict(Q=fp, K=fp, V=fp, Out=fp, LSE="*fp32", KPM="*i8", SEG="*i64", BOUNDS="*i32"),
        "attn-bwd": dkdv,
        "attn-dkdv": dkdv,
        "attn-dq": dict(
            Q=fp, K=fp, V=fp, DO=fp, LSE="*fp32", DELTA="*fp32", DQ=fp, KPM="*i8", SEG="*i64", BOUNDS="*i32"
        ),
        "attn-delta": dict(Out=fp, DO=fp, DELTA="*fp32", DQA="*fp32"),
        "attn-dq-cast": dict(DQA="*fp32", DQ=fp),
    }[kernel]


def _hint(name: str) -> int:
    """Divisibility a contiguous (B, H, N, D) launch gives an integer argument: the head-dim strides are 1,
    the group size of multi-head attention is 1, everything else (strides, N, D, H) is divisible by 16."""
    if re.fullmatch(r"s\w*d", name) or name == "GROUP":
        return 1
    return 16


def attention_jobs(
    kernel: str, arch: int, dtype: str, head_dims: Sequence[int], masks: bool, quick: bool, tiles: Sequence[tuple] = ()
) -> list[Job]:
    """The jobs of one attention kernel: per head dim, the tile shapes its autotuner would try there
    (or ``tiles``), causal and not, with and (``masks``) without the padding and segment masks."""
    import lmforge.kernels.attention as attention

    if kernel in ("attn-delta", "attn-dq-cast"):  # row kernels: 64 rows, launched with the default 4 warps
        zero = (("ZERO_DQA", True),) if kernel == "attn-delta" else ()  # as the fused backward launches it
        return [
            Job(kernel, f"D{d}", arch, dtype, (*zero, ("WIDE", False), ("BLOCK_M", 64), ("BLOCK_D", d)), 4, 3,
                "64 rows w4")
            for d in head_dims
        ]  # fmt: skip
    table = {
        "attn-fwd": attention.FWD_TILES,
        "attn-bwd": attention.BWD_TILES,
        "attn-dkdv": attention.DKDV_TILES,
        "attn-dq": attention.DQ_TILES,
    }[kernel]
    # (padding, segments, sliding window); a window only with causal attention, as the kernels take it
    mask_sets = [(False, False, False)] + (
        [(True, False, False), (False, True, False), (False, False, True)] if masks else []
    )
    jobs = []
    for d in head_dims:
        shapes = list(tiles) or table[attention._head_dim_bucket(max(16, 1 << (d - 1).bit_length()))]
        for causal in (False, True):
            for kpm, seg, window in mask_sets:
                if window and not causal:
                    continue
                variant = f"D{d} {'causal' if causal else 'full'}" + (" +pad" if kpm else "") + (" +seg" if seg else "")
                variant += " +win" if window else ""
                flags = dict(CAUSAL=causal, HAS_KPM=kpm, HAS_SEG=seg, HAS_WINDOW=window, IEEE=False, WIDE=False,
                             BLOCK_D=d)  # fmt: skip
                if kernel in ("attn-bwd", "attn-dkdv"):  # one kernel: with and without the dQ atomics
                    flags["DQ_ATOMIC"] = kernel == "attn-bwd"
                for bm, bn, warps, stages in shapes[:1] if quick else shapes:
                    constants = tuple({**flags, "BLOCK_M": bm, "BLOCK_N": bn}.items())
                    label = f"{bm}x{bn} w{warps} s{stages}"
                    jobs.append(Job(kernel, variant, arch, dtype, constants, warps, stages, label))
    return jobs


def tile_list(text: str) -> list[tuple[int, int, int, int]]:
    """``32x128w8s2,64x64w4s3`` -> [(32, 128, 8, 2), (64, 64, 4, 3)]: BLOCK_M x BLOCK_N, warps, stages."""
    tiles = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)w(\d+)s(\d+)\s*", item)
        if not match:
            raise argparse.ArgumentTypeError(f"{item!r}: expected BLOCK_MxBLOCK_NwWARPSsSTAGES, e.g. 32x128w8s2")
        tiles.append(tuple(int(g) for g in match.groups()))
    return tiles


def loss_jobs(kernel: str, arch: int, dtype: str) -> list[Job]:
    if kernel == "scale":
        return [Job(kernel, "in place", arch, dtype, (("BLOCK", 4096),), 8, 3, "4096 w8")]
    return [
        Job(kernel, f"softcap={cap}", arch, dtype, (("HAS_SOFTCAP", cap), ("BLOCK_V", 4096)), 8, 3, "4096 w8")
        for cap in (False, True)
    ]


def compile_job(job: Job) -> Report:
    """Compile one job for its target and read back shared memory, registers, stack and the SASS mix."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = Report(job)
    constants = dict(job.constants)
    if job.kernel.startswith("attn"):
        import lmforge.kernels.attention as module

        name = {
            "attn-fwd": "_attn_fwd",
            "attn-bwd": "_attn_bwd",
            "attn-dkdv": "_attn_bwd_dkdv",
            "attn-dq": "_attn_bwd_dq",
            "attn-dq-cast": "_attn_bwd_dq_cast",
        }.get(job.kernel, "_attn_bwd_delta")
        pointers = _attention_pointers(job.kernel, job.dtype)
        floats = ("qk_scale", "sm_scale")
    else:
        import lmforge.kernels.cross_entropy as module

        name = "_scale_kernel" if job.kernel == "scale" else "_ce_rows_kernel"
        fp = f"*{job.dtype}"
        pointers = (
            dict(X=fp, FACTOR="*fp32") if job.kernel == "scale" else dict(X=fp, T="*i64", LOSS="*fp32", SCALE="*fp32")
        )
        floats = ("eps", "z_loss", "softcap")
    fn = getattr(module, name)
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # autotune / heuristics wrappers keep it in .fn
        fn = fn.fn
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in floats:
            signature[arg] = "fp32"
        elif arg == "ignore_index":
            signature[arg] = "i32"
        elif job.kernel.startswith("attn") and _hint(arg) == 1:
            signature[arg] = "constexpr"
            constants[arg] = 1
        else:
            signature[arg] = "i64" if arg == "numel" else "i32"
            if arg not in ("V", "numel", "stride_x"):  # a vocabulary such as 50257 is odd
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", job.arch, 32)
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=constants, attrs=attrs),
            target=target,
            options=dict(num_warps=job.num_warps, num_stages=job.num_stages),
        )
    except Exception as err:  # a compiler error is the finding, not a crash of the report
        lines = str(err).strip().splitlines()
        report.error = f"{type(err).__name__}: {lines[-1] if lines else ''}"[:160]
        return report
    report.shared = int(compiled.metadata.shared)
    report.regs, report.stack, report.ops = cubin_facts(compiled.asm["cubin"])
    return report


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cubin_facts(cubin: bytes) -> tuple[int | None, int | None, dict[str, int]]:
    """(registers per thread, stack frame bytes, SASS op counts) of a cubin, through cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True)
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(path)], capture_output=True, text=True)
    regs = re.search(r"REG:(\d+)", usage.stdout)
    stack = re.search(r"STACK:(\d+)", usage.stdout)
    counts = collections.Counter(re.findall(r"\b(HGMMA|HMMA|MUFU\.EX2|LDL|STL|LDGSTS|UTMALDG)\b", sass.stdout))
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None, dict(counts))


# -- report -----------------------------------------------------------------------------------------
def table_rows(reports: Sequence[Report]) -> list[list[object]]:
    rows = []
    for r in reports:
        j = r.job
        if r.error:
            rows.append([f"sm_{j.arch}", j.kernel, j.variant, j.config, "-", "-", "-", "-", "-", "-", "-", r.verdict])
            continue
        mma = r.ops.get("HGMMA", 0) or r.ops.get("HMMA", 0)
        mma_kind = "HGMMA" if r.ops.get("HGMMA") else ("HMMA" if r.ops.get("HMMA") else "")
        rows.append(
            [f"sm_{j.arch}", j.kernel, j.variant, j.config, f"{r.shared / 1024:.0f}", r.regs, r.stack,
             f"{mma} {mma_kind}".strip(), r.ops.get("MUFU.EX2", 0), r.async_ops, r.spill_ops, r.verdict]
        )  # fmt: skip
    return rows


def csv_rows(reports: Sequence[Report], stamp: dict[str, str]) -> list[dict]:
    return [
        {
            **stamp,
            "target": f"sm_{r.job.arch}",
            "kernel": r.job.kernel,
            "variant": r.job.variant,
            "dtype": r.job.dtype,
            "config": r.job.config,
            "shared_bytes": "" if r.shared is None else r.shared,
            "regs": "" if r.regs is None else r.regs,
            "stack_bytes": "" if r.stack is None else r.stack,
            **{op.lower().replace(".", "_"): r.ops.get(op, 0) for op in SASS_OPS},
            "verdict": r.verdict,
        }
        for r in reports
    ]


def summary(reports: Sequence[Report]) -> list[str]:
    """Per kernel, variant and target: how many configs are clean, and the verdict when none is."""
    lines = []
    groups: dict[tuple, list[Report]] = collections.defaultdict(list)
    for r in reports:
        groups[(r.job.arch, r.job.kernel, r.job.variant)].append(r)
    for (arch, kernel, variant), members in groups.items():
        clean = [r for r in members if r.verdict == "ok"]
        if not clean:
            lines.append(f"sm_{arch} {kernel} {variant}: no clean config ({members[0].verdict})")
    return lines


# -- command line -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch", type=harness.int_list, default=[90], help="compute capabilities, e.g. 90 or 80,90 (default 90)"
    )
    p.add_argument(
        "--kernels",
        type=harness.choice_list(KERNELS),
        default=list(KERNELS),
        help=f"comma-separated subset of {','.join(KERNELS)}",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--head-dims", type=harness.int_list, default=[64, 128], help="attention head dims (default 64,128)")
    p.add_argument(
        "--masks", action="store_true", help="also compile the key-padding, segment-id and sliding-window variants"
    )
    p.add_argument("--quick", action="store_true", help="one config per kernel and variant (the first)")
    p.add_argument(
        "--tiles",
        type=tile_list,
        default=[],
        help="attention: compile these tile shapes instead of the tuned lists, e.g. 32x128w8s2,64x64w4s3",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations (default: CPUs)")
    harness.add_out_arg(p, what="CSV")
    args = p.parse_args(argv)
    args.kernel_list = args.kernels
    if any(a not in SHARED_LIMIT for a in args.arch):
        p.error(f"--arch: choose from {', '.join(map(str, SHARED_LIMIT))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernel_report: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    jobs = []
    for arch in args.arch:
        for kernel in args.kernel_list:
            if kernel.startswith("attn"):
                jobs += attention_jobs(kernel, arch, args.dtype, args.head_dims, args.masks, args.quick, args.tiles)
            else:
                jobs += loss_jobs(kernel, arch, args.dtype)
    print(f"{harness.format_versions()}; {harness.iso_date()}; no GPU used (ahead-of-time compilation)")
    print(
        f"compiling {len(jobs)} kernel configurations for {', '.join(f'sm_{a}' for a in args.arch)}, {args.jobs} at a time"
    )
    reports: list[Report] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for i, report in enumerate(pool.map(compile_job, jobs), 1):
            reports.append(report)
            if sys.stderr.isatty():
                print(f"\r  {i}/{len(jobs)}", end="", flush=True, file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    headers = [
        "target",
        "kernel",
        "variant",
        "config",
        "shared KiB",
        "regs",
        "stack B",
        "MMA",
        "EX2",
        "async",
        "LDL+STL",
        "verdict",
    ]
    harness.print_table(headers, table_rows(reports))
    limits = ", ".join(f"sm_{a} {SHARED_LIMIT[a] / 1024:.0f} KiB" for a in args.arch)
    print(
        f"shared memory limit per block: {limits}; LDL+STL: spill instructions in the SASS; "
        "async: LDGSTS+UTMALDG (pipelined loads)"
    )
    for line in summary(reports):
        print(f"warning: {line}")
    stamp = {"date": harness.iso_date(), **harness.versions()}
    path = harness.write_csv(args.out / "kernel_report.csv", csv_rows(reports, stamp))
    print(f"wrote {path}")
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
