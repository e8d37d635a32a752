"""The training step as the engines see it: meta-device initialisation, exact loss under accumulation and
across ranks, exact resume after kill -9, DDP and FSDP2 over 2 gloo processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import engine_runs as E
import pytest
import torch
import torch.nn.functional as F

from lmforge import parallel
from lmforge.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def torchrun(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip
    return proc


# -- built for sharding ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_meta_build_then_materialize_initialises_as_a_direct_build(family):
    extra = {} if family == "gpt2" else dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1)
    config = GPTConfig(vocab_size=128, block_size=32, n_layer=3, n_head=4, n_embd=64, **extra)
    direct = GPT(config)
    torch.manual_seed(7)
    direct.reset_parameters()  # its constructor's init, drawn again from the same seed
    with torch.device("meta"):
        lazy = GPT(config)
    assert all(p.is_meta for p in lazy.parameters())
    torch.manual_seed(7)
    parallel.materialize(lazy, "cpu")
    for (name, a), (_, b) in zip(direct.state_dict().items(), lazy.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(direct.buffers(), lazy.buffers()):  # the rotary tables, not in the state dict
        assert torch.equal(a, b)
    assert lazy.lm_head.weight is lazy.wte.weight or not config.tie_embeddings
    # the statistics of GPT-2's initialisation: N(0, 0.02), residual projections 0.02 / sqrt(2 * n_layer)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in lazy.blocks])
    assert abs(float(proj.std()) - 0.02 / (2 * 3) ** 0.5) < 1e-3
    assert abs(float(lazy.blocks[0].attn.q_proj.weight.std()) - 0.02) < 1e-3


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32)
    plain, checkpointed = GPT(config), GPT(config)
    checkpointed.load_state_dict(plain.state_dict())
    assert parallel.apply_activation_checkpointing(checkpointed, 2) == 2  # blocks 0 and 2
    assert [b.checkpoint for b in checkpointed.blocks] == [True, False, True, False]
    x = torch.randint(0, 64, (2, 16))
    plain(x, x).backward()
    checkpointed(x, x).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())  # names unchanged


def test_bad_engine_settings_are_one_line_errors():
    from lmforge.errors import UserError
    from lmforge.pretrain import PretrainModule

    with pytest.raises(UserError, match="model.compile: unknown key 'bakend'"):
        PretrainModule(GPTConfig(**E.TINY), compile={"bakend": "eager"})
    with pytest.raises(UserError, match="activation_checkpointing"):
        PretrainModule(GPTConfig(**E.TINY), activation_checkpointing=-1)


# -- compile --------------------------------------------------------------------------------------


def test_compiled_training_step_is_one_graph_and_matches_eager(tmp_path):
    """compile: {fullgraph: true} fails on any graph break; the compiled run's weights equal the eager one's."""
    torch._dynamo.reset()
    eager = E.one_step("pretrain", 4, 2)
    module = E.module("pretrain")
    module.hparams.compile = {"backend": "aot_eager", "fullgraph": True}
    torch._dynamo.utils.counters.clear()
    import lightning as L
    from torch.utils.data import DataLoader

    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(E.pretrain_data(), batch_size=4))
    assert parallel.is_compiled(module.model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    compiled = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    assert list(compiled) == list(eager)  # nn.Module.compile: no _orig_mod. prefix in checkpoints
    torch._dynamo.reset()


# -- exact loss -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(E.save_base(tmp_path_factory.mktemp("base") / "base.ckpt"))


def _reference_step(kind: str, base: str | None) -> dict[str, torch.Tensor]:
    """The same step by hand: SGD on the mean loss over every target of the 8 examples at once."""
    from torch.utils.data import default_collate

    module = E.module(kind, base)
    if kind == "pretrain":
        parallel.materialize(module.model, "cpu")
    batch = (E.collate(kind) or default_collate)([E.data(kind)[i] for i in range(E.EXAMPLES)])
    if kind == "pretrain":
        loss = module.model(batch[0], batch[1])
    elif kind == "sft":
        loss = module.model(batch["input_ids"], batch["labels"])
    elif kind == "preference":  # the mean DPO loss over all 8 pairs, against the frozen base
        loss = module._pair_losses(batch, "train")["loss"].mean()
    else:
        module.setup("fit")
        loss = F.cross_entropy(module(batch["input_ids"], batch["attention_mask"]).float(), batch["labels"])
    loss.backward()
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= E.SGD["lr"] * p.grad
    return {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("kind", ["pretrain", "sft", "classify", "preference"])
def test_one_step_is_the_same_for_one_batch_accumulation_and_two_ranks(kind, base, tmp_path):
    """Batch 8; batch 2 accumulated 4 times; 2 gloo processes of batch 4: the same update, that of the
    mean over all targets (SFT's completions are 1 to 15 tokens long, so a mean of micro-batch means
    would weigh them differently)."""
    b = None if kind == "pretrain" else base
    want = _reference_step(kind, b)
    one = E.one_step(kind, 8, 1, b)
    accumulated = E.one_step(kind, 2, 4, b)
    proc = torchrun(
        str(TESTS / "engine_runs.py"), "one_step", kind, "4", "1", str(tmp_path / "ddp.pt"), *([b] if b else [])
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, got in (("one batch", one), ("accumulated", accumulated), ("ddp", ddp)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=2e-7, msg=f"{name}: {k}")


# -- exact resume ---------------------------------------------------------------------------------

RUNS = {
    "pretrain": [
        "-c", str(ROOT / "configs/gpt-tiny.yaml"), "--data.dataset.size_bytes", "200000", "--data.batch_size", "4",
        "--data.seq_len", "32", "--model.config.block_size", "32", "--model.config.dropout", "0.1",
    ],
    "sft": ["-c", str(ROOT / "configs/finetune-sft.yaml"), "--data.batch_size", "2"],
    "classify": ["-c", str(ROOT / "configs/finetune-classify.yaml"), "--data.batch_size", "2"],
    "preference": ["-c", str(ROOT / "configs/finetune-dpo.yaml"), "--data.batch_size", "2"],
}  # fmt: skip
COMMON = ["--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "2",
          "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "4",
          "--trainer.enable_progress_bar", "false", "--trainer.accumulate_grad_batches", "2"]  # fmt: skip


def _fit(run_dir: Path, kind: str, *extra: str, base: str | None = None, launcher: list[str] | None = None):
    env = {**os.environ, "PYTHONPATH": str(TESTS), "LMFORGE_CACHE": str(run_dir.parent / "cache")}
    args = [*RUNS[kind], *COMMON, "--trainer.default_root_dir", str(run_dir), *extra]
    if base is not None:
        args += ["--model.base", base]
    command = launcher or [sys.executable, "-m", "lmforge"]
    return subprocess.run([*command, "fit", *args], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)  # fmt: skip


def _losses(run_dir: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("train/loss"):
                out[int(row["step"])] = row["train/loss"]  # the text as written: bit-identical or not
    return out


def _killed_and_resumed(tmp_path: Path, kind: str, workers: int, base: str | None, launcher=None) -> dict[int, str]:
    run = tmp_path / f"{kind}-w{workers}"
    killed = _fit(run, kind, "--data.num_workers", str(workers), "--trainer.callbacks+=engine_runs.KillAt",
                  "--trainer.callbacks.step", "10", base=base, launcher=launcher)  # fmt: skip
    assert killed.returncode != 0, killed.stdout[-2000:]  # SIGKILL: no handler, no final checkpoint
    assert (run / "checkpoints" / "last.ckpt").exists()
    resumed = _fit(run, kind, "--data.num_workers", str(workers), "--ckpt_path", "last", base=base, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return _losses(run)


def _sft_base(tmp_path: Path) -> str:
    return str(E.save_base(tmp_path / "base.ckpt", block_size=128))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "sft", "classify", "preference"])
def test_kill_9_and_resume_logs_the_uninterrupted_losses(kind, tmp_path):
    """Killed after step 10 (last checkpoint at step 8), resumed with --ckpt_path last: from step 9 on the
    per-step training losses equal the uninterrupted run's, as text, with 0 and 2 loader workers
    (pretraining with dropout, so the random state matters too)."""
    base = None if kind == "pretrain" else _sft_base(tmp_path)
    full = _fit(tmp_path / f"{kind}-full", kind, "--data.num_workers", "0", base=base)
    assert full.returncode == 0, full.stderr[-4000:]
    want = _losses(tmp_path / f"{kind}-full")
    assert sorted(want) == list(range(12))
    for workers in (0, 2):
        got = _killed_and_resumed(tmp_path, kind, workers, base)
        assert {s: got[s] for s in range(8, 12)} == {s: want[s] for s in range(8, 12)}, workers


@pytest.mark.slow
def test_ddp_two_processes_resume_exactly_after_kill_9(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "lmforge"]  # fmt: skip
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    full = _fit(tmp_path / "pretrain-full", "pretrain", "--data.num_workers", "0", *ddp, launcher=launcher)
    assert full.returncode == 0, full.stderr[-4000:]
    want = _losses(tmp_path / "pretrain-full")
    run = tmp_path / "pretrain-w0"
    killed = _fit(run, "pretrain", "--data.num_workers", "0", *ddp, "--trainer.callbacks+=engine_runs.KillAt",
                  "--trainer.callbacks.step", "10", launcher=launcher)  # fmt: skip
    assert killed.returncode != 0
    resumed = _fit(run, "pretrain", "--data.num_workers", "0", *ddp, "--ckpt_path", "last", launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    got = _losses(run)
    assert {s: got[s] for s in range(8, 12)} == {s: want[s] for s in range(8, 12)}


# -- FSDP2 ----------------------------------------------------------------------------------------


def test_fsdp2_shards_initialise_like_one_model(tmp_path):
    """Built on meta, sharded over 2 ranks, then initialised: no shard repeats another, GPT-2's statistics
    hold for the whole tensors, and the tied embedding stays one tensor."""
    proc = torchrun(str(TESTS / "engine_runs.py"), "fsdp2_init", str(tmp_path / "init.pt"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = torch.load(tmp_path / "init.pt", weights_only=True)
    assert bool(state.pop("tied"))
    wte, q = state["wte.weight"], state["blocks.0.attn.q_proj.weight"]
    half = wte.size(0) // 2
    assert not torch.equal(wte[:half], wte[half:]) and not torch.equal(q[: q.size(0) // 2], q[q.size(0) // 2 :])
    assert abs(float(wte.std()) - 0.02) < 1.5e-3 and abs(float(q.std()) - 0.02) < 2e-3
    assert torch.equal(state["blocks.0.ln_1.weight"], torch.ones_like(state["blocks.0.ln_1.weight"]))


def test_fsdp2_step_equals_ddp_step(base, tmp_path):
    """The same SFT step (ragged completions) over 2 gloo ranks: FSDP2 (sharded weights, reduce-scatter of
    gradients) gives DDP's update."""
    results = {}
    for strategy in ("fsdp2", "ddp"):
        out = tmp_path / f"{strategy}.pt"
        proc = torchrun(str(TESTS / "engine_runs.py"), "one_step", "sft", "4", "1", str(out), base,
                        env={"ENGINE_STRATEGY": strategy})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[strategy] = torch.load(out, weights_only=True)
    assert set(results["fsdp2"]) == set(results["ddp"])
    for k, v in results["ddp"].items():
        torch.testing.assert_close(results["fsdp2"][k], v, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.slow
def test_fsdp2_trains_saves_sharded_resumes_and_exports(tmp_path):
    from lmforge.checkpoint import is_sharded, load_checkpoint

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "lmforge"]  # fmt: skip
    fsdp = ["--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--data.num_workers", "0"]  # fmt: skip
    run = tmp_path / "fsdp2"
    first = _fit(run, "pretrain", *fsdp, "--trainer.max_steps", "8", launcher=launcher)
    assert first.returncode == 0, first.stderr[-4000:]
    last = run / "checkpoints" / "last.ckpt"
    assert is_sharded(last) and len(list(last.glob("*.distcp"))) == 2
    assert not list(last.parent.glob(".*lmtmp*"))  # the staging folder was swapped in
    resumed = _fit(run, "pretrain", *fsdp, "--ckpt_path", "last", launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    losses = _losses(run)
    assert sorted(losses) == list(range(12)) and float(losses[11]) < float(losses[0])
    ckpt = load_checkpoint(last)
    assert ckpt.global_step == 12
    out = tmp_path / "exported"
    export = subprocess.run([sys.executable, "-m", "lmforge", "export", str(last), "--to", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stderr
    from lmforge.checkpoint import load_base

    exported, _, _ = load_base(str(out))
    assert ckpt.state and set(ckpt.state) <= set(exported.state_dict())
    for k, v in ckpt.state.items():  # the gathered shards are the exported weights
        assert torch.equal(exported.state_dict()[k], v.to(exported.state_dict()[k].dtype)), k
    from lmforge.checkpoint import CheckpointError, torch_load

    shard = sorted(last.glob("*.distcp"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])  # a shard cut short
    with pytest.raises(CheckpointError, match="missing or damaged shard .*EOFError"):
        torch_load(last)


def test_a_sharded_checkpoint_whose_index_would_run_code_is_refused(tmp_path):
    import pickle

    from lmforge.checkpoint import CheckpointError, torch_load

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"global_step": 1}, folder / "meta.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refused.*run code"):
        torch_load(folder)


# -- the schedule on resume ---------------------------------------------------------------------------


def _fit_steps(tmp_path, max_steps: int, scheduler: dict, ckpt: str | None = None):
    import lightning as L
    from torch.utils.data import DataLoader

    from lmforge.model import GPTConfig
    from lmforge.pretrain import PretrainModule

    torch.manual_seed(0)
    module = PretrainModule(GPTConfig(**E.TINY), optimizer={"name": "adamw", "lr": 1e-2}, scheduler=scheduler)
    lrs: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Spy()])  # fmt: skip
    trainer.fit(module, DataLoader(E.pretrain_data(), batch_size=1), ckpt_path=ckpt)
    return trainer, lrs


def test_resuming_with_more_steps_says_how_the_rate_moves_and_decay_steps_keeps_it(tmp_path, capsys):
    cosine = {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}
    trainer, planned = _fit_steps(tmp_path, 8, cosine)  # one epoch of 8 batches
    trainer.save_checkpoint(tmp_path / "s8.ckpt")
    capsys.readouterr()
    _, stretched = _fit_steps(tmp_path, 16, cosine, str(tmp_path / "s8.ckpt"))
    note = capsys.readouterr().out
    assert "trainer.max_steps=16 (checkpoint's run: 8)" in note and "model.scheduler.decay_steps: 8" in note
    assert "the learning rate at this step goes from" in note
    assert stretched[0] > 0.1 * 1e-2 * 1.01  # re-stretched: back above the final rate
    _, kept = _fit_steps(tmp_path, 16, {**cosine, "decay_steps": 8}, str(tmp_path / "s8.ckpt"))
    assert kept == pytest.approx([1e-3] * 8)  # the old schedule ended: its final rate from here on
    assert "decay_steps fix it" in capsys.readouterr().out
