"""The command line, end to end, in subprocesses: what a user types and sees."""

import csv
import math
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "gpt-tiny.yaml")
# A very small, fast variant of gpt-tiny for the behaviour tests (not the learning test).
FAST = [
    "--data.dataset.size_bytes",
    "120000",
    "--model.config.n_layer",
    "1",
    "--model.config.n_embd",
    "64",
    "--model.config.block_size",
    "64",
    "--data.seq_len",
    "64",
    "--trainer.limit_val_batches",
    "2",
    "--data.num_workers",
    "0",
]


def metrics(run_dir: Path) -> list[dict]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lmforge: error") or "Error" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("lmforge: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_print_config_resolves_interpolation(run_cli):
    proc = run_cli("fit", "-c", TINY, "--model.config.block_size", "96", "--print_config", check=True)
    assert "seq_len: 128" in proc.stdout  # interpolated from the file's model.config.block_size
    assert "block_size: 96" in proc.stdout  # the dotted override wins over the file


def test_missing_config_file(run_cli):
    assert "nope.yaml' not found" in one_line_error(run_cli("fit", "-c", "nope.yaml"))


def test_malformed_config_names_the_line(run_cli, tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  config:\n    n_layer: [\n")
    msg = one_line_error(run_cli("fit", "-c", "bad.yaml"))
    assert "bad.yaml is not valid YAML at line" in msg


def test_unknown_key_suggests_the_closest(run_cli, tmp_path):
    (tmp_path / "typo.yaml").write_text("model:\n  config:\n    n_layr: 3\n")
    msg = one_line_error(run_cli("fit", "-c", "typo.yaml"))
    assert "unknown key 'model.config.n_layr'; did you mean 'model.config.n_layer'?" in msg
    msg = one_line_error(run_cli("fit", "-c", TINY, "--trainer.max_stepz", "3"))
    assert "did you mean 'trainer.max_steps'?" in msg


def test_invalid_values_name_the_key(run_cli):
    assert "model.config.norm='batchnorm'" in one_line_error(
        run_cli("fit", "-c", TINY, "--model.config.norm", "batchnorm")
    )
    assert "n_embd=128 must be a multiple of n_head=5" in one_line_error(
        run_cli("fit", "-c", TINY, "--model.config.n_head", "5")
    )
    assert "config: data.batch_size='abc' must be an integer" in one_line_error(
        run_cli("fit", "-c", TINY, "--data.batch_size", "abc")
    )
    assert "config: data.pipeline='normalize' must be a list; give it in YAML syntax" in one_line_error(
        run_cli("fit", "-c", TINY, "--data.pipeline", "normalize")
    )


def test_corpus_errors_are_one_line(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert "no text found" in one_line_error(
        run_cli("fit", "-c", TINY, *FAST, "--data.dataset", "{name: files, paths: [empty]}")
    )
    (tmp_path / "short.txt").write_text("too short for a window")
    assert "shorter than one training window" in one_line_error(
        run_cli("fit", "-c", TINY, "--data.dataset", "{name: files, paths: [short.txt]}")
    )
    assert "does not exist" in one_line_error(
        run_cli("fit", "-c", TINY, "--data.dataset", "{name: files, paths: [missing/]}")
    )


def test_fit_validate_test_predict_and_files_beside_the_checkpoint(run_cli, tmp_path):
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "12", "--checkpoint.every_n_train_steps", "6", check=True)
    ckpt_dir = tmp_path / "runs/gpt-tiny/checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file()
    assert (ckpt_dir / "tokenizer" / "lmforge_tokenizer.json").is_file()
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12
    assert ckpt["lmforge"]["tokenizer"] == {"type": "bytes"}
    assert ckpt["lmforge"]["model_config"]["n_layer"] == 1
    assert (tmp_path / "runs/gpt-tiny/csv/version_0/metrics.csv").is_file()
    assert list((tmp_path / "runs/gpt-tiny/tensorboard/version_0").glob("events.out.tfevents.*"))

    ckpt_path = str(ckpt_dir / "last.ckpt")
    val = run_cli("validate", "-c", TINY, *FAST, "--ckpt_path", ckpt_path, check=True)
    assert "val/loss" in val.stdout and "val/ppl" in val.stdout
    test = run_cli("test", "-c", TINY, *FAST, "--ckpt_path", ckpt_path, check=True)
    assert "test/loss" in test.stdout
    pred = run_cli(
        "predict",
        "-c",
        TINY,
        *FAST,
        "--ckpt_path",
        ckpt_path,
        "--model.max_new_tokens",
        "20",
        "--data.predict_prompts",
        '["The fox"]',
        check=True,
    )
    assert "The fox" in pred.stdout

    # the built-in safetensors exporter: same weights, same logits, atomic folder
    out = run_cli("export", ckpt_path, "--to", "exported", "--arg", "dtype=float32", check=True)
    assert "exported" in out.stdout
    from lmforge.checkpoint import load_exported, read_checkpoint
    from lmforge.model import GPT

    config, state, _ = read_checkpoint(ckpt_path)
    reference = GPT(config)
    reference.load_state_dict(state)
    model, tokenizer = load_exported(tmp_path / "exported")
    assert tokenizer is not None and tokenizer.vocab_size == 257
    idx = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=0)
    assert "already exists" in one_line_error(run_cli("export", ckpt_path, "--to", "exported"))
    assert "not one of float32" in one_line_error(run_cli("export", ckpt_path, "--to", "x2", "--arg", "dtype=int8"))
    assert not (tmp_path / "x2").exists() and not list(tmp_path.glob(".x2.*"))


def test_resume_continues_step_and_schedule(run_cli, tmp_path):
    common = [
        *FAST,
        "--trainer.val_check_interval",
        "10",
        "--model.scheduler.warmup_steps",
        "5",
        "--model.scheduler.decay_steps",
        "30",
        "--trainer.log_every_n_steps",
        "1",
    ]
    run_cli("fit", "-c", TINY, *common, "--trainer.max_steps", "30", "--trainer.default_root_dir", "full", check=True)
    # the same 30 steps, interrupted after 20 and resumed from last.ckpt
    part = ["--trainer.default_root_dir", "part"]
    run_cli("fit", "-c", TINY, *common, *part, "--trainer.max_steps", "20", check=True)
    proc = run_cli("fit", "-c", TINY, *common, *part, "--trainer.max_steps", "30", "--ckpt_path", "last", check=True)
    assert "Restoring states from the checkpoint" in proc.stdout + proc.stderr
    full = torch.load(tmp_path / "full/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "part/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == full["global_step"] == 30
    assert resumed["lr_schedulers"][0]["last_epoch"] == full["lr_schedulers"][0]["last_epoch"] == 30
    lr = lambda ckpt: ckpt["optimizer_states"][0]["param_groups"][0]["lr"]  # noqa: E731
    assert lr(resumed) == pytest.approx(lr(full), rel=1e-9)
    # the learning rates used by the 10 resumed steps are the full run's last 10, in order
    runs = sorted((tmp_path / "part").glob("csv/version_*/metrics.csv"))
    assert len(runs) == 2
    resumed_lrs = [lr for _, lr in column(metrics(tmp_path / "part"), "train/lr")]
    full_lrs = [lr for _, lr in column(metrics(tmp_path / "full"), "train/lr")]
    assert len(full_lrs) == 30 and len(resumed_lrs) == 10
    assert resumed_lrs == pytest.approx(full_lrs[20:], rel=1e-6)


def test_resume_with_another_model_shape_is_refused(run_cli, tmp_path):
    run_cli("fit", "-c", TINY, *FAST, "--trainer.max_steps", "2", check=True)
    proc = run_cli(
        "fit", "-c", TINY, *FAST, "--model.config.n_layer", "2", "--trainer.max_steps", "4", "--ckpt_path", "last"
    )
    msg = one_line_error(proc)
    assert "model shape differs" in msg and "model.config.n_layer=2 (checkpoint: 1)" in msg


@pytest.mark.slow
def test_gpt_tiny_learns_the_embedded_corpus(run_cli, tmp_path):
    """The main learning check: gpt-tiny, as shipped, gets within 0.2 nats/token of the corpus entropy."""
    from lmforge.data.synthetic import SyntheticGrammar

    proc = run_cli("fit", "-c", TINY, check=True)
    rows = metrics(tmp_path / "runs/gpt-tiny")
    val = column(rows, "val/loss")
    train = column(rows, "train/loss")
    entropy = SyntheticGrammar(seed=0).entropy_nats_per_byte()
    start = train[0][1]
    final = val[-1][1]
    assert start > 4.0  # an untrained model is near uniform over 320 tokens (ln 320 = 5.77)
    assert final < start / 4
    assert final > entropy - 0.02  # nothing beats the entropy (a small slack for a finite sample)
    assert final < entropy + 0.2, f"val loss {final:.3f} vs entropy {entropy:.3f}"
    assert math.isclose(
        float(rows[-1]["val/gap_to_entropy"] or column(rows, "val/gap_to_entropy")[-1][1]),
        final - entropy,
        abs_tol=1e-4,
    )
    assert "first training step done" in proc.stdout
