"""What a hostile file, a full disk, a kill or a typo does: no code runs from a checkpoint, no half-written
file under a final name, one line for every bad input, a saved checkpoint at every interrupt."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import atomic
from lmforge.checkpoint import load_checkpoint, previous_good, torch_load
from lmforge.errors import CheckpointError, UserError
from lmforge.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "gpt-tiny.yaml")
FAST = [
    "--data.dataset.size_bytes", "120000", "--model.config.n_layer", "1", "--model.config.n_embd", "64",
    "--model.config.block_size", "64", "--data.seq_len", "64", "--trainer.limit_val_batches", "2",
    "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "run",
]  # fmt: skip


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("lmforge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def tiny_checkpoint(path: Path, step: int = 3) -> Path:
    """A checkpoint in the format lmforge fit writes, without training."""
    config = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)
    model = GPT(config)
    meta = {"version": lmforge.__version__, "model_config": config.to_dict(), "tokenizer": {"type": "bytes"}}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lmforge": meta, "global_step": step, "hyper_parameters": {}}, path)
    return path


class Hostile:
    """Unpickling this runs a shell command: what an attacker's checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    payload = {"state_dict": {}, "lmforge": {"model_config": Hostile(marker)}, "global_step": 1}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


# -- no code runs from a checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_hostile_checkpoint_is_refused_by_the_library(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = hostile_checkpoint(tmp_path / "evil.ckpt", marker, legacy)
    with pytest.raises(CheckpointError, match="refused: loading it would run code.*system"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        torch_load(path, mmap=True)
    assert not marker.exists()
    # the trust check itself: an unrestricted load of the same file does run the command
    torch.load(path, weights_only=False)
    assert marker.exists()


def _hostile_commands(tmp_path: Path) -> dict[str, list[str]]:
    (tmp_path / "texts.txt").write_text("The brave fox follows the lantern.\n")
    sft = str(ROOT / "configs" / "finetune-sft.yaml")
    data = ["--data.train", str(ROOT / "configs" / "data" / "sft-train.jsonl")]
    return {
        "export": ["export", "evil.ckpt", "--to", "out", "--format", "hf"],
        "generate": ["generate", "evil.ckpt", "--prompt", "The"],
        "evaluate": ["evaluate", "evil.ckpt", "--task", "perplexity", "--data", "texts.txt"],
        "model.base": ["fit", "-c", sft, "--model.base", "evil.ckpt", *data, "--trainer.max_steps", "1"],
        "fit --ckpt_path": ["fit", "-c", TINY, *FAST, "--ckpt_path", "evil.ckpt"],
        "validate --ckpt_path": ["validate", "-c", TINY, *FAST, "--ckpt_path", "evil.ckpt"],
        "test --ckpt_path": ["test", "-c", TINY, *FAST, "--ckpt_path", "evil.ckpt"],
    }


@pytest.mark.parametrize(
    "command",
    ["export", "generate", "evaluate", "model.base", "fit --ckpt_path", "validate --ckpt_path", "test --ckpt_path"],
)
def test_hostile_checkpoint_runs_no_code_on_any_path(run_cli, tmp_path, command):
    marker = tmp_path / "pwned"
    hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    msg = one_line_error(run_cli(*_hostile_commands(tmp_path)[command]))
    assert "evil.ckpt" in msg and "refused" in msg and "would run code" in msg
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# -- one line for every bad checkpoint ------------------------------------------------------------------


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tiny_checkpoint(tmp_path / "good.ckpt")
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "folder.ckpt").mkdir()
    torch.save({"w": torch.zeros(3)}, tmp_path / "plain.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    return {
        "truncated": (tmp_path / "truncated.ckpt", "truncated or corrupt"),
        "random bytes": (tmp_path / "random.ckpt", "not a PyTorch checkpoint"),
        "empty": (tmp_path / "empty.ckpt", "is empty"),
        "a folder": (tmp_path / "folder.ckpt", "is a folder"),
        "plain torch.save dict": (tmp_path / "plain.ckpt", "not a Lightning checkpoint"),
        "plain torch.save tensor": (tmp_path / "tensor.ckpt", "not a Lightning checkpoint"),
        "missing": (tmp_path / "missing.ckpt", "not found"),
    }


def test_bad_checkpoints_are_one_line_errors_in_the_library(tmp_path):
    for name, (path, expected) in _bad_checkpoints(tmp_path).items():
        with pytest.raises(UserError) as err:
            load_checkpoint(path)
        assert expected in str(err.value) and str(path) in str(err.value), name
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["truncated", "random bytes", "a folder", "plain torch.save dict", "missing"])
def test_bad_ckpt_path_is_one_line(run_cli, tmp_path, case):
    path, expected = _bad_checkpoints(tmp_path)[case]
    msg = one_line_error(run_cli("validate", "-c", TINY, *FAST, "--ckpt_path", str(path)))
    assert expected in msg and path.name in msg


def test_previous_good_skips_damaged_and_foreign_files(tmp_path):
    older = tiny_checkpoint(tmp_path / "epoch=0-step=2.ckpt", step=2)
    time.sleep(0.01)
    last = tiny_checkpoint(tmp_path / "last.ckpt", step=4)
    torch.save({"w": 1}, tmp_path / "foreign.ckpt")
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 not really")
    last.write_bytes(last.read_bytes()[:100])
    assert previous_good(last) == older


# -- checkpoints: written atomically, always at the end, and at interrupts ----------------------------------


def test_corrupt_last_checkpoint_offers_the_previous_good_one(run_cli, tmp_path):
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2", check=True)
    folder = tmp_path / "run" / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    msg = one_line_error(run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    assert "last.ckpt is truncated or corrupt" in msg
    assert "--ckpt_path" in msg and "epoch=0-step=4.ckpt" in msg
    # and the offered one resumes
    offered = str(folder / "epoch=0-step=4.ckpt")
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "6", "--ckpt_path", offered, check=True)
    newest = max(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)  # Lightning versions it: last-v1
    assert torch_load(newest)["global_step"] == 6
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "8", "--ckpt_path", "last", check=True)  # the newest


def test_the_end_of_a_run_is_always_saved(run_cli, tmp_path):
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2", check=True)
    assert torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_a_failed_checkpoint_write_leaves_nothing_under_a_final_name(tmp_path):
    """A full disk, simulated by a file-size limit: the write fails midway and leaves no file at all."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    code = f"""
import resource, signal, sys, torch
from lmforge.callbacks import AtomicCheckpointIO
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    AtomicCheckpointIO().save_checkpoint({{"w": torch.zeros(1 << 20)}}, {str(folder / "epoch=0-step=1.ckpt")!r})
except Exception as err:
    print(type(err).__name__, err)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "UserError cannot write" in proc.stdout and "File too large" in proc.stdout
    assert list(folder.iterdir()) == []


def test_fit_on_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(run_cli, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "fit", "-c", TINY, *FAST, "--trainer.max_steps", "2"],
        cwd=tmp_path,
        env={**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        preexec_fn=lambda: (
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
            resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1])),
        ),
    )
    msg = one_line_error(proc)
    assert "cannot write" in msg and ".ckpt" in msg and "File too large" in msg
    folder = tmp_path / "run" / "checkpoints"
    assert not [p for p in folder.iterdir() if p.suffix == ".ckpt" or ".lmtmp-" in p.name]


class _Run:
    """``lmforge fit`` in the background, its output (stdout and stderr together) read by a thread."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        import queue
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "fit", "-c", TINY, *FAST, "--trainer.max_steps", "100000", *extra],
            cwd=tmp_path,
            env={**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        import queue

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if text in line:
                return
        self.proc.kill()
        raise AssertionError(f"never saw {text!r}:\n{''.join(self.output)}")

    def finish(self, timeout: float = 120) -> str:
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupt_saves_says_where_and_exits_non_zero(run_cli, tmp_path, signum):
    run = _Run(tmp_path, "--trainer.accumulate_grad_batches", "2", "--checkpoint.every_n_train_steps", "100000")
    run.wait_for("first training step done")
    time.sleep(1.0)
    run.proc.send_signal(signum)
    err = run.finish()
    assert run.proc.returncode == 128 + signum, err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    name = signal.Signals(signum).name
    assert f"interrupted by {name} at step" in err and str(last) in err and "--ckpt_path last" in err
    ckpt = torch_load(last)
    step = ckpt["global_step"]
    assert step > 0
    # saved at an optimizer step: every micro-batch of the accumulation was applied (the epoch's count restarts
    # each epoch, whose last, odd-numbered batch also steps)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["current"]["processed"] % 2 == 0 or progress["is_last_batch"], progress
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", str(step + 2), "--ckpt_path", "last", check=True)
    assert torch_load(last)["global_step"] == step + 2  # the same last.ckpt, not a last-v1.ckpt beside it
    assert [p.name for p in last.parent.glob("last*.ckpt")] == ["last.ckpt"]


def test_resume_applies_and_reports_changed_settings(run_cli, tmp_path):
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "4", check=True)
    proc = run_cli(
        "fit", "-c", TINY, *FAST, "--trainer.max_steps", "6", "--ckpt_path", "last",
        "--model.optimizer.lr", "1e-5", "--model.scheduler.warmup_steps", "2", check=True,
    )  # fmt: skip
    assert "model.optimizer.lr=1e-05 (checkpoint: 0.003)" in proc.stdout
    assert "model.scheduler.warmup_steps=2 (checkpoint: 30)" in proc.stdout
    ckpt = torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert all(g["initial_lr"] == 1e-5 for g in groups)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-5, 1e-5]
    assert all(g["lr"] <= 1e-5 for g in groups)
    msg = one_line_error(run_cli("fit", "-c", TINY, *FAST, "--ckpt_path", "last", "--model.optimizer", "{name: sgd}"))
    assert "trained with optimizer 'adamw'" in msg


# -- temporaries of killed runs ---------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    stale_dir = tmp_path / f".out.lmtmp-{atomic._HOST}-{dead}-abcd1234"
    (stale_dir / "out").mkdir(parents=True)
    (stale_dir / "out" / "model.safetensors").write_bytes(b"x" * 1000)
    stale_file = tmp_path / f".k.bin.lmtmp-{atomic._HOST}-{dead}-wxyz9876.tmp"
    stale_file.write_bytes(b"y")
    live = tmp_path / f".other.lmtmp-{atomic._HOST}-{os.getppid()}-live0000"  # a running process's
    live.mkdir()
    foreign = tmp_path / f".x.lmtmp-otherhost-{dead}-aaaa0000"  # another machine's: kept until a day old
    foreign.mkdir()
    unrelated = tmp_path / ".gitignore"
    unrelated.write_text("x")
    with atomic.staged_folder(tmp_path / "new") as folder:
        (folder / "f").write_text("done")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and foreign.exists() and unrelated.exists()
    assert (tmp_path / "new" / "f").read_text() == "done"
    old = time.time() - atomic.STALE_AFTER_S - 10
    os.utime(foreign, (old, old))
    atomic.clean_stale(tmp_path)
    assert not foreign.exists() and live.exists()


def test_a_killed_cache_build_leaves_nothing_that_survives_the_next_run(tmp_path):
    cache = tmp_path / "cache"
    args = [*FAST, "--data.dataset.size_bytes", "30000000", "--trainer.max_steps", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "fit", "-c", TINY, *args],
        cwd=tmp_path,
        env={**os.environ, "LMFORGE_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 120
    while not (cache.is_dir() and any(".lmtmp-" in p.name for p in cache.iterdir())):
        assert time.monotonic() < end and proc.poll() is None, "the cache build never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert any(".lmtmp-" in p.name for p in cache.iterdir())
    from lmforge.data.cache import build_token_file
    from lmforge.data.sources import embedded
    from lmforge.tokenizers import ByteTokenizer

    build_token_file(embedded(size_bytes=1000), ByteTokenizer(), cache, progress=False)
    assert not [p for p in cache.iterdir() if ".lmtmp-" in p.name]


def test_exported_and_saved_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.json", "{}")
        with atomic.staged_folder(tmp_path / "folder") as folder:
            (folder / "f.bin").write_bytes(b"1")
            os.chmod(folder / "f.bin", 0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "f.bin").stat().st_mode & 0o777 == 0o644


# -- errors: the user's one line, a bug's traceback ---------------------------------------------------------


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from lmforge import cli, commands

    def broken(argv):
        raise ValueError("an internal invariant broke")  # a ValueError from a bug is not the user's mistake

    monkeypatch.setitem(commands.COMMANDS, "plugins", broken)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plugins"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an internal invariant broke" in err
    assert "internal error" in err and "please report it" in err


def test_classifier_loads_from_its_checkpoint_without_labels(tmp_path):
    from test_finetune import save_base  # noqa: I001 (tests/ is on sys.path)

    import lightning as L

    from lmforge import ClassifierModule
    from lmforge.data.classify import ClassificationDataModule

    save_base(tmp_path / "base.ckpt")
    data = ClassificationDataModule(
        train=str(ROOT / "configs" / "data" / "classify-train.csv"), val=str(ROOT / "configs" / "data" / "classify-val.csv")
    )
    module = ClassifierModule(base=str(tmp_path / "base.ckpt"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=1, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "cls.ckpt")
    loaded = ClassifierModule.load_from_checkpoint(tmp_path / "cls.ckpt")
    assert loaded.labels == module.labels
    torch.testing.assert_close(loaded.score.weight, module.score.weight)


# -- start-up -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["export", "--help"], ["generate", "--help"]])
def test_commands_that_do_not_train_do_not_import_lightning(argv):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['lmforge', *{argv!r}]\n"
        "try:\n    runpy.run_module('lmforge', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('LIGHTNING' if any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules) else 'CLEAN')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "CLEAN", proc.stdout + proc.stderr


@pytest.mark.slow
def test_sigterm_stops_every_ddp_rank_at_the_same_step(tmp_path):
    """Two CPU processes (DDP over gloo): SIGTERM to the launching one stops both at one optimizer step."""
    run = _Run(tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    run.wait_for("first training step done", timeout=180)
    time.sleep(2.0)
    run.proc.send_signal(signal.SIGTERM)
    out = run.finish(timeout=180)
    assert run.proc.returncode == 143, out
    assert out.count("interrupted by SIGTERM at step") == 1, out  # reported once, by rank 0
    step = torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"]
    assert f"at step {step}:" in out
