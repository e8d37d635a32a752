"""The GPU session's gate: warm-compile every listed attention tile and check it against float64.

The question: before a GPU session spends its minutes on speed, does every kernel variant the benchmarks
(and training) may launch compile on this card and compute the right thing? And, as a side effect, are
they all in the Triton cache (``TRITON_CACHE_DIR``) when the benchmarks' autotuners want them?

Checks, one job each, in order of importance (the list is the same in every process, see :func:`plan`):

* ``probe``: deterministic=True (the two-kernel backward with its pinned or first-listed tiles) on one
  fixed problem, run by shards 0 and 1: the digests of out, dq, dk, dv must be bitwise equal across the
  two processes;
* ``lce`` and ``ce_rows``: lmforge's fused linear cross-entropy (``use_triton=True``) and its
  cross-entropy row kernel (``lmforge.kernels.cross_entropy.cross_entropy``) at a small and an odd vocab:
  loss and gradients;
* attention, for every case (below), head dim and kernel, every tile listed by
  ``lmforge.kernels.attention.tile_lists(D)``, forced with ``use_tiles``:
  ``fwd`` (the forward alone; output), ``bwd`` (the fused five-product backward, deterministic=False,
  forward forced to the first fwd tile), ``dkdv`` and ``dq`` (the deterministic two-kernel backward,
  deterministic=True, the other kernels forced to their first tile): output, dq, dk, dv. Every backward
  job runs twice: with deterministic=True the gradients must be bitwise equal (the fused backward's dQ
  uses atomics: its repeatability is reported, not required);
* ``auto``: ``flash_attention`` as users call it (autotuned, default backward) for every case and head dim.

Attention cases on CUDA (B=2 rows, bf16 unless said), in this order: N=1024 causal, no mask, H=H_kv=8
(what GPT training and the speed benchmark launch); N=2047 non-causal with key padding, segment ids and
GQA (H=8, H_kv=2; rows that see no key at all included); N=1024 causal with segment ids (packed documents)
and with key padding (H=4); N=1024 non-causal, no mask; N=2047 causal, key padding, GQA; N=2047 causal
with segment ids in fp16 (the first listed tile of each kernel only). Head dims 128, then 64. Without
CUDA, the same kinds at tiny sizes (N 64 and 47, D 32) in fp32 and fp16 under the Triton interpreter
(``TRITON_INTERPRET=1``), the first listed tile of each kernel only (``--max-configs``).

Tolerance (FlashAttention's tests' rule): for each of out, dq, dk, dv (loss, dh, dW, dlogits for the
losses), ``max|lmforge - float64| <= 2 * max|torch - float64| + 1e-5 * max|float64| + 1e-6``, where torch is
the same computation by plain torch ops in the inputs' dtype (for attention, explicit ``q k^T``, softmax
and ``p v`` in bf16, as FlashAttention's ``attention_ref`` without upcasting; for the losses
``F.cross_entropy`` on the dtype's logits) and float64 is the same ops on the upcast inputs. The inputs
are N(0, 1), drawn afresh for every job. NaN never passes.

Running: ``--parallel K`` starts K shard processes (``--shard i/K``; Triton's compilation is CPU-bound,
the GPU work is tiny) and merges their results; ``--time-limit S`` makes the shards stop starting jobs
S - 15 seconds in (the rest are "not run"), after which stragglers get SIGINT. Every shard appends one JSON
line per finished job to ``<out>/gate-<i>.jsonl``, flushed, so an interrupted gate keeps what it checked;
``--merge`` (also run by ``--parallel`` at its end) turns them into ``<out>/gate.csv`` and
``<out>/gate_summary.txt``, whose first line is the verdict: PASS, FAIL, or INCOMPLETE (no failure, but
jobs not run). Exit code 0 for PASS and INCOMPLETE, 1 for FAIL, 130 when interrupted.

    python benchmarks/gpu_gate.py --parallel 12 --time-limit 150 --out /tmp/gate   # the session's gate
    python benchmarks/gpu_gate.py --shard 0/1 --kernels fwd --cases causal-gqa       # one slice, in-process
    python benchmarks/gpu_gate.py --merge --out /tmp/gate                           # the summary again
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("fwd", "bwd", "dkdv", "dq")
ATTENTION_METRICS = ("out", "dq", "dk", "dv")
METRICS = ("out", "dq", "dk", "dv", "loss", "dh", "dw", "dlogits")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORE_INDEX = -100
RTOL_FACTOR = 2.0  # lmforge's error may be twice torch's own, same dtype, against float64
EPS_REL, EPS_ABS = 1e-5, 1e-6  # plus 1e-5 of the reference's largest magnitude, plus 1e-6
PLAN_FILE, CSV_FILE, SUMMARY_FILE = "gate_plan.json", "gate.csv", "gate_summary.txt"
DEADLINE_MARGIN_S = 15.0  # --time-limit: shards start no job in the last 15 s, stragglers get SIGINT then
TOLERANCE_NOTE = (
    f"max|lmforge - float64| <= {RTOL_FACTOR:g} * max|torch same dtype - float64| + {EPS_REL:g} * max|float64| "
    f"+ {EPS_ABS:g}, for each of out, dq, dk, dv (losses: loss, dh, dW, dlogits); NaN fails"
)


@dataclass(frozen=True)
class Case:
    """An attention problem: ``batch`` rows of ``n`` tokens, q with ``h`` heads, k and v with ``h_kv``."""

    name: str
    n: int
    causal: bool
    kpm: bool  # key padding (right-padded rows; row 0 full)
    seg: bool  # segment ids (packed documents)
    h: int
    h_kv: int
    dtype: str
    batch: int = 2
    max_configs: int = 0  # the first M listed tiles per kernel only (0: all)

    @property
    def masks(self) -> str:
        return "+".join(m for m, on in (("pad", self.kpm), ("docs", self.seg)) if on) or "none"


GPU_CASES = (  # in order of importance: what training launches, then the hardest case, then the rest
    Case("causal", 1024, True, False, False, 8, 8, "bf16"),
    Case("odd-full-pad-docs-gqa", 2047, False, True, True, 8, 2, "bf16"),
    Case("causal-docs", 1024, True, False, True, 4, 4, "bf16"),
    Case("causal-pad", 1024, True, True, False, 4, 4, "bf16"),
    Case("full", 1024, False, False, False, 8, 8, "bf16"),
    Case("odd-causal-pad-gqa", 2047, True, True, False, 8, 2, "bf16"),
    Case("odd-causal-docs-fp16", 2047, True, False, True, 4, 4, "fp16", max_configs=1),
)
GPU_HEAD_DIMS = (128, 64)
CPU_CASES = (
    Case("causal-gqa", 64, True, False, False, 4, 2, "fp32"),
    Case("odd-full-pad-docs-gqa", 47, False, True, True, 4, 2, "fp32"),
    Case("odd-causal-docs-fp16", 47, True, False, True, 2, 2, "fp16"),
)
CPU_HEAD_DIMS = (32,)
PROBE_CASE = {"cuda": (GPU_CASES[1], 128), "cpu": (CPU_CASES[1], 32)}
# (tokens, hidden, vocab, dtype) of the fused linear CE; (tokens, vocab, dtype) of the row kernel
GPU_LCE = ((512, 256, 1000, "bf16"), (509, 512, 50257, "bf16"), (512, 256, 1000, "fp16"))
GPU_CE_ROWS = ((512, 1000, "bf16"), (509, 50257, "bf16"))
CPU_LCE = ((37, 24, 101, "fp32"), (64, 32, 1001, "fp32"))
CPU_CE_ROWS = ((37, 101, "fp32"), (64, 1001, "fp16"))


def tile_label(tile: Sequence[int] | None) -> str:
    """(128, 64, 8, 3) -> "128x64 w8 s3"; None -> "auto"."""
    if tile is None:
        return "auto"
    bm, bn, w, s = tile
    return f"{bm}x{bn} w{w} s{s}"


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class Job:
    """One check. ``tiles``: what use_tiles forces; ``shard``: a fixed shard (the probes), else round-robin."""

    id: int
    kind: str  # "probe", "lce", "ce_rows", "attention", "auto"
    kernel: str = ""  # attention: the kernel whose tile is under test ("fwd", "bwd", "dkdv", "dq")
    tile: list[int] | None = None
    tiles: dict[str, list[int]] = field(default_factory=dict)
    deterministic: bool | None = None
    case: dict | None = None
    head_dim: int = 0
    shape: list[int] = field(default_factory=list)  # losses: (tokens, hidden, vocab) or (tokens, vocab)
    dtype: str = ""
    shard: int | None = None

    @property
    def label(self) -> str:
        if self.kind in ("lce", "ce_rows"):
            return f"{self.kind} {'x'.join(map(str, self.shape))} {self.dtype}"
        case = Case(**self.case) if self.case else None
        where = f"D{self.head_dim} {case.name} N{case.n} {case.dtype}" if case else ""
        if self.kind == "attention":
            return f"{self.kernel} {tile_label(self.tile)} {where}"
        return f"{self.kind} {where}"


def attention_module() -> object | None:
    try:
        import lmforge.kernels.attention as attention
    except Exception as err:  # a half-written module: the plan says so, the losses are still checked
        print(f"note: cannot import lmforge.kernels.attention ({harness.short_error(err)})")
        return None
    return attention


def api_facts(attention: object | None) -> dict[str, bool]:
    """Which parts of the tile API the attention module has (a module being rewritten may lack some)."""
    names = ("flash_attention", "tile_lists", "use_tiles", "tuned_tiles")
    facts = {name: attention is not None and hasattr(attention, name) for name in names}
    try:
        params = inspect.signature(attention.flash_attention).parameters if attention is not None else {}
    except (AttributeError, TypeError, ValueError):
        params = {}
    facts["deterministic"] = "deterministic" in params
    return facts


def listed_tiles(attention: object | None, head_dim: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """tile_lists(head_dim), or what the module's FWD_TILES/DKDV_TILES/DQ_TILES list (for the report) without it."""
    if attention is None:
        return {}
    if hasattr(attention, "tile_lists"):
        return {k: [tuple(t) for t in v] for k, v in attention.tile_lists(head_dim).items()}
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    found = {}
    for kernel, name in (("fwd", "FWD_TILES"), ("bwd", "BWD_TILES"), ("dkdv", "DKDV_TILES"), ("dq", "DQ_TILES")):
        tiles = getattr(attention, name, None)
        if isinstance(tiles, dict) and bucket in tiles:
            found[kernel] = [tuple(t) for t in tiles[bucket]]
    return found


def plan(args: argparse.Namespace, device: str) -> dict:
    """The jobs, in order of importance, and what could not be forced. The same in every shard."""
    attention = attention_module()
    facts = api_facts(attention)
    cuda = device == "cuda"
    cases = [c for c in (GPU_CASES if cuda else CPU_CASES) if not args.cases or c.name in args.cases]
    head_dims = args.head_dims or (GPU_HEAD_DIMS if cuda else CPU_HEAD_DIMS)
    kernels = args.kernels or list(KERNELS)
    max_configs = args.max_configs if args.max_configs is not None else (0 if cuda else 1)
    jobs: list[Job] = []

    def add(**kw: object) -> None:
        jobs.append(Job(id=len(jobs), **kw))

    if facts["flash_attention"] and "probe" not in args.skip:
        case, d = PROBE_CASE[device]
        det = True if facts["deterministic"] else None
        for shard in (0, 1):
            add(kind="probe", case=asdict(case), head_dim=d, deterministic=det, shard=shard)
    if "ce" not in args.skip:
        for tokens, hidden, vocab, dtype in GPU_LCE if cuda else CPU_LCE:
            add(kind="lce", shape=[tokens, hidden, vocab], dtype=dtype)
        for tokens, vocab, dtype in GPU_CE_ROWS if cuda else CPU_CE_ROWS:
            add(kind="ce_rows", shape=[tokens, vocab], dtype=dtype)
    not_forced: dict[str, str] = {}
    listed: dict[str, dict[str, int]] = {}
    if facts["flash_attention"]:
        forcing = facts["tile_lists"] and facts["use_tiles"]
        for case in cases:
            for d in head_dims:
                tiles = listed_tiles(attention, d)
                for kernel in kernels:
                    have = tiles.get(kernel, [])
                    listed.setdefault(kernel, {})[f"D{d}"] = len(have)
                    if not forcing:
                        not_forced[kernel] = "kernels/attention.py has no tile_lists/use_tiles: autotuned path only"
                        continue
                    if kernel in ("dkdv", "dq") and not facts["deterministic"]:
                        not_forced[kernel] = "flash_attention has no deterministic= argument"
                        continue
                    limit = min(x for x in (max_configs, case.max_configs, len(have)) if x) if have else 0
                    chosen = have[:limit]
                    for tile in chosen:
                        forced = {"fwd": list(tiles["fwd"][0])} if tiles.get("fwd") else {}
                        if kernel == "dkdv" and tiles.get("dq"):
                            forced["dq"] = list(tiles["dq"][0])
                        if kernel == "dq" and tiles.get("dkdv"):
                            forced["dkdv"] = list(tiles["dkdv"][0])
                        forced[kernel] = list(tile)
                        det = {"fwd": None, "bwd": False, "dkdv": True, "dq": True}[kernel]
                        if det is not None and not facts["deterministic"]:
                            det = None
                        add(kind="attention", kernel=kernel, tile=list(tile), tiles=forced, deterministic=det,
                            case=asdict(case), head_dim=d, dtype=case.dtype)  # fmt: skip
        if "auto" not in args.skip:
            for case in cases:
                for d in head_dims:
                    add(kind="auto", case=asdict(case), head_dim=d, dtype=case.dtype)
    return {
        "device": device,
        "api": facts,
        "listed": listed,
        "max_configs": max_configs,
        "not_forced": not_forced,
        "jobs": [asdict(j) for j in jobs],
    }


def shard_jobs(jobs: Sequence[Job], shard: int, shards: int) -> list[Job]:
    """Round-robin over the jobs without a fixed shard; a job fixed to a shard past the last goes to the last."""
    mine, free = [], 0
    for job in jobs:
        if job.shard is not None:
            if min(job.shard, shards - 1) == shard:
                mine.append(job)
            continue
        if free % shards == shard:
            mine.append(job)
        free += 1
    return mine


# -- inputs and references ------------------------------------------------------------------------
def attention_inputs(case: Case, d: int, device: torch.device, seed: int) -> dict[str, Tensor | None]:
    """q, k, v, the upstream gradient (N(0, 1) in the case's dtype) and the masks."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)

    def randn(heads: int) -> Tensor:
        return torch.randn((case.batch, heads, case.n, d), generator=gen, device=device, dtype=dtype)

    q, k, v, do = randn(case.h), randn(case.h_kv), randn(case.h_kv), randn(case.h)
    n = case.n
    kpm = seg = None
    valid = [n] + [rng.randint(n // 2, n - 1) for _ in range(case.batch - 1)]  # row 0 full, the others padded
    if case.kpm:
        kpm = torch.arange(n, device=device)[None, :] < torch.tensor(valid, device=device)[:, None]
    if case.seg:
        rows = []
        for b in range(case.batch):
            ids: list[int] = []
            while len(ids) < n:
                ids += [len(set(ids))] * rng.randint(max(1, n // 8), max(1, n // 3))
            ids = ids[:n]
            if case.kpm:  # padding is a document of its own, as a packer pads a row
                ids = ids[: valid[b]] + [ids[valid[b] - 1] + 1] * (n - valid[b])
            rows.append(ids)
        seg = torch.tensor(rows, device=device, dtype=torch.int32)
    return {"q": q, "k": k, "v": v, "do": do, "kpm": kpm, "seg": seg}


def torch_attention(q: Tensor, k: Tensor, v: Tensor, case: Case, kpm: Tensor | None, seg: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v by plain torch ops in q's dtype (FlashAttention's attention_ref without
    upcasting); GQA by repeat_interleave; a row with no key outputs zeros (and zero gradients)."""
    n, d = q.shape[-2], q.shape[-1]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    allowed = torch.ones(q.shape[0], 1, n, n, dtype=torch.bool, device=q.device)
    if case.causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    if seg is not None:
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-1, -2)
    scores = scores.masked_fill(~(allowed | ~has_key), float("-inf"))
    p = torch.softmax(scores, dim=-1) * has_key
    return p.to(v.dtype) @ v


def attention_grads(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor], inputs: dict, dtype: torch.dtype | None, backward: bool
) -> dict[str, Tensor]:
    """out (and dq, dk, dv) of ``fn`` on copies of the inputs, in ``dtype`` (None: as they are)."""
    leaves = [inputs[n].detach().to(dtype or inputs[n].dtype).requires_grad_(backward) for n in ("q", "k", "v")]
    out = fn(*leaves)
    got = {"out": out.detach()}
    if backward:
        out.backward(inputs["do"].to(out.dtype))
        got.update(dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
    return got


def max_error(got: Tensor, ref: Tensor) -> float:
    err = (got.double() - ref).abs().max().item()
    return float("nan") if math.isnan(err) or not torch.isfinite(got).all() else err


def compare(got: dict[str, Tensor], base: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, object]:
    """Per metric: lmforge's error, torch's error, the bound; whether all pass, and the worst error / bound."""
    errors, torch_errors, worst, ok = {}, {}, 0.0, True
    for name, value in got.items():
        err, base_err = max_error(value, ref[name]), max_error(base[name], ref[name])
        bound = RTOL_FACTOR * base_err + EPS_REL * ref[name].abs().max().item() + EPS_ABS
        errors[name], torch_errors[name] = err, base_err
        if math.isnan(err) or err > bound:
            ok = False
        worst = max(worst, err / bound if not math.isnan(err) else math.inf)
    return {"errors": errors, "torch_errors": torch_errors, "worst": worst, "ok": ok}


def digest(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# -- jobs -----------------------------------------------------------------------------------------
def run_attention(job: Job, device: torch.device, attention: object, facts: dict) -> dict:
    case = Case(**job.case)
    seed = 999 if job.kind == "probe" else 1000 + job.id  # the probes: the same inputs in every shard
    inputs = attention_inputs(case, job.head_dim, device, seed=seed)
    backward = not (job.kind == "attention" and job.kernel == "fwd")
    kpm, seg = inputs["kpm"], inputs["seg"]
    options: dict[str, object] = dict(causal=case.causal, key_padding_mask=kpm, segment_ids=seg)
    if job.deterministic is not None and facts["deterministic"]:
        options["deterministic"] = job.deterministic

    def lmforge(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention.flash_attention(q, k, v, **options)

    def once() -> dict[str, Tensor]:
        forcing = attention.use_tiles(**{k: tuple(t) for k, t in job.tiles.items()}) if job.tiles else None
        with forcing or contextlib.nullcontext():
            got = attention_grads(lmforge, inputs, None, backward)
        harness.sync(device)
        return got

    got = once()
    record: dict[str, object] = {}
    if job.kind == "probe":
        record["digest"] = digest([got[m] for m in ATTENTION_METRICS])
    ref = attention_grads(lambda q, k, v: torch_attention(q, k, v, case, kpm, seg), inputs, torch.float64, backward)
    base = attention_grads(lambda q, k, v: torch_attention(q, k, v, case, kpm, seg), inputs, None, backward)
    record.update(compare(got, base, ref))
    if backward:
        again = once()
        same = all(torch.equal(got[m], again[m]) for m in got)
        record["repeatable"] = same
        if options.get("deterministic") is True and not same:
            record["ok"] = False
            record["error"] = "deterministic=True: two runs differ bitwise"
    return record


def run_lce(job: Job, device: torch.device) -> dict:
    from lmforge.kernels.linear_cross_entropy import linear_cross_entropy

    tokens, hidden, vocab = job.shape
    dtype = DTYPES[job.dtype]
    gen = torch.Generator(device=device).manual_seed(2000 + job.id)
    h = torch.randn((tokens, hidden), generator=gen, device=device, dtype=dtype)
    w = (torch.randn((vocab, hidden), generator=gen, device=device) * hidden**-0.5).to(dtype)
    t = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    t[torch.rand(tokens, generator=gen, device=device) < 0.1] = IGNORE_INDEX

    def grads(fn: Callable[[Tensor, Tensor], Tensor], as_dtype: torch.dtype | None) -> dict[str, Tensor]:
        hh, ww = (x.detach().to(as_dtype or x.dtype).requires_grad_() for x in (h, w))
        loss = fn(hh, ww)
        loss.backward()
        return {"loss": loss.detach().reshape(1), "dh": hh.grad, "dw": ww.grad}

    def torch_loss(hh: Tensor, ww: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(hh, ww), t, ignore_index=IGNORE_INDEX)

    def ours() -> dict[str, Tensor]:
        fn = lambda hh, ww: linear_cross_entropy(hh, ww, t, ignore_index=IGNORE_INDEX, use_triton=True)  # noqa: E731
        got = grads(fn, None)
        harness.sync(device)
        return got

    got = ours()
    record = compare(got, grads(torch_loss, None), grads(torch_loss, torch.float64))
    again = ours()
    record["repeatable"] = all(torch.equal(got[m], again[m]) for m in got)
    return record


def run_ce_rows(job: Job, device: torch.device) -> dict:
    from lmforge.kernels.cross_entropy import cross_entropy

    tokens, vocab = job.shape
    dtype = DTYPES[job.dtype]
    gen = torch.Generator(device=device).manual_seed(3000 + job.id)
    logits = (torch.randn((tokens, vocab), generator=gen, device=device) * 2).to(dtype)
    t = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    t[torch.rand(tokens, generator=gen, device=device) < 0.1] = IGNORE_INDEX

    def grads(fn: Callable[[Tensor], Tensor], as_dtype: torch.dtype | None) -> dict[str, Tensor]:
        x = logits.detach().to(as_dtype or dtype).requires_grad_()
        loss = fn(x)
        loss.backward()
        return {"loss": loss.detach().reshape(1), "dlogits": x.grad}

    def torch_loss(x: Tensor) -> Tensor:
        return F.cross_entropy(x, t, ignore_index=IGNORE_INDEX)

    got = grads(lambda x: cross_entropy(x, t, ignore_index=IGNORE_INDEX), None)
    harness.sync(device)
    return compare(got, grads(torch_loss, None), grads(torch_loss, torch.float64))


def run_job(job: Job, device: torch.device, attention: object | None, facts: dict) -> dict:
    """A result record; an exception (a tile that does not compile here, say) is a failed check."""
    began = time.perf_counter()
    record: dict[str, object]
    try:
        if job.kind == "lce":
            record = run_lce(job, device)
        elif job.kind == "ce_rows":
            record = run_ce_rows(job, device)
        else:
            record = run_attention(job, device, attention, facts)
        status = "pass" if record["ok"] else "FAIL"
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - a kernel that fails to build or run is this check's result
        record, status = {"error": harness.short_error(err, 300)}, "error"
    record.pop("ok", None)
    return {"id": job.id, "status": status, "seconds": round(time.perf_counter() - began, 3), **record}


def worst_text(record: dict) -> str:
    worst = record.get("worst")
    return "" if worst is None else f" (worst error {worst:.2f} of its bound)"


def run_shard(args: argparse.Namespace, device: torch.device) -> int:
    """Run this shard's jobs, one JSON line each, flushed; stop starting jobs at the deadline."""
    shard, shards = args.shard
    spec = plan(args, device.type)
    write_json(args.out / PLAN_FILE, spec)
    jobs = shard_jobs([Job(**j) for j in spec["jobs"]], shard, shards)
    attention = attention_module() if spec["api"]["flash_attention"] else None
    if device.type == "cuda" or shards > 1:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))  # compiling is the work; leave the cores
    path = args.out / f"gate-{shard:02d}.jsonl"
    print(f"[gate {shard}/{shards}] {len(jobs)} of {len(spec['jobs'])} jobs on {device.type}", flush=True)
    done = 0
    with path.open("a") as f:
        try:
            for job in jobs:
                if args.deadline and time.time() > args.deadline - DEADLINE_MARGIN_S:
                    print(f"[gate {shard}/{shards}] time is up: {len(jobs) - done} job(s) not run", flush=True)
                    break
                record = run_job(job, device, attention, spec["api"])
                record["shard"] = shard
                f.write(json.dumps(record) + "\n")
                f.flush()
                done += 1
                note = record.get("error", "") if record["status"] != "pass" else ""
                print(
                    f"[gate {shard}/{shards}] {job.label}: {record['status']}{worst_text(record)} "
                    f"{record['seconds']:.1f} s {note}".rstrip(),
                    flush=True,
                )
        except KeyboardInterrupt:
            print(f"[gate {shard}/{shards}] interrupted after {done} job(s)", flush=True)
            return 130
    return 0


def write_json(path: Path, value: object) -> None:
    """Atomically (several shards write the same plan)."""
    harness.replace_file(path, json.dumps(value, indent=1))


# -- parallel run -----------------------------------------------------------------------------------
def shard_command(args: argparse.Namespace, shard: int, shards: int, deadline: float) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--shard", f"{shard}/{shards}", "--out", str(args.out)]
    cmd += ["--device", args.device, "--deadline", f"{deadline:.3f}"]
    for flag, value in (("--cases", args.cases), ("--kernels", args.kernels), ("--skip", args.skip)):
        if value:
            cmd += [flag, ",".join(value)]
    if args.head_dims:
        cmd += ["--head-dims", ",".join(map(str, args.head_dims))]
    if args.max_configs is not None:
        cmd += ["--max-configs", str(args.max_configs)]
    return cmd


def run_parallel(args: argparse.Namespace, device: torch.device) -> int:
    """K shard processes, then the merge; on SIGINT the shards get one too, and what they wrote is merged."""
    shards = args.parallel
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("gate-*.jsonl"):
        old.unlink()
    deadline = time.time() + args.time_limit if args.time_limit else 0.0
    spec = plan(args, device.type)
    write_json(args.out / PLAN_FILE, spec)
    print(
        f"gate: {len(spec['jobs'])} jobs in {shards} shard process(es) on {device.type}"
        + (f", {args.time_limit:g} s at most" if args.time_limit else ""),
        flush=True,
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    procs = [subprocess.Popen(shard_command(args, i, shards, deadline), env=env) for i in range(shards)]
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            if deadline and time.time() > deadline - DEADLINE_MARGIN_S / 3:
                print("gate: time is up; interrupting the shards still running", flush=True)
                stop(procs)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("gate: interrupted; stopping the shards and merging what they wrote", flush=True)
        stop(procs)
        code = 130
    verdict = merge(args.out)
    return code or (1 if verdict == "FAIL" else 0)


def stop(procs: Sequence[subprocess.Popen], grace: float = 4.0) -> None:
    """SIGINT to the shards still running (they keep what they wrote), then SIGKILL after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
    end = time.time() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            p.wait(timeout=max(0.1, end - time.time()))
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- merge and summary ------------------------------------------------------------------------------
def read_results(out: Path) -> list[dict]:
    records = []
    for path in sorted(out.glob("gate-*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                records.append(json.loads(line))
    return records


def merge(out: Path) -> str:
    """gate.csv and gate_summary.txt from the plan and the shards' lines; prints the summary; returns the verdict."""
    plan_path = out / PLAN_FILE
    if not plan_path.exists():
        text = "GATE: NOT RUN (no plan: the gate never started)\n"
        (out / SUMMARY_FILE).write_text(text)
        print(text, end="")
        return "NOT RUN"
    spec = json.loads(plan_path.read_text())
    jobs = [Job(**j) for j in spec["jobs"]]
    by_id: dict[int, list[dict]] = {}
    for record in read_results(out):
        by_id.setdefault(record["id"], []).append(record)
    rows = []
    for job in jobs:
        records = by_id.get(job.id) or [{"status": "not run"}]
        rows.append((job, records[-1]))
    text, verdict = summary_text(spec, rows)
    (out / SUMMARY_FILE).write_text(text)
    csv_path = out / CSV_FILE
    if csv_path.exists():
        csv_path.unlink()
    harness.write_csv(csv_path, [csv_row(job, r) for job, r in rows], common=harness.stamp())
    print(text, end="", flush=True)
    return verdict


def csv_row(job: Job, r: dict) -> dict[str, object]:
    case = Case(**job.case) if job.case else None
    row: dict[str, object] = {
        "job": job.id,
        "shard": r.get("shard", ""),
        "status": r["status"],
        "kind": job.kind,
        "kernel": job.kernel,
        "tile": tile_label(job.tile) if job.kind == "attention" else "",
        "forced": " ".join(f"{k}={tile_label(t)}" for k, t in job.tiles.items()),
        "deterministic": "" if job.deterministic is None else int(job.deterministic),
        "dtype": job.dtype or (case.dtype if case else ""),
        "head_dim": job.head_dim or "",
        "case": case.name if case else "x".join(map(str, job.shape)),
        "seq": case.n if case else "",
        "causal": int(case.causal) if case else "",
        "masks": case.masks if case else "",
        "heads": case.h if case else "",
        "kv_heads": case.h_kv if case else "",
    }
    for m in METRICS:
        err = r.get("errors", {}).get(m)
        base = r.get("torch_errors", {}).get(m)
        row[f"err_{m}"] = "" if err is None else f"{err:.3e}"
        row[f"torch_{m}"] = "" if base is None else f"{base:.3e}"
    worst = r.get("worst")
    row["worst_of_bound"] = "" if worst is None else f"{worst:.3f}"
    row["repeatable"] = "" if r.get("repeatable") is None else int(r["repeatable"])
    row["digest"] = r.get("digest", "")
    row["seconds"] = r.get("seconds", "")
    row["error"] = r.get("error", "")
    return row


def summary_text(spec: dict, rows: list[tuple[Job, dict]]) -> tuple[str, str]:
    counts: dict[str, int] = {}
    for _, r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    failed = counts.get("FAIL", 0) + counts.get("error", 0)
    not_run = counts.get("not run", 0)
    digests = [(r.get("shard"), r["digest"]) for job, r in rows if job.kind == "probe" and r.get("digest")]
    cross = len({d for _, d in digests}) <= 1
    verdict = "FAIL" if failed or not cross else "INCOMPLETE" if not_run or not rows else "PASS"
    run = len(rows) - not_run
    lines = [
        f"GATE: {verdict} -- {run} of {len(rows)} checks run on {spec['device']}: {counts.get('pass', 0)} passed, "
        f"{failed} failed, {not_run} not run",
        f"tolerance: {TOLERANCE_NOTE}",
    ]
    attention_rows = [(j, r) for j, r in rows if j.kind == "attention"]
    for kernel in KERNELS:
        mine = [(j, r) for j, r in attention_rows if j.kernel == kernel]
        listed = spec["listed"].get(kernel, {})
        if not mine and kernel not in spec["not_forced"]:
            continue
        parts = []
        for d_key, count in sorted(listed.items(), key=lambda kv: -int(kv[0][1:])):
            d = int(d_key[1:])
            at_d = [(j, r) for j, r in mine if j.head_dim == d]
            tiles = {tuple(j.tile) for j, _ in at_d}
            ran = {tuple(j.tile) for j, r in at_d if r["status"] != "not run"}
            good = {t for t in ran if all(r["status"] in ("pass", "not run") for j, r in at_d if tuple(j.tile) == t)}
            cases = len({j.case["name"] for j, _ in at_d})
            parts.append(
                f"{d_key} {len(good)}/{len(ran)} passed of {len(tiles)} forced ({count} listed, {cases} cases)"
            )
        why = spec["not_forced"].get(kernel)
        lines.append(f"  {kernel:<5} " + ("; ".join(parts) if parts and not why else f"not forced: {why}"))
    det = [(j, r) for j, r in attention_rows if j.deterministic is True and "repeatable" in r]
    if det:
        same = sum(1 for _, r in det if r["repeatable"])
        lines.append(f"determinism: deterministic=True run twice, bitwise equal in {same} of {len(det)} checks")
    fused = [(j, r) for j, r in attention_rows if j.kernel == "bwd" and "repeatable" in r]
    if fused:
        same = sum(1 for _, r in fused if r["repeatable"])
        lines.append(f"  (info) fused backward (atomics) bitwise repeatable in {same} of {len(fused)} checks")
    if digests:
        shards = sorted({s for s, _ in digests if s is not None})
        state = "equal" if cross else "DIFFER"
        where = f"across shard processes {shards}" if len(shards) > 1 else "twice in one process (one shard)"
        lines.append(
            f"  probe (deterministic=True) {where}: digests {state} ({', '.join(sorted({d for _, d in digests}))})"
        )
    for kind in ("lce", "ce_rows", "auto"):
        mine = [r for j, r in rows if j.kind == kind]
        if mine:
            passed = sum(1 for r in mine if r["status"] == "pass")
            ran = sum(1 for r in mine if r["status"] != "not run")
            lines.append(f"  {kind:<8} {passed}/{ran} passed ({len(mine)} planned)")
    bad = [(j, r) for j, r in rows if r["status"] in ("FAIL", "error")]
    if bad:
        lines.append(f"failures ({len(bad)}; first 25):")
        for j, r in bad[:25]:
            errs = ", ".join(f"{m} {e:.2e} (torch {r['torch_errors'][m]:.2e})" for m, e in r.get("errors", {}).items())
            lines.append(f"  {j.label}: {r['status']} {r.get('error', '')} {errs}".rstrip())
    timed = sorted((r.get("seconds", 0), j.label) for j, r in rows if r["status"] != "not run")
    if timed:
        total = sum(s for s, _ in timed)
        slow = ", ".join(f"{label} {s:.1f} s" for s, label in timed[-3:][::-1])
        lines.append(f"job time: {total:.0f} s summed over the shards; slowest: {slow}")
    return "\n".join(lines) + "\n", verdict


# -- command line -----------------------------------------------------------------------------------
def shard_spec(text: str) -> tuple[int, int]:
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/K, e.g. 0/12") from None
    if k < 1 or not 0 <= i < k:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= i < K")
    return i, k


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_out_arg(p, "benchmarks/out/gate", "result")
    p.add_argument("--parallel", type=int, default=1, help="shard processes to start, then merge (default 1)")
    p.add_argument("--shard", type=shard_spec, help="run one shard, i/K, in this process (no merge)")
    p.add_argument("--merge", action="store_true", help="only merge <out>/gate-*.jsonl into gate.csv and the summary")
    p.add_argument("--time-limit", type=float, default=0, help="seconds for the whole gate (default: no limit)")
    p.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)  # epoch seconds, for the shards
    all_cases = sorted({c.name for c in GPU_CASES + CPU_CASES})
    p.add_argument(
        "--cases", type=harness.choice_list(all_cases), help=f"a subset of the cases: {', '.join(all_cases)}"
    )
    p.add_argument("--kernels", type=harness.choice_list(KERNELS), help="a subset of fwd,bwd,dkdv,dq (default all)")
    p.add_argument("--head-dims", type=harness.int_list, help="default 128,64 (CPU 32)")
    p.add_argument("--max-configs", type=int, help="first M listed tiles per kernel (default all; CPU 1)")
    p.add_argument(
        "--skip", type=harness.choice_list(("probe", "ce", "auto")), default=[], help="skip probe, ce and/or auto jobs"
    )
    harness.add_device_arg(p)
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    harness.catch_interrupts()
    args = parse_args(argv)
    if args.merge:
        return 1 if merge(args.out) == "FAIL" else 0
    device = harness.pick_device(args.device)
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before lmforge's kernels (and their @triton.jit) are imported
    try:
        if args.shard is not None:
            return run_shard(args, device)
        if args.parallel == 1:  # in this process: shard 0 of 1, then the merge
            args.out.mkdir(parents=True, exist_ok=True)
            for old in args.out.glob("gate-*.jsonl"):
                old.unlink()
            args.shard = (0, 1)
            args.deadline = time.time() + args.time_limit if args.time_limit else 0.0
            code = run_shard(args, device)
            verdict = merge(args.out)
            return code or (1 if verdict == "FAIL" else 0)
        return run_parallel(args, device)
    except KeyboardInterrupt:
        print("gate: interrupted", flush=True)
        with contextlib.suppress(Exception):
            merge(args.out)
        return 130


if __name__ == "__main__":
    sys.exit(main())
