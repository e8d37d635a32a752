"""``lmforge estimate`` against reality: the real tensors' sizes, torch's FLOP counter, a measured CPU training run,
and the published record of three large runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import estimate as est
from lmforge import plugins
from lmforge.cli import main
from lmforge.lightning_cli import parse_fit_config
from lmforge.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "gpt-tiny.yaml")
SMALL = GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=4, n_embd=64)


def _items(result: dict) -> dict[str, int]:
    return {i["name"]: i["bytes"] for i in result["memory"]["items"]}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(
    "optimizer,precision",
    [
        ({"name": "adamw", "lr": 1e-3}, "32-true"),
        ({"name": "adamw", "lr": 1e-3}, "bf16-true"),
        ({"name": "adam", "lr": 1e-3}, "32-true"),
        ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, "32-true"),
        ({"name": "muon"}, "32-true"),
    ],
)
@pytest.mark.parametrize("config", [SMALL, GPTConfig(**{**SMALL.to_dict(), "pos_encoding": "rope", "norm": "rmsnorm",
                                                        "mlp": "swiglu", "bias": False, "tie_embeddings": False,
                                                        "n_kv_head": 2})])  # fmt: skip
def test_weight_gradient_and_optimizer_bytes_are_the_real_tensors(config, optimizer, precision):
    """Weights, gradients and optimizer states equal, byte for byte, the tensors of a real model and its optimizer
    after one step (tied weights once; AdamW's step counters included)."""
    torch.manual_seed(0)
    model = GPT(config)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    opt = plugins.build("optimizer", optimizer, model)
    x = torch.randint(0, config.vocab_size, (2, config.block_size))
    model(x, x).float().backward()
    opt.step()
    inner = [opt.muon, opt.adamw] if optimizer["name"] == "muon" else [opt]
    states = [v for o in inner for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    run = est.Run(model_config=config, precision=precision, optimizer=optimizer, batch_size=2, seq_len=32)
    items = _items(est.estimate(run, gpu_name="cpu"))
    assert items["weights"] == _tensor_bytes(model.parameters())
    assert items["gradients"] == _tensor_bytes(p.grad for p in model.parameters())
    assert items["optimizer states"] == _tensor_bytes(states)


def test_lora_trainable_and_frozen_counts(tmp_path):
    """Through the CLI on finetune-lora with a Hugging Face base folder (its config.json only): the counts are those
    of the real model with LoRA applied."""
    from lmforge import lora
    from lmforge.hf import config_to_hf

    base = GPTConfig(vocab_size=320, block_size=128, n_layer=2, n_head=4, n_embd=128)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(base)))
    real = GPT(base)
    lora.apply_lora(real, 8, 16, 0.05, ["q_proj", "k_proj", "v_proj", "c_fc"])
    trainable, total = lora.count_parameters(real)
    out = _cli(["estimate", "-c", str(ROOT / "configs/finetune-lora.yaml"), "--model.init_args.base", str(tmp_path),
                "--gpu", "cpu", "--json"])  # fmt: skip
    params = json.loads(out)["parameters"]
    assert (params["trainable"], params["total"]) == (trainable, total)
    assert params["frozen"] == total - trainable > 0
    assert 0 < trainable < total / 5


def test_missing_base_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", "-c", str(ROOT / "configs/finetune-sft.yaml"), "--model.init_args.base", "runs/nothing.ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.base='runs/nothing.ckpt' does not exist" in err


@pytest.mark.parametrize("kw", [{}, {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                                     "tie_embeddings": False, "n_kv_head": 2}])  # fmt: skip
def test_flops_agree_with_torch_flop_counter(kw):
    """Forward + backward of a small GPT under torch.utils.flop_counter.FlopCounterMode. SDPA runs its math
    backend (the counter has no formula for the CPU flash kernel) and the loss is ``torch`` (the counter misses the
    chunked loss's ``out=`` products): the counter then sees every product. Measured: the two agree exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = GPTConfig(vocab_size=512, block_size=64, n_layer=3, n_head=4, n_embd=128, attention="torch",
                       loss="torch", **kw)  # fmt: skip
    model, (B, T) = GPT(config), (4, 64)
    x = torch.randint(0, 512, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    run = est.Run(model_config=config, batch_size=B, seq_len=T)
    estimated = est.flops_per_token(run, est.count_tensors(run))["total"] * B * T
    assert estimated == pytest.approx(counter.get_total_flops(), rel=0.05)


MEASURE = r"""
import ctypes, json, re, sys
import torch
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: blocks of 64 KiB and more are mmapped, so freeing returns them
libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
from lmforge import estimate as est, plugins
from lmforge.families import build_model
from lmforge.lightning_cli import parse_fit_config
run = est.run_from_config(*parse_fit_config(["-c", sys.argv[1]]), "gpt-tiny")
torch.manual_seed(0)
model = build_model(run.model_config)
opt = plugins.build("optimizer", run.optimizer, model)
B, T, V = run.batch_size, run.seq_len, run.model_config.vocab_size

def step():
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    loss = model(x, y, reduction="sum")
    (loss / y.numel()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

step(); step()  # optimizer states exist, kernels are warm
rises = []
for _ in range(3):
    libc.malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident size
    before = status("VmRSS")
    step()
    rises.append(status("VmHWM") - before)
saved = {}
def pack(t):
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
x = torch.randint(0, V, (B, T))
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = model(x, x, reduction="sum")
weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
static = sum(p.numel() * p.element_size() for p in model.parameters())
static += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
print(json.dumps({"rise": min(rises), "static": static,
                  "saved": sum(n for k, n in saved.items() if k not in weights)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_against_a_measured_cpu_training_run():
    """gpt-tiny's training step (its config: batch 16 x 128, AdamW, 32-true on CPU, the chunked loss) measured in a
    fresh process.

    What is measured: the peak resident memory of the process during a training step (Linux's VmHWM, reset just
    before the step) above what it held before it, with glibc told to mmap every block of 64 KiB or more so that
    freed tensors leave the resident set; plus the weights and optimizer states held across steps (their real
    tensors' bytes). This is the CPU's counterpart of ``torch.cuda.max_memory_allocated`` (it includes the
    allocator's own overhead, and nothing of the interpreter, which is resident before the step). Separately, the
    bytes autograd saves for the backward (``saved_tensors_hooks``, distinct storages, weights left out) against
    the activation items. Measured on the 2-core CI machine: peak 47.8 MB measured vs 47.7 MB estimated; saved
    35.98 MB vs 35.97 MB."""
    out = subprocess.run([sys.executable, "-c", MEASURE, TINY], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    run = est.run_from_config(*parse_fit_config(["-c", TINY]), "gpt-tiny")
    result = est.estimate(run, gpu_name="cpu")
    items = _items(result)
    assert result["memory"]["precision"] == "32-true"
    saved = sum(n for name, n in items.items() if name.startswith(("activations", "loss: saved")))
    assert saved == pytest.approx(measured["saved"], rel=0.10)
    assert result["memory"]["peak_bytes"] == pytest.approx(measured["static"] + measured["rise"], rel=0.25)


# The published record (the figures the presets are checked against):
# - GPT-3 175B: 10,000 V100 for 14.8 days (3,552,000 GPU-hours), 1,287 MWh, 552 t CO2eq
#   (Patterson et al. 2021, "Carbon Emissions and Large Neural Network Training", Table 4).
# - Llama 2 70B: 1,720,320 A100-80GB GPU-hours at 400 W (688 MWh), 291.42 t CO2eq (Touvron et al. 2023, Table 2).
# - BLOOM 176B: 1,082,990 A100 GPU-hours, 433 MWh, 24.69 t CO2eq (Luccioni et al. 2022, "Estimating the Carbon
#   Footprint of BLOOM, a 176B Parameter Language Model").
PUBLISHED = {
    "gpt3-175b": (3_552_000, 1287.0),
    "llama2-70b": (1_720_320, 688.128),
    "bloom-176b": (1_082_990, 433.196),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_the_published_record(name):
    """Estimated GPU-hours and energy within +-30% of the published figures (measured: GPT-3 1.03 and 1.03,
    Llama 2 70B 0.93 and 0.93, BLOOM 0.87 and 0.87)."""
    result = est.estimate_preset(name)
    hours, mwh = PUBLISHED[name]
    assert result["published"]["gpu_hours"] == pytest.approx(hours)
    assert result["footprint"]["gpu_hours"] == pytest.approx(hours, rel=0.30)
    assert result["footprint"]["energy_kwh"] / 1000 == pytest.approx(mwh, rel=0.30)


def _cli(argv: list[str]) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv)
    return buffer.getvalue()


def test_cli_table_json_plot_and_preset(tmp_path):
    plot = tmp_path / "memory.png"
    table = _cli(["estimate", "-c", TINY, "--model.config.n_layer", "3", "--gpu", "a100-40gb", "--plot", str(plot)])
    assert "peak (per GPU)" in table and "lecture rule (16-bit)" in table and "fits in" in table
    assert "FLOPs per token" in table and "CO2eq" in table and "compute-optimal" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["memory.png"]  # written atomically: no temporary left
    values = json.loads(_cli(["estimate", "-c", TINY, "--gpu", "h100", "--gpus", "8", "--tokens", "1e9", "--mfu",
                              "0.5", "--price", "2", "--pue", "1.1", "--region", "france", "--json"]))  # fmt: skip
    foot, comp = values["footprint"], values["compute"]
    assert values["gpu"]["gpus"] == 8 and comp["tokens"] == 1e9
    assert foot["seconds"] == pytest.approx(comp["total_flops"] / (8 * 989e12 * 0.5))
    assert foot["energy_kwh"] == pytest.approx(foot["gpu_hours"] * 0.7 * 1.1)
    assert foot["co2_kg"] == pytest.approx(foot["energy_kwh"] * 0.056)
    assert foot["cost_usd"] == pytest.approx(foot["gpu_hours"] * 2)
    assert values["memory"]["items"][1]["name"] == "optimizer states"
    assert any(i["name"] == "DDP gradient buckets" for i in values["memory"]["items"])
    assert "published record" in _cli(["estimate", "--preset", "bloom-176b"])


def test_too_big_says_what_to_change():
    values = json.loads(_cli(["estimate", "-c", str(ROOT / "configs/gpt2-124m.yaml"), "--data.batch_size", "128",
                              "--gpu", "rtx4090", "--json"]))  # fmt: skip
    memory = values["memory"]
    assert not memory["fits"]
    tips = " | ".join(memory["suggestions"])
    assert "micro-batch 32" in tips and "activation checkpointing" in tips and "GiB" in tips
    wide = ["--model.config.n_layer", "36", "--model.config.n_embd", "2048", "--model.config.n_head", "16"]
    values = json.loads(_cli(["estimate", "-c", str(ROOT / "configs/gpt2-124m.yaml"), *wide, "--data.batch_size", "1",
                              "--gpu", "rtx4090", "--json"]))  # fmt: skip
    assert not values["memory"]["fits"] and "FSDP2 over" in " | ".join(values["memory"]["suggestions"])


@pytest.mark.parametrize(
    "argv,words",
    [
        (
            ["-c", TINY, "--model.config.n_lyr", "3"],
            "unknown key 'model.config.n_lyr'; did you mean 'model.config.n_layer'",
        ),
        (["-c", TINY, "--gpu", "tpu"], "--gpu 'tpu' is not one of"),
        (["-c", TINY, "--mfu", "2"], "--mfu 2.0 must be at most 1"),
        (["-c", "configs/nope.yaml"], "not found"),
        (["--gpu", "h100"], "give a config"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_encoder_and_fsdp_configs():
    """The encoder's MLM config and the FSDP2 config: sharding divides weights, gradients and states by the GPUs."""
    bert = est.estimate(est.run_from_config(*parse_fit_config(["-c", str(ROOT / "configs/bert-tiny-mlm.yaml")]), "b"))
    assert bert["task"] == "masked_lm" and bert["parameters"]["total"] > 0
    run = est.run_from_config(*parse_fit_config(["-c", str(ROOT / "configs/llama-fsdp.yaml")]), "llama-fsdp")
    one, eight = (_items(est.estimate(run, gpu_name="h100", gpus=n)) for n in (1, 8))
    for name in ("weights", "gradients", "optimizer states"):
        assert eight[name] == pytest.approx(one[name] / 8, abs=8)


def test_an_optimizer_plugin_may_declare_its_state(monkeypatch):
    """``state_bytes`` on a plugin's factory (lmforge.plugins.OPTIMIZER_STATE_HOOK): a number per parameter."""
    assert plugins.optimizer_state_bytes({"name": "adamw"}) is None  # the built-ins are known to estimate itself
    monkeypatch.setattr(plugins, "optimizer_state_bytes", lambda spec: 12)
    run = est.Run(model_config=SMALL, precision="32-true", optimizer={"name": "lion"})
    result = est.estimate(run, gpu_name="cpu")
    assert _items(result)["optimizer states"] == 12 * result["parameters"]["trainable"]


@pytest.mark.parametrize(
    "name, key",
    [(None, "cpu"), ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
     ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("Tesla V100-SXM2-32GB", "v100"), ("NVIDIA L4", "l4"),
     ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA GeForce GTX 1080", None)],
)  # fmt: skip
def test_cuda_device_names_map_to_the_table(name, key):
    from lmforge.hardware import key_for_device

    assert key_for_device(name) == key


def test_against_measured_compares_peak_time_and_energy():
    config, precision = parse_fit_config(["-c", TINY])
    predicted = est.estimate(est.run_from_config(config, "bf16-mixed", "x"), "h100", gpus=1)
    peak = predicted["memory"]["peak_bytes"]
    measured = {"seconds": 2 * predicted["footprint"]["seconds"] * 30 / predicted["run"]["max_steps"],
                "peak_memory_bytes": peak // 2, "energy_kwh": 1e-3, "energy_sources": ["nvml"]}  # fmt: skip
    table = est.against_measured(config, "bf16-mixed", 30, 1, 1, "NVIDIA H100 80GB HBM3", measured)
    lines = table.splitlines()
    assert lines[0].startswith("estimate vs measured (NVIDIA H100 SXM 80GB, 1 device(s), 30 steps)")
    row = next(line for line in lines if line.startswith("peak memory"))
    assert "+100%" in row and "max_memory_allocated" in row  # estimated twice what was "measured"
    time_row = next(line for line in lines if line.startswith("training time"))
    assert "MFU 0.2 achieved" in time_row  # twice as long as estimated at MFU 0.4
    assert any(line.startswith("energy (kWh)") and "nvml" in line for line in lines)
    assert est.against_measured(config, "bf16-mixed", 30, 1, 1, "NVIDIA GeForce GTX 1080", measured) is None
    cpu = est.against_measured(config, "32-true", 30, 1, 1, None, measured)
    assert "not comparable" in cpu and "runtime included" in cpu


def test_fit_prints_estimate_against_measurement(tmp_path, capsys):
    main(["fit", "-c", TINY, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])  # fmt: skip
    out = capsys.readouterr().out
    assert "lmforge: measured: " in out
    assert "estimate vs measured (CPU" in out and "2 steps)" in out and "training time" in out
