"""``torch.compile`` captures lmforge's whole training step (GPT forward, loss, backward) as one graph.

* On the CPU torch path (``attention``/``loss`` ``auto`` and ``torch``, no ``TRITON_INTERPRET``), with
  padding masks, packed documents (segment ids and position ids), ``reduction="sum"`` and GQA: one
  graph under ``fullgraph=True``, and the compiled loss and every parameter gradient equal eager's.
* With the Triton kernels (``attention="triton", loss="triton"``, under the Triton interpreter on CPU):
  the same, with the kernels in the graph as the opaque custom ops ``lmforge::flash_attn_fwd``,
  ``lmforge::flash_attn_bwd`` and ``lmforge::linear_ce_fwd``; the ops pass ``torch.library.opcheck``.
* ``auto``'s fallback for a kernel that cannot be built here works inside a compiled graph, and the
  once-only "why the kernel is not used" log lines are still logged, once, when the graph is traced.

Graphs are counted by a backend that records what dynamo hands it (aot_eager underneath). Under the
interpreter the shapes are tiny (B=2, T=32, head dim 16, vocab 320): it runs every kernel in Python.
"""

from __future__ import annotations

import logging
import os

import torch

if not torch.cuda.is_available():  # must precede the import of the kernel modules (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lmforge.kernels  # noqa: E402
import lmforge.kernels.attention as attention_kernels  # noqa: E402
import lmforge.kernels.cross_entropy as ce_kernels  # noqa: E402
import lmforge.kernels.linear_cross_entropy as lce_kernels  # noqa: E402
import pytest  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from lmforge.kernels import sdpa  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from lmforge import ops  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default"}  # .item(), int(t), bool(t): a host sync


@pytest.fixture(autouse=True)
def _fresh_compiler(monkeypatch):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(ops, "_told", set())
    monkeypatch.setattr(lmforge.kernels, "_failures", {})
    yield
    torch._dynamo.reset()


class Recorder:
    """A torch.compile backend: aot_eager, keeping dynamo's graphs and AOT's forward/backward graphs."""

    def __init__(self):
        self.dynamo_graphs, self.aot_graphs = [], []

        def keep(gm, example_inputs):
            self.aot_graphs.append(gm)
            return make_boxed_func(gm.forward)

        self._aot = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def __call__(self, gm, example_inputs):
        self.dynamo_graphs.append(gm)
        return self._aot(gm, example_inputs)

    def targets(self) -> set[str]:
        return {str(n.target) for gm in self.aot_graphs for n in gm.graph.nodes if n.op == "call_function"}


def _step(run, model, idx, targets, **kwargs):
    """(loss, {name: grad}) of one training step of ``model`` through ``run`` (it, or it compiled)."""
    model.zero_grad(set_to_none=True)
    loss = run(idx, targets, **kwargs)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _compare(model, idx, targets, *, rtol=1e-5, atol=1e-6, **kwargs) -> Recorder:
    """Eager and compiled (fullgraph, one graph) steps agree on the loss and every gradient."""
    want_loss, want_grads = _step(model, model, idx, targets, **kwargs)
    recorder = Recorder()
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    got_loss, got_grads = _step(compiled, model, idx, targets, **kwargs)
    assert len(recorder.dynamo_graphs) == 1, f"{len(recorder.dynamo_graphs)} graphs: the step was split"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(recorder.aot_graphs) == 2, "expected one forward and one backward graph"
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=atol)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    syncs = recorder.targets() & SYNC_OPS
    assert not syncs, f"host synchronisation in the compiled step: {syncs}"
    return recorder


def _batch(B, T, vocab, *, seed, padding=False, packed=False):
    """(idx, targets, kwargs): random tokens; with padding a left-padded row (its targets ignored),
    packed: two documents in row 0 (segment ids, positions restarting at 0)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    kwargs = {}
    if padding:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, : T // 4] = False
        targets[~mask] = -100
        kwargs["key_padding_mask"] = mask
    if packed:
        split = T // 3
        seg = torch.zeros(B, T, dtype=torch.long)
        seg[0, split:] = 1
        pos = torch.arange(T).repeat(B, 1)
        pos[0, split:] -= split
        targets[0, split - 1] = -100  # no target across the document boundary
        kwargs.update(segment_ids=seg, position_ids=pos)
    return idx.to(DEVICE), targets.to(DEVICE), {k: v.to(DEVICE) for k, v in kwargs.items()}


CPU_CASES = {
    "auto": (dict(), dict()),
    "auto-gqa-padding": (dict(n_kv_head=2, pos_encoding="rope", norm="rmsnorm", mlp="swiglu"), dict(padding=True)),
    "auto-packed-sum": (dict(n_kv_head=1, pos_encoding="rope"), dict(packed=True, reduction="sum")),
    "torch-packed-padding": (dict(pos_encoding="rope"), dict(packed=True, padding=True)),
    "torch-gqa-sum": (dict(n_kv_head=2), dict(reduction="sum")),
}


@pytest.mark.parametrize("case", CPU_CASES)
def test_cpu_step_is_one_graph_and_matches_eager(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    overrides, batch = CPU_CASES[case]
    batch = dict(batch)
    backend = case.split("-")[0]
    reduction = batch.pop("reduction", "mean")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64, attention=backend,
                       loss=backend, **overrides)  # fmt: skip
    model = GPT(config)
    idx, targets, kwargs = _batch(2, 64, 320, seed=1, **batch)
    _compare(model, idx, targets, reduction=reduction, **kwargs)


def test_repro_from_the_issue_has_no_graph_break(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64))
    idx, targets, _ = _batch(2, 64, 320, seed=2)
    explained = torch._dynamo.explain(model)(idx, targets)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_dispatch_reasons_are_logged_once_under_compile(monkeypatch, caplog):
    """Why the kernels are not used is logged when the graph is traced (not from inside it), once."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx, targets, _ = _batch(2, 32, 320, seed=3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with caplog.at_level(logging.INFO, logger="lmforge.ops"):
        for _ in range(2):
            compiled(idx, targets).backward()
        model(idx, targets).backward()  # eager: already told
    told = [r.getMessage() for r in caplog.records if r.name == "lmforge.ops"]
    assert len(told) == 2, told
    assert any(m.startswith("attention: using torch") and "not CUDA" in m for m in told), told
    assert any(m.startswith("loss: chunked torch") for m in told), told


def test_eager_still_logs_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GPT(GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx, targets, _ = _batch(2, 32, 320, seed=3)
    with caplog.at_level(logging.INFO, logger="lmforge.ops"):
        for _ in range(2):
            model(idx, targets)
    assert len([r for r in caplog.records if r.name == "lmforge.ops"]) == 2


# --------------------------------------------------------------------------------------------------
# the Triton kernels in the graph (the interpreter on CPU)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masks", ["plain", "padding+packed"])
def test_kernel_step_is_one_graph_and_matches_eager(masks):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                       pos_encoding="rope", attention="triton", loss="triton")  # fmt: skip
    model = GPT(config).to(DEVICE)
    idx, targets, kwargs = _batch(2, 32, 320, seed=4, padding=masks != "plain", packed=masks != "plain")
    recorder = _compare(model, idx, targets, rtol=1e-5, atol=1e-5, **kwargs)
    targets_seen = recorder.targets()
    for op in ("lmforge.flash_attn_fwd.default", "lmforge.flash_attn_bwd.default", "lmforge.linear_ce_fwd.default"):
        assert op in targets_seen, f"{op} is not in the compiled graphs"


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (what .item(), int(t), bool(t) call)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_eager_step_has_no_host_sync(backend, monkeypatch):
    """lmforge's own code around the kernels reads no device value back per step (the mean's count of
    counted targets stays a tensor); what runs inside the custom ops is the kernels' launches. The
    targets' range check, which reads them back, is off as in the training tasks (they check each
    batch on the host before it moves to the device: tests/test_target_check.py)."""
    if backend == "auto":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                       attention=backend, loss=backend)  # fmt: skip
    model = GPT(config).to(DEVICE)
    idx, targets, kwargs = _batch(2, 32, 320, seed=7, padding=True, packed=True)
    with _HostSyncs() as probe:
        model(idx, targets, check_targets=False, **kwargs).backward()
    assert not probe.seen, probe.seen


def test_custom_ops_pass_opcheck():
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration and AOT tracing of
    every op agree with what it computes (``torch.library.opcheck``), optional masks given or None."""
    g = torch.Generator().manual_seed(5)
    B, H, H_kv, N, D = 2, 2, 1, 16, 16
    q = torch.randn(B, H, N, D, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, H_kv, N, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[1, :5] = False
    seg = torch.tensor([[0] * 6 + [1] * 10, [0] * 16], device=DEVICE)
    kpm, seg, bounds = attention_kernels._masks(q, mask, seg)
    torch.library.opcheck(attention_kernels.flash_attn_fwd, (q, k, v, kpm, seg, bounds, True, 0.25, False))
    plain = [t.detach() for t in (q, k, v)]
    out, lse = attention_kernels.flash_attn_fwd(*plain, None, None, None, False, 0.3, True)
    bwd_args = (torch.randn_like(out), *plain, out, lse, None, None, None, False, 0.3, True)
    torch.library.opcheck(attention_kernels.flash_attn_bwd, bwd_args)
    h = torch.randn(24, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(50, 16, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 50, (24,), generator=g).to(DEVICE)
    t[3] = -100
    lce_args = (h, w, t, -100, 0.0, 0.0, None, 8, torch.float32, True, True, False)
    torch.library.opcheck(lce_kernels.linear_ce_fwd, lce_args)
    logits = torch.randn(6, 50, generator=g).to(DEVICE)
    torch.library.opcheck(ce_kernels.cross_entropy_rows, (logits, t[:6], -100, 0.1, 0.0, 30.0))


@pytest.mark.parametrize("broken", ["forward", "backward"])
def test_fallback_inside_a_compiled_graph(broken, monkeypatch, caplog):
    """A kernel that cannot be built here (simulated: the launcher raises Triton's OutOfResources) does
    not stop a compiled step under ``backward_fallback=True`` / ``fallback=True`` (what ``auto`` passes
    when compiling): the ops compute through torch, warn once, and the step matches torch's. With the
    attention forward broken, the backward of that case goes to torch without trying its kernel."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise OutOfResources(300_000, 232_448, "shared memory")

    if broken == "forward":
        monkeypatch.setattr(attention_kernels, "_forward", fail)
    monkeypatch.setattr(attention_kernels, "_backward", fail)
    monkeypatch.setattr(lmforge.kernels, "_failures", {})
    monkeypatch.setattr(attention_kernels, "_fallback_warned", False)
    monkeypatch.setattr(ce_kernels, "ce_rows_", fail)
    g = torch.Generator().manual_seed(6)
    B, H, H_kv, N, D, V = 2, 4, 2, 12, 16, 40
    q = torch.randn(B, H, N, D, generator=g)
    k, v = torch.randn(B, H_kv, N, D, generator=g), torch.randn(B, H_kv, N, D, generator=g)
    w = torch.randn(V, H * D, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :3] = False
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    targets = torch.randint(0, V, (B * N,), generator=g)

    def step(attend, loss_fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
        y = attend(*leaves[:3], causal=True, key_padding_mask=mask, segment_ids=seg)
        loss = loss_fn(y.transpose(1, 2).reshape(B * N, H * D), leaves[3], targets)
        return (loss, *torch.autograd.grad(loss, leaves))

    def kernels(q, k, v, w):
        y = attention_kernels.flash_attention(q, k, v, causal=True, key_padding_mask=mask, segment_ids=seg,
                                              backward_fallback=True)  # fmt: skip
        return lce_kernels.linear_cross_entropy(y.transpose(1, 2).reshape(B * N, H * D), w, targets,
                                                use_triton=True, fallback=True)  # fmt: skip

    want = step(sdpa, lambda h, w, t: lce_kernels.linear_cross_entropy(h, w, t))
    recorder = Recorder()
    compiled = torch.compile(kernels, fullgraph=True, backend=recorder)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
            loss = compiled(*leaves)
            got = (loss, *torch.autograd.grad(loss, leaves))
            for name, a, b in zip(("loss", "dq", "dk", "dv", "dw"), got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert len(recorder.dynamo_graphs) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # the attention's broken kernel and the loss rows: once each
    assert all("OutOfResources" in m for m in warnings), warnings
    assert any(f"Triton {broken}" in m for m in warnings), warnings
    assert len(calls) == 2, "a kernel that failed to build was tried again"
