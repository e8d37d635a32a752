"""``lmforge estimate``: the memory, compute, time, energy, CO2 and cost of a run, before it starts.

It reads the same config as ``lmforge fit`` (the same parser, overrides and one-line errors; nothing is
instantiated, no data is read) and builds the model on the meta device, so parameter counts are exact
(tied weights once; LoRA's trainable and frozen parts apart) and cost no memory.

Memory per GPU, item by item (bytes; ``n`` a tensor's elements, ``e`` its parameter's bytes per element):

- weights ``n*e``: fp32 under ``32-true`` and ``bf16-mixed``/``16-mixed`` (Lightning keeps fp32 parameters and
  autocasts; the bf16 copy of each matrix that autocast caches for the step is listed apart), bf16 under
  ``bf16-true``; gradients the same for the trainable parameters only;
- optimizer states, per trainable tensor: AdamW/Adam ``2*n*e + 4`` (exp_avg, exp_avg_sq and the fp32 ``step``),
  SGD with momentum ``n*e``, Muon ``n*e`` (momentum) on the block matrices and AdamW on the rest; a plugin may
  declare its own (:func:`lmforge.plugins.optimizer_state_bytes`); unknown ones are taken as AdamW;
- activations saved for the backward per block and token (``d`` width, ``f`` MLP width, ``kv`` the key/value
  width, ``s`` bytes of an activation, ``r`` of the residual stream): the norms' inputs ``2*d*r`` (+ their fp32
  statistics), the projections' inputs ``d*s`` (x3 under autocast, which casts the input once per
  projection), q, k, v and the attention output ``(2*d + 2*kv)*s`` plus the fp32 log-sum-exp per head (the
  fused attention keeps no T x T matrix; its output, laid out (B, T, heads, head_dim), is also the output
  projection's input), the MLP's ``2*f*s`` (GELU)
  or ``4*f*s`` (SwiGLU). With activation checkpointing a block keeps only its input, and one block is
  recomputed at a time in the backward. The fused loss keeps the hidden states' and the head's gradients
  (it computes them in the forward) and holds one chunk of logits at a time; ``loss: torch`` keeps all the
  fp32 log-probabilities (N x V);
- the data batch (int64 ids and targets); DDP's gradient buckets (a copy of the gradients); FSDP2 shards
  weights, gradients and optimizer states over the ranks and gathers about two blocks at a time.

Peak = weights + optimizer states + max(activations + the larger of the loss's buffers and the backward's
workspace, gradients + the optimizer step's temporaries) (gradients are freed between steps, ``zero_grad(set_to_none=True)``; with
gradient accumulation they stay). The lecture's rule (16-bit: 2N GB weights, 2N GB gradients, 4-8N GB Adam, N
parameters in billions) is shown beside it.

Compute, per token (``P`` the parameters of matrix products, the tied head once, embedding lookups none;
``L`` blocks, ``T`` the sequence, ``d`` the attention width): forward ``2*P + 4*L*T*d``, backward ``4*P_trainable +
2*P_frozen + 8*L*T*d``: the ``6N + 12*L*T*d`` of the PaLM paper's appendix B (Chowdhery et al. 2022), attention
counted over the whole T x T (as ``torch.utils.flop_counter`` counts it, and MFU is defined); recomputation
under activation checkpointing is not model FLOPs. Time = FLOPs / (GPUs x dense peak x MFU), energy = GPU-hours
x board power x PUE, CO2 = energy x grid intensity, cost = GPU-hours x price, and the compute-optimal
token count is 20 per parameter (Hoffmann et al. 2022, "Chinchilla"). Tables: :mod:`lmforge.hardware`.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge import hardware
from lmforge.commands import OneLineParser, format_table, positive_int
from lmforge.errors import UserError

GIB = 1 << 30
DEFAULT_MFU = 0.4
"""Model FLOP utilisation assumed without ``--mfu``: well-tuned bf16 training of mid-size models reaches 0.35-0.55
(PaLM 0.46, LLaMA-65B about 0.5, BLOOM about 0.37)."""
CHINCHILLA_TOKENS_PER_PARAMETER = 20
CUDA_OVERHEAD_GIB = 1.0
"""CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation: outside ``max_memory_allocated``."""


# -- what a run is -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What ``estimate`` needs from a config (or a preset)."""

    model_config: Any
    task: str = "lm"
    """lm (decoder pretraining), masked_lm, sft or classify."""
    lora: dict | None = None
    precision: str | None = None
    """As in the config: None means bf16-mixed on a GPU with bf16, 32-true elsewhere (as ``fit`` decides)."""
    optimizer: dict = field(default_factory=lambda: {"name": "adamw"})
    strategy: str = "auto"
    devices: int | None = None
    nodes: int = 1
    max_steps: int = 1
    accumulate: int = 1
    batch_size: int = 1
    seq_len: int = 1
    checkpointing: int = 0
    """Every n-th block recomputes (0: none)."""
    mlm_probability: float = 0.15
    num_labels: int = 0
    source: str = ""


def _get(ns: Any, key: str, default: Any = None) -> Any:
    value = ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)
    return default if value is None else value


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if hasattr(value, "__dict__") and not isinstance(value, (str, int, float, bool, list, dict)):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


def _base_config(base: str, options: dict) -> Any:
    """The model config of a fine-tune's ``model.base``: an lmforge .ckpt, an lmforge export or a HF folder."""
    from lmforge import hf
    from lmforge.families import config_from_dict

    path = Path(str(base)).expanduser()
    if path.is_file():
        from lmforge.checkpoint import read_lmforge_checkpoint

        config = config_from_dict(read_lmforge_checkpoint(path, mmap=True)["lmforge"]["model_config"])
    elif path.is_dir() and (path / "config.json").is_file():
        values = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if hf.is_hf_folder(path):
            config, _ = hf.config_from_hf(values, str(path / "config.json"))
        else:
            config = config_from_dict(values.get("model_config", values))
    else:
        raise UserError(
            f"model.base={base!r} does not exist here; estimate reads the base model's shape from an lmforge .ckpt, "
            "an export or a Hugging Face folder with config.json (run the base's training first, or download it)"
        )
    if options:
        config = type(config).from_dict({**config.to_dict(), **options})
    return config


def _count_labels(data: Any) -> int:
    """Distinct labels in a classification config's training file (0 when it cannot be read)."""
    import csv

    train, label = _get(data, "train"), _get(data, "label_field", "label")
    try:
        with open(train, encoding="utf-8", newline="") as f:
            if str(train).endswith(".csv"):
                return len({row[label] for row in csv.DictReader(f) if label in row})
            return len({json.loads(line)[label] for line in f if line.strip()})
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def run_from_config(config: Any, precision: str | None, source: str) -> Run:
    """A :class:`Run` from the parsed config of :func:`parse_config`."""
    from lmforge.encoder import EncoderConfig
    from lmforge.model import GPTConfig

    model, data, trainer = config.model, config.data, config.trainer
    class_path = str(_get(model, "class_path", "lmforge.PretrainModule"))
    args = _get(model, "init_args", model)
    data_args = _get(data, "init_args", data)
    name = class_path.rsplit(".", 1)[-1]
    task = {"MaskedLMModule": "masked_lm", "SFTModule": "sft", "ClassifierModule": "classify"}.get(name, "lm")
    if task in ("sft", "classify"):
        model_config = _base_config(str(_get(args, "base")), dict(_plain(_get(args, "model_options", {})) or {}))
    else:
        values = _plain(_get(args, "config"))
        cls = EncoderConfig if task == "masked_lm" else GPTConfig
        model_config = cls.from_dict(dict(values or {}))
    length = model_config.block_size
    seq = int(_get(data_args, "seq_len", 0) or _get(data_args, "max_length", 0) or length)
    devices = _get(trainer, "devices", "auto")
    try:
        devices = int(devices)
    except (TypeError, ValueError):
        devices = len(devices) if isinstance(devices, (list, tuple)) else None
    from lmforge.parallel import checkpoint_every

    return Run(
        model_config=model_config,
        task=task,
        lora=_plain(_get(args, "lora")) if task in ("sft", "classify") else None,
        precision=precision,
        optimizer=dict(_plain(_get(args, "optimizer", {"name": "adamw"}))),
        strategy=str(_get(trainer, "strategy", "auto")),
        devices=devices,
        nodes=int(_get(trainer, "num_nodes", 1)),
        max_steps=int(_get(trainer, "max_steps", -1)),
        accumulate=int(_get(trainer, "accumulate_grad_batches", 1)),
        batch_size=int(_get(data_args, "batch_size", 1)),
        seq_len=min(seq, length),
        checkpointing=checkpoint_every(_get(args, "activation_checkpointing", False)),
        mlm_probability=float(_get(data_args, "mlm_probability", 0.15)),
        num_labels=_count_labels(data_args) if task == "classify" else 0,
        source=source,
    )


# -- parameters ----------------------------------------------------------------------------------------


@dataclass
class Tensors:
    """The model's parameters (built on the meta device), each once."""

    total: int
    trainable: int
    params: list[tuple[str, int, bool, bool]]
    """(name, elements, trainable, a matrix inside the blocks: what Muon updates)."""
    matmul_trainable: int
    """Elements of the trainable weights that multiply activations (the head once; LoRA's A and B)."""
    matmul_frozen: int
    head: int
    """Elements of the output head's matrix (in matmul_*), which the encoder's MLM head applies to masked tokens."""
    largest: int


def build_meta_model(run: Run):
    """The run's model on the meta device (torch paths: no kernel is needed), LoRA applied."""
    import torch

    from lmforge.families import build_model

    config = type(run.model_config).from_dict({**run.model_config.to_dict(), "attention": "torch", "loss": "torch"})
    with torch.device("meta"):
        model = build_model(config)
    if run.lora:
        from lmforge import lora as lora_lib

        settings = {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"], **run.lora}
        lora_lib.apply_lora(model, settings["r"], settings["alpha"], settings["dropout"], list(settings["targets"]))
        for name, p in model.named_parameters():
            for wanted in settings.get("train_also") or []:
                if name == wanted or name.startswith(f"{wanted}.") or f".{wanted}." in f".{name}":
                    p.requires_grad_(True)
    return model


def count_tensors(run: Run) -> Tensors:
    from torch import nn

    model = build_meta_model(run)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_weight = getattr(getattr(model, "lm_head", None), "weight", None)
    matrices: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("blocks.") and id(m.weight) not in embeddings:
            matrices.add(id(m.weight))
    params = [(n, p.numel(), p.requires_grad, id(p) in matrices) for n, p in model.named_parameters()]
    if run.task == "classify" and run.num_labels:
        params.append(("score.weight", run.model_config.n_embd * run.num_labels, True, False))
    linear_weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    linear_weights.update({id(p): p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))})
    if run.task == "masked_lm":
        head_weight = model.wte.weight
        linear_weights[id(head_weight)] = head_weight
    if run.task == "classify":
        linear_weights.pop(id(head_weight), None) if head_weight is not None else None
        head_weight = None
    mm_trainable = sum(p.numel() for p in linear_weights.values() if p.requires_grad)
    mm_frozen = sum(p.numel() for p in linear_weights.values() if not p.requires_grad)
    return Tensors(
        total=sum(n for _, n, _, _ in params),
        trainable=sum(n for _, n, t, _ in params if t),
        params=params,
        matmul_trainable=mm_trainable,
        matmul_frozen=mm_frozen,
        head=head_weight.numel() if head_weight is not None else 0,
        largest=max((n for _, n, _, _ in params), default=0),
    )


# -- memory --------------------------------------------------------------------------------------------

_PRECISIONS = {
    "32": "32-true",
    "32-true": "32-true",
    "64": "64-true",
    "64-true": "64-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
    "bf16-true": "bf16-true",
    "16-true": "16-true",
}


def resolve_precision(precision: str | None, gpu: hardware.Accelerator) -> str:
    if precision is None:
        return "bf16-mixed" if gpu.bf16 else "32-true"
    try:
        return _PRECISIONS[str(precision)]
    except KeyError:
        raise UserError(f"config: trainer.precision={precision!r} is not one of {', '.join(_PRECISIONS)}") from None


def dtype_bytes(precision: str) -> tuple[int, int, int]:
    """(parameter, activation, residual stream) bytes per element under a Lightning precision setting."""
    if precision == "64-true":
        return 8, 8, 8
    if precision == "32-true":
        return 4, 4, 4
    if precision.endswith("-mixed"):
        return 4, 2, 4
    return 2, 2, 2


_ADAM_LIKE = ("adamw", "adam")


def optimizer_state_bytes(run: Run, tensors: Tensors, param_bytes: int) -> tuple[int, str]:
    """(bytes of the optimizer's states on one unsharded copy, how they were counted)."""
    spec = run.optimizer
    name = str(spec.get("name", "adamw"))
    trainable = [(n, numel, matrix) for n, numel, t, matrix in tensors.params if t]

    def adam(numel: int) -> int:
        return 2 * numel * param_bytes + 4

    if name in _ADAM_LIKE:
        return sum(adam(n) for _, n, _ in trainable), f"{name}: 2 states x {param_bytes} B + a 4 B step per tensor"
    if name == "sgd":
        if float(spec.get("momentum", 0.9)) == 0:
            return 0, "sgd without momentum: no state"
        return sum(n * param_bytes for _, n, _ in trainable), f"sgd: a momentum buffer of {param_bytes} B"
    if name == "muon":
        total = sum(n * param_bytes if matrix else adam(n) for _, n, matrix in trainable)
        return total, "muon: a momentum buffer on block matrices, adamw states elsewhere"
    from lmforge import plugins

    hook = plugins.optimizer_state_bytes(spec)
    if hook is None:
        return sum(adam(n) for _, n, _ in trainable), f"{name}: declares no state_bytes; taken as adamw"
    if callable(hook):
        import torch

        total = sum(int(hook(torch.empty(n, device="meta", dtype=_torch_dtype(param_bytes)))) for _, n, _ in trainable)
        return total, f"{name}: its own state_bytes"
    return int(sum(n * float(hook) for _, n, _ in trainable)), f"{name}: {hook} B per parameter (its state_bytes)"


def _torch_dtype(nbytes: int):
    import torch

    return {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[nbytes]


def _norm_stats(config: Any) -> int:
    return 4 if getattr(config, "norm", "layernorm") == "rmsnorm" else 8


def block_activation_bytes(config: Any, act: int, res: int, mixed: bool) -> int:
    """Bytes one (non-checkpointed) block saves for its backward, per token."""
    d, f = config.n_embd, config.mlp_width
    kv = getattr(config, "kv_heads", config.n_head) * config.head_dim
    swiglu = getattr(config, "mlp", "gelu") == "swiglu"
    norms = 2 * (d * res + _norm_stats(config))
    inputs = d * act * (3 if mixed else 1) + d * act * ((2 if swiglu else 1) if mixed else 1)
    # q, k, v, the output (which is also c_proj's input: it is laid out (B, T, heads, head_dim), so the reshape is
    # a view) and the fp32 log-sum-exp per head
    attention = (2 * d + 2 * kv) * act + config.n_head * 4
    mlp = (4 if swiglu else 2) * f * act
    dropout = 2 * d if config.dropout > 0 else 0  # the residual branches' masks (bool)
    return norms + inputs + attention + mlp + dropout


@dataclass
class Item:
    name: str
    bytes: int
    note: str = ""
    phase: str = "static"
    """static (always held), step (during forward and backward) or update (during the optimizer step)."""


def memory(run: Run, tensors: Tensors, gpu: hardware.Accelerator, world: int, precision: str) -> dict:
    """Memory per GPU, item by item, and the peak."""
    from lmforge.encoder import EncoderConfig

    config = run.model_config
    pbytes, act, res = dtype_bytes(precision)
    mixed = precision.endswith("-mixed")
    sharded = "fsdp" in run.strategy.lower() or "deepspeed" in run.strategy.lower()
    shard = world if sharded else 1
    fsdp_mixed = sharded and mixed
    if fsdp_mixed:  # FSDP2's policy: the blocks compute in bf16 parameters, the residual stream too
        res = act
    B, T = run.batch_size, run.seq_len
    N = B * T
    items: list[Item] = []
    weights = tensors.total * pbytes
    grads = tensors.trainable * pbytes
    opt, opt_note = optimizer_state_bytes(run, tensors, pbytes)
    where = f", sharded over {shard}" if shard > 1 else ""
    items.append(Item("weights", math.ceil(weights / shard), f"{tensors.total:,} x {pbytes} B{where}"))
    items.append(Item("optimizer states", math.ceil(opt / shard), opt_note + where))
    items.append(Item("gradients", math.ceil(grads / shard), f"{tensors.trainable:,} trainable x {pbytes} B{where}",
                      "update" if run.accumulate == 1 else "static"))  # fmt: skip
    if world > 1 and not sharded:
        items.append(Item("DDP gradient buckets", grads, "a flat copy of the gradients for the all-reduce"))
    blocks = config.n_layer
    block_params = sum(n for name, n, _, _ in tensors.params if name.startswith("blocks.0."))
    if sharded and world > 1:
        gathered = (2 * block_params + (tensors.total - blocks * block_params)) * (act if mixed else pbytes)
        items.append(Item("FSDP gathered parameters", gathered, "two blocks and the root, unsharded", "step"))
        items.append(Item("FSDP unsharded block gradients", block_params * (act + 4), "one block before its "
                          "reduce-scatter", "step"))  # fmt: skip
    if mixed and not fsdp_mixed:
        items.append(Item("autocast weight copies", (tensors.matmul_trainable + tensors.matmul_frozen) * act,
                          "the bf16 copy of each matrix, cached for the step", "step"))  # fmt: skip
    # activations
    per_block = block_activation_bytes(config, act, res, mixed and not fsdp_mixed)
    every = run.checkpointing
    recomputed = len(range(0, blocks, every)) if every else 0
    kept = (blocks - recomputed) * per_block * N + recomputed * T * B * config.n_embd * res
    note = f"{blocks - recomputed} blocks x {per_block:,} B/token x {N:,} tokens"
    if recomputed:
        note += f"; {recomputed} checkpointed blocks keep their input, one is recomputed at a time"
        kept += per_block * N
    items.append(Item("activations (blocks)", kept, note, "step"))
    d, V = config.n_embd, config.vocab_size
    encoder = isinstance(config, EncoderConfig)
    outside = N * (d * res + _norm_stats(config))  # the final norm's (an encoder: the embedding norm's) input
    if run.task == "masked_lm":
        selected = math.ceil(N * run.mlm_probability)
        outside += selected * (3 * d * act + _norm_stats(config))  # the MLM transform: dense, GELU, LayerNorm
        loss_tokens = selected
    elif run.task == "classify":
        loss_tokens = 0
    else:
        loss_tokens = N
    items.append(Item("activations (embeddings, norms, heads)", outside, "", "step"))
    if loss_tokens:
        backend = getattr(config, "loss", "auto")
        if backend == "torch":
            saved = loss_tokens * V * 4 + loss_tokens * d * act
            transient = loss_tokens * V * (4 + act)
            items.append(Item("loss: log-probabilities", saved, f"loss: torch keeps {loss_tokens:,} x {V:,} fp32",
                              "step"))  # fmt: skip
        else:
            from lmforge.kernels.linear_cross_entropy import default_chunk_size, transient_bytes

            on_cuda = gpu.name != "cpu"
            chunk = default_chunk_size(loss_tokens, d, V, on_cuda)
            acc = 2 if act == 2 and precision.startswith("bf16") else 4
            head_grad = V * d * acc if tensors.head and _head_trainable(tensors) else 0
            saved = loss_tokens * d * act + head_grad
            transient = transient_bytes(loss_tokens, V, chunk, act) + min(chunk, loss_tokens) * V * (4 + (act != 4) * 4)
            if res != act:
                transient += loss_tokens * d * act + V * d * act  # the inputs cast to the products' dtype
            items.append(Item("loss: saved gradients", saved, "the fused loss computes d(hidden) and d(head) in the "
                              "forward", "step"))  # fmt: skip
        items.append(Item("loss: logits chunk (transient)", transient, "", "step"))
    loss_transient = transient if loss_tokens else 0
    workspace = N * (2 * d * res + config.mlp_width * act)
    items.append(Item("backward workspace", workspace, "the residual gradient and one MLP-wide gradient in flight "
                      "(counted as the larger of it and the loss's transient)", "step"))  # fmt: skip
    batch = N * 8 * (2 if run.task in ("lm", "sft") else 1) + N * (1 if run.task != "lm" else 0)
    if run.task == "masked_lm" or encoder:
        batch += N * 8  # labels and token types
    items.append(Item("data batch", batch, "int64 ids and targets (and masks) on the GPU", "step"))
    step_temp = 0 if gpu.name != "cpu" else tensors.largest * pbytes
    if str(run.optimizer.get("name")) == "muon":
        step_temp += 4 * tensors.largest * 2
    items.append(Item("optimizer step temporaries", step_temp, "fused AdamW on CUDA: none", "update"))
    static = sum(i.bytes for i in items if i.phase == "static")
    step = sum(i.bytes for i in items if i.phase == "step")
    step -= min(workspace, loss_transient)  # the loss's buffers are gone before the backward's workspace comes
    update = sum(i.bytes for i in items if i.phase == "update")
    peak = static + max(step, update)
    overhead = int(CUDA_OVERHEAD_GIB * GIB) if gpu.name != "cpu" else 0
    n_b = tensors.total / 1e9
    return {
        "precision": precision,
        "strategy": run.strategy,
        "world_size": world,
        "sharded_over": shard,
        "items": [
            {"name": i.name, "bytes": i.bytes, "gib": i.bytes / GIB, "phase": i.phase, "note": i.note} for i in items
        ],
        "peak_bytes": peak,
        "overhead_bytes": overhead,
        "capacity_bytes": gpu.memory_bytes,
        "fits": peak + overhead <= gpu.memory_bytes,
        "lecture_rule_gb": {
            "weights": 2 * n_b,
            "gradients": 2 * n_b,
            "adam": [4 * n_b, 8 * n_b],
            "total": [8 * n_b, 12 * n_b],
        },
    }


def _head_trainable(tensors: Tensors) -> bool:
    return any(t for name, _, t, _ in tensors.params if name in ("lm_head.weight", "wte.weight"))


def suggestions(run: Run, tensors: Tensors, gpu: hardware.Accelerator, world: int, precision: str) -> list[str]:
    """What to change so that the run fits the GPU, with the peak each change gives."""
    cap = gpu.memory_bytes - (int(CUDA_OVERHEAD_GIB * GIB) if gpu.name != "cpu" else 0)

    def peak(r: Run, t: Tensors = tensors, w: int = world) -> int:
        return memory(r, t, gpu, w, precision)["peak_bytes"]

    out = []
    for b in sorted({max(1, run.batch_size // k) for k in (2, 4, 8, 16, 32, 64)}, reverse=True):
        if b < run.batch_size and peak(replace(run, batch_size=b)) <= cap:
            k = math.ceil(run.batch_size / b)
            out.append(f"micro-batch {b} (--data.batch_size {b}, accumulate_grad_batches x{k} keeps the tokens per "
                       f"step): peak {_gib(peak(replace(run, batch_size=b)))}")  # fmt: skip
            break
    if not run.checkpointing:
        p = peak(replace(run, checkpointing=1))
        out.append(f"activation checkpointing (model.activation_checkpointing: true): peak {_gib(p)}")
    if "fsdp" not in run.strategy:
        for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            p = peak(replace(run, strategy="fsdp2"), w=n)
            if p <= cap:
                out.append(f"FSDP2 over {n} GPUs (trainer.strategy: fsdp2): peak {_gib(p)} per GPU")
                break
    if run.task in ("sft", "classify") and not run.lora:
        lora_run = replace(run, lora={"r": 8, "targets": ["q_proj", "v_proj"]})
        p = peak(lora_run, count_tensors(lora_run))
        out.append(f"LoRA r=8 on q_proj, v_proj (model.lora): peak {_gib(p)}")
    if not any(_peak_of(s) <= cap for s in out):
        both = replace(run, batch_size=1, checkpointing=1, strategy="fsdp2")
        p = peak(both, w=max(world, 8))
        out.append(f"all of micro-batch 1, checkpointing and FSDP2 over {max(world, 8)} GPUs: peak {_gib(p)}")
    return out


def _peak_of(line: str) -> float:
    try:
        return float(line.rsplit("peak ", 1)[1].split(" GiB")[0]) * GIB
    except (IndexError, ValueError):
        return math.inf


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


# -- compute and footprint -----------------------------------------------------------------------------


def flops_per_token(run: Run, tensors: Tensors) -> dict:
    """Model FLOPs per token of a training step: forward and backward apart (see the module's docstring)."""
    config = run.model_config
    T, d, L = run.seq_len, config.n_head * config.head_dim, config.n_layer
    head_t = tensors.head if _head_trainable(tensors) else 0
    head_f = tensors.head - head_t
    body_t, body_f = tensors.matmul_trainable - head_t, tensors.matmul_frozen - head_f
    share = run.mlm_probability if run.task == "masked_lm" else 1.0  # the MLM head runs on the masked tokens
    head_extra = 2 * config.n_embd * config.n_embd * share if run.task == "masked_lm" else 0  # its dense layer
    attention = 4 * L * T * d
    forward = 2 * (body_t + body_f) + 2 * tensors.head * share + head_extra + attention
    backward = 4 * body_t + 2 * body_f + (4 * head_t + 2 * head_f) * share + 2 * head_extra + 2 * attention
    return {"forward": forward, "backward": backward, "total": forward + backward, "attention": 3 * attention,
            "six_n": 6 * tensors.total}  # fmt: skip


def footprint(total_flops: float, gpus: int, gpu: hardware.Accelerator, precision: str, mfu: float,
              power_w: float, pue: float, grid: float, price: float) -> dict:  # fmt: skip
    peak = (gpu.fp32_tflops if precision in ("32-true", "64-true") else gpu.peak_tflops) * 1e12
    seconds = total_flops / (gpus * peak * mfu)
    gpu_hours = seconds / 3600 * gpus
    energy_kwh = gpu_hours * power_w / 1000 * pue
    return {
        "peak_tflops_per_gpu": peak / 1e12,
        "mfu": mfu,
        "seconds": seconds,
        "days": seconds / 86400,
        "gpu_hours": gpu_hours,
        "power_w": power_w,
        "pue": pue,
        "energy_kwh": energy_kwh,
        "grid_g_per_kwh": grid,
        "co2_kg": energy_kwh * grid / 1000,
        "price_usd_per_gpu_hour": price,
        "cost_usd": gpu_hours * price,
    }


# -- presets: the published record ---------------------------------------------------------------------


LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
"""What the Llama family's shape adds to a GPTConfig."""


def _preset_configs() -> dict[str, dict]:
    from lmforge.model import GPTConfig

    llama2 = GPTConfig(vocab_size=32000, block_size=4096, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
                       mlp_hidden=28672, **LLAMA)  # fmt: skip
    return {
        "gpt3-175b": {
            # Brown et al. 2020, Table 2.1: 96 layers, d 12288, 96 heads, context 2048, 300B tokens.
            "config": GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288),
            "tokens": 300e9,
            "gpu": "v100",
            "gpus": 10_000,
            # Patterson et al. 2021, Table 4: 24.6 TFLOPS measured per V100 (of 125), 330 W average, PUE 1.10,
            # 429 g/kWh; 14.8 days on 10,000 V100s.
            "mfu": 24.6 / 125.0,
            "power_w": 330.0,
            "pue": 1.10,
            "grid": 429.0,
            "published": {
                "gpu_hours": 10_000 * 14.8 * 24,
                "energy_mwh": 1287.0,
                "co2_t": 552.0,
                "source": "Patterson et al. 2021, Carbon Emissions and Large Neural Network Training, "
                "Table 4 (GPU-hours: 10,000 V100 x 14.8 days)",
            },
        },
        "llama2-70b": {
            # Touvron et al. 2023 (Llama 2), Table 1/2: 80 layers, d 8192, 64 heads, 8 KV heads, FFN 28672,
            # context 4096, 2.0T tokens, A100-80GB at 400 W.
            "config": llama2,
            "tokens": 2.0e12,
            "gpu": "a100-80gb",
            "gpus": 2048,
            # MFU from LLaMA-65B's reported 380 tokens/s/GPU on 2048 A100-80GB (Touvron et al. 2023a, sec. 2.4);
            # the 400 W of Table 2 already includes the PUE adjustment, so PUE 1.0; grid as implied by
            # 291.42 t for 1,720,320 h x 400 W.
            "mfu": "llama-65b",
            "power_w": 400.0,
            "pue": 1.0,
            "grid": 291.42e6 / (1_720_320 * 0.4),
            "published": {
                "gpu_hours": 1_720_320,
                "energy_mwh": 1_720_320 * 0.4 / 1000,
                "co2_t": 291.42,
                "source": "Touvron et al. 2023, Llama 2, Table 2 (energy: its GPU-hours x 400 W)",
            },
        },
        "bloom-176b": {
            # BigScience 2022 (BLOOM): 70 layers, d 14336, 112 heads, vocab 250880, context 2048, 366B tokens;
            # ALiBi (no position weights: rope here has none either), tied embeddings.
            "config": GPTConfig(
                vocab_size=250880, block_size=2048, n_layer=70, n_head=112, n_embd=14336, pos_encoding="rope"
            ),
            "tokens": 366e9,
            "gpu": "a100-80gb",
            "gpus": 384,
            # ~156 TFLOPS per A100 counted with full activation recomputation (BLOOM paper, sec. 3.5): MFU =
            # 156 x 6/8 / 312. Luccioni et al. 2022 count the GPUs' 400 W TDP only (PUE not applied to the
            # 433 MWh) on France's 57 g/kWh grid.
            "mfu": 156.0 * 0.75 / 312.0,
            "power_w": 400.0,
            "pue": 1.0,
            "grid": 57.0,
            "published": {
                "gpu_hours": 1_082_990,
                "energy_mwh": 433.196,
                "co2_t": 24.69,
                "source": "Luccioni et al. 2022, Estimating the Carbon Footprint of BLOOM, Table 1-2",
            },
        },
    }


def _llama65b_mfu() -> float:
    """The MFU that LLaMA-65B's 380 tokens/s/GPU on A100-80GB means (Touvron et al. 2023a, sec. 2.4)."""
    from lmforge.model import GPTConfig

    config = GPTConfig(vocab_size=32000, block_size=2048, n_layer=80, n_head=64, n_embd=8192, mlp_hidden=22016,
                       **LLAMA)  # fmt: skip
    run = Run(model_config=config, seq_len=2048)
    per_token = flops_per_token(run, count_tensors(run))["total"]
    return 380 * per_token / (hardware.ACCELERATORS["a100-80gb"].peak_tflops * 1e12)


PRESETS = ("gpt3-175b", "llama2-70b", "bloom-176b")


def preset(name: str) -> tuple[Run, dict]:
    table = _preset_configs()
    if name not in table:
        raise UserError(f"estimate: --preset {name!r} is not one of {', '.join(table)}")
    spec = dict(table[name])
    if spec["mfu"] == "llama-65b":
        spec["mfu"] = _llama65b_mfu()
    config = spec["config"]
    run = Run(model_config=config, precision="bf16-mixed" if spec["gpu"] != "v100" else "16-mixed",
              devices=spec["gpus"], max_steps=0, batch_size=1, seq_len=config.block_size, checkpointing=1,
              strategy="fsdp2", source=f"preset {name}")  # fmt: skip
    return run, spec


# -- the estimate --------------------------------------------------------------------------------------


def estimate(run: Run, gpu_name: str = "h100", gpus: int | None = None, nodes: int | None = None,
             tokens: float | None = None, mfu: float | None = None, price: float | None = None,
             pue: float | None = None, grid: float | None = None, region: str | None = None,
             power_w: float | None = None) -> dict:  # fmt: skip
    """Everything ``lmforge estimate`` prints, as a dict (what ``--json`` prints)."""
    gpu = hardware.accelerator(gpu_name)
    per_node = gpus or run.devices or 1
    nodes = nodes or run.nodes or 1
    world = per_node * nodes
    precision = resolve_precision(run.precision, gpu)
    tensors = count_tensors(run)
    mem = memory(run, tensors, gpu, world, precision)
    if not mem["fits"]:
        mem["suggestions"] = suggestions(run, tensors, gpu, world, precision)
    per_token = flops_per_token(run, tensors)
    configured = run.max_steps * run.batch_size * run.seq_len * run.accumulate * world if run.max_steps > 0 else 0
    budget = float(tokens) if tokens is not None else float(configured)
    if grid is None:
        grid = hardware.grid_intensity(region or hardware.DEFAULT_REGION)
    foot = footprint(
        per_token["total"] * budget,
        world,
        gpu,
        precision,
        DEFAULT_MFU if mfu is None else mfu,
        gpu.power_w if power_w is None else power_w,
        hardware.DEFAULT_PUE if pue is None else pue,
        grid,
        gpu.price_usd_per_hour if price is None else price,
    )
    return {
        "source": run.source,
        "task": run.task,
        "gpu": {
            "name": gpu.name,
            "label": gpu.label,
            "memory_gib": gpu.memory_gib,
            "gpus": world,
            "nodes": nodes,
        },
        "parameters": {
            "total": tensors.total,
            "trainable": tensors.trainable,
            "frozen": tensors.total - tensors.trainable,
        },
        "run": {
            "batch_size": run.batch_size,
            "seq_len": run.seq_len,
            "accumulate_grad_batches": run.accumulate,
            "max_steps": run.max_steps,
            "activation_checkpointing": run.checkpointing,
            "optimizer": run.optimizer.get("name"),
        },
        "memory": mem,
        "compute": {
            "flops_per_token": per_token,
            "tokens": budget,
            "tokens_configured": configured,
            "tokens_compute_optimal": CHINCHILLA_TOKENS_PER_PARAMETER * tensors.total,
            "total_flops": per_token["total"] * budget,
        },
        "footprint": foot,
    }


def against_measured(config: Any, precision: str, steps: int, devices: int, nodes: int, device_name: str | None,
                     measured: dict) -> str | None:  # fmt: skip
    """The end of ``lmforge fit``: what ``estimate`` predicts for the run that just trained (its config, the
    precision it ran in, the steps it took, the card it ran on) beside what :class:`lmforge.callbacks.EnergyMeter`
    measured, as a table; None when the card or the task is one ``estimate`` does not model.

    On a GPU the peak is ``torch.cuda.max_memory_allocated`` (the estimate without its CUDA-context allowance); on a
    CPU the measured figure is the process' peak resident set, the Python and torch runtime included, so the
    difference is shown but means less. The time is compared through the utilisation it implies."""
    key = hardware.key_for_device(device_name)
    if key is None or steps < 1:
        return None
    run = replace(run_from_config(config, precision, "this run"), max_steps=steps, devices=devices, nodes=nodes)
    result = estimate(run, key, gpus=devices, nodes=nodes)
    mem, foot = result["memory"], result["footprint"]
    on_gpu = key != "cpu"
    predicted_peak = mem["peak_bytes"]  # the tensors alone, as max_memory_allocated counts (no CUDA context)
    rows = []
    peak = measured.get("peak_memory_bytes")
    if peak:
        what = "max_memory_allocated" if on_gpu else "peak resident set, runtime included"
        rows.append(["peak memory (GiB)", f"{predicted_peak / GIB:.3f}", f"{peak / GIB:.3f} ({what})",
                     f"{100 * (predicted_peak / peak - 1):+.0f}%" if on_gpu else "not comparable"])  # fmt: skip
    seconds = measured.get("seconds")
    if seconds:
        implied = foot["mfu"] * foot["seconds"] / seconds
        rows.append(["training time", f"{_duration(foot['seconds'])} at MFU {foot['mfu']:.2f}", _duration(seconds),
                     f"MFU {implied:.3g} achieved"])  # fmt: skip
    if measured.get("energy_kwh") is not None:
        rows.append(["energy (kWh)", f"{foot['energy_kwh']:.4g} at {foot['power_w']:.0f} W",
                     f"{measured['energy_kwh']:.4g} ({' + '.join(measured.get('energy_sources') or [])})",
                     f"{100 * (foot['energy_kwh'] / measured['energy_kwh'] - 1):+.0f}%"])  # fmt: skip
    if not rows:
        return None
    title = f"estimate vs measured ({result['gpu']['label']}, {result['gpu']['gpus']} device(s), {steps} steps)"
    return title + "\n" + format_table(["", "estimated", "measured", "difference"], rows)


def estimate_preset(name: str, **overrides: Any) -> dict:
    """The estimate of a published run, with the published figures beside it (``published`` and ``ratio``)."""
    run, spec = preset(name)
    options = dict(gpu_name=spec["gpu"], gpus=spec["gpus"], nodes=1, tokens=spec["tokens"], mfu=spec["mfu"],
                   pue=spec["pue"], grid=spec["grid"], power_w=spec["power_w"])  # fmt: skip
    options.update({k: v for k, v in overrides.items() if v is not None})
    result = estimate(run, **options)
    published = spec["published"]
    foot = result["footprint"]
    ours = {"gpu_hours": foot["gpu_hours"], "energy_mwh": foot["energy_kwh"] / 1000, "co2_t": foot["co2_kg"] / 1000}
    result["published"] = {
        **published,
        "estimate": ours,
        "ratio": {k: ours[k] / published[k] for k in ours},
    }
    return result


# -- output --------------------------------------------------------------------------------------------


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"),
                           (1e6, "M"), (1e3, "k")):  # fmt: skip
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def format_report(result: dict) -> str:
    p, mem, comp, foot, gpu = result["parameters"], result["memory"], result["compute"], result["footprint"], \
        result["gpu"]  # fmt: skip
    lines = [f"lmforge estimate: {result['source']} ({result['task']}) on {gpu['gpus']} x {gpu['label']}, "
             f"{mem['precision']}, strategy {mem['strategy']}"]  # fmt: skip
    lines.append(f"parameters: {p['total']:,} ({p['trainable']:,} trainable, {p['frozen']:,} frozen)")
    run = result["run"]
    lines.append(f"micro-batch {run['batch_size']} x {run['seq_len']} tokens, accumulate {run['accumulate_grad_batches']}"
                 f", {run['max_steps']} steps, optimizer {run['optimizer']}")  # fmt: skip
    lines.append("")
    rows = [[i["name"], f"{i['gib']:.3f}", i["phase"], i["note"]] for i in mem["items"] if i["bytes"]]
    rows.append(["peak (per GPU)", f"{mem['peak_bytes'] / GIB:.3f}", "", "weights + states + max(step, update)"])
    if mem["overhead_bytes"]:
        rows.append(["+ CUDA context etc.", f"{mem['overhead_bytes'] / GIB:.3f}", "", "not in max_memory_allocated"])
    rule = mem["lecture_rule_gb"]
    rows.append(
        [
            "lecture rule (16-bit)",
            f"{rule['total'][0]:.3f}-{rule['total'][1]:.3f} GB",
            "",
            f"2N weights + 2N gradients + 4-8N Adam, N = {p['total'] / 1e9:.3g}B (no activations)",
        ]
    )
    lines.append(format_table(["memory", "GiB", "when", "how"], rows))
    verdict = "fits" if mem["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {gpu['memory_gib']:.1f} GiB ({gpu['name']})")
    for s in mem.get("suggestions", []):
        lines.append(f"  try: {s}")
    lines.append("")
    fl = comp["flops_per_token"]
    rows = [
        [
            "FLOPs per token",
            f"{_si(fl['total'])} (forward {_si(fl['forward'])}, backward {_si(fl['backward'])}; "
            f"6N = {_si(fl['six_n'])}, attention {_si(fl['attention'])})",
        ],
        [
            "tokens",
            f"{_si(comp['tokens'])} (configured {_si(comp['tokens_configured'])}; compute-optimal "
            f"{_si(comp['tokens_compute_optimal'])} = 20 x params)",
        ],
        ["total", f"{_si(comp['total_flops'], 'FLOP')}"],
        [
            "time",
            f"{_duration(foot['seconds'])} at MFU {foot['mfu']:.2f} of {foot['peak_tflops_per_gpu']:.1f} "
            f"TFLOPS per GPU",
        ],
        ["GPU-hours", f"{foot['gpu_hours']:,.1f}"],
        ["energy", f"{foot['energy_kwh']:,.2f} kWh ({foot['power_w']:.0f} W x PUE {foot['pue']:.2f})"],
        ["CO2eq", f"{foot['co2_kg']:,.2f} kg ({foot['grid_g_per_kwh']:.0f} g/kWh)"],
        ["cost", f"${foot['cost_usd']:,.2f} (${foot['price_usd_per_gpu_hour']:.2f} per GPU-hour)"],
    ]
    lines.append(format_table(["compute", "estimate"], rows))
    pub = result.get("published")
    if pub:
        lines.append("")
        est = pub["estimate"]
        rows = [[k, f"{est[k]:,.1f}", f"{pub[k]:,.1f}", f"{pub['ratio'][k]:.2f}"] for k in ("gpu_hours",
                "energy_mwh", "co2_t")]  # fmt: skip
        lines.append(format_table(["published record", "estimate", "published", "ratio"], rows))
        lines.append(f"source: {pub['source']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def write_plot(result: dict, path: str | Path) -> str:
    """A PNG bar chart of memory by component against the GPU's capacity, written atomically. With matplotlib
    (``pip install lmforge[bench]``): labelled bars; without it: the same bars, drawn here, unlabelled (the
    legend is the text table). Returns which renderer drew it."""
    from lmforge.atomic import staged_file

    mem = result["memory"]
    items = [(i["name"], i["bytes"]) for i in mem["items"] if i["bytes"]]
    capacity = mem["capacity_bytes"]
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    with staged_file(path, suffix=".png") as tmp:
        if plt is not None:
            fig, ax = plt.subplots(figsize=(9, 0.45 * len(items) + 2))
            names = [n for n, _ in items][::-1]
            ax.barh(names, [b / GIB for _, b in items][::-1], color=[tuple(c / 255 for c in col) for col in
                    _COLORS[: len(items)]][::-1])  # fmt: skip
            ax.axvline(capacity / GIB, color="black", linestyle="--", label=f"{result['gpu']['name']} capacity")
            ax.axvline(mem["peak_bytes"] / GIB, color="red", label="estimated peak")
            ax.set_xlabel("GiB per GPU")
            ax.set_title(f"{result['source']}: memory by component")
            ax.legend()
            fig.tight_layout()
            fig.savefig(tmp, format="png")
            plt.close(fig)
            return "matplotlib"
        tmp.write_bytes(_bars_png(items, capacity, mem["peak_bytes"]))
    return "builtin"


def _bars_png(items: list[tuple[str, int]], capacity: int, peak: int, width: int = 640) -> bytes:
    """An RGB PNG: one horizontal bar per component (scaled to the larger of capacity and peak), a black line at
    the capacity, a red one at the peak."""
    bar, gap, margin = 18, 6, 10
    height = margin * 2 + len(items) * (bar + gap)
    scale = (width - 2 * margin) / max(capacity, peak, 1)
    rows = [[(255, 255, 255)] * width for _ in range(height)]
    for k, (_, nbytes) in enumerate(items):
        top = margin + k * (bar + gap)
        length = max(1, int(nbytes * scale))
        for y in range(top, top + bar):
            rows[y][margin : margin + length] = [_COLORS[k % len(_COLORS)]] * length
    for x, color in ((margin + int(capacity * scale), (0, 0, 0)), (margin + int(peak * scale), (214, 39, 40))):
        x = min(width - 1, x)
        for y in range(height):
            rows[y][x] = color
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be positive")
    return number


def _nonnegative_float(value: str) -> float:
    number = _positive_float(value) if value.strip() not in ("0", "0.0") else 0.0
    return number


def estimate_command(argv: list[str], parse_config: Callable[[list[str]], tuple[Any, str | None]]) -> None:
    """``lmforge estimate -c CONFIG [overrides] [--gpu NAME] [--gpus N] [--nodes M] [--tokens T] [--mfu M]
    [--price USD] [--pue X] [--grid G | --region NAME] [--json] [--plot PATH.png]``, or ``--preset NAME``:
    memory per GPU item by item, FLOPs, time, energy, CO2 and cost of a run before it starts. ``parse_config``
    reads the config as ``fit`` does (:func:`lmforge.lightning_cli.parse_fit_config`; passed in, as the end of
    ``fit`` calls :func:`against_measured` from there)."""
    parser = OneLineParser(prog="lmforge estimate", description=estimate_command.__doc__)
    parser.add_argument("--preset", choices=PRESETS, help="a published run instead of a config")
    parser.add_argument("--gpu", default=None, help=f"one of {', '.join(hardware.ACCELERATORS)} (default h100)")
    parser.add_argument("--gpus", type=positive_int, help="GPUs per node (default: trainer.devices, else 1)")
    parser.add_argument("--nodes", type=positive_int, help="nodes (default: trainer.num_nodes)")
    parser.add_argument("--tokens", type=_positive_float, help="training tokens (default: steps x batch x seq x "
                        "accumulation x GPUs)")  # fmt: skip
    parser.add_argument("--mfu", type=_positive_float, help=f"model FLOP utilisation (default {DEFAULT_MFU})")
    parser.add_argument("--price", type=_nonnegative_float, help="USD per GPU-hour (default: the GPU table's)")
    parser.add_argument("--pue", type=_positive_float, help=f"data-centre PUE (default {hardware.DEFAULT_PUE})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grid", type=_nonnegative_float, help="grid intensity, g CO2eq per kWh")
    where.add_argument("--region", help=f"one of {', '.join(hardware.REGIONS)} (default {hardware.DEFAULT_REGION})")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--plot", help="write a PNG bar chart of memory by component to this path")
    args, rest = parser.parse_known_args(argv)
    if args.mfu is not None and args.mfu > 1:
        raise UserError(f"estimate: --mfu {args.mfu} must be at most 1 (a fraction of the peak)")
    options = dict(gpus=args.gpus, nodes=args.nodes, tokens=args.tokens, mfu=args.mfu, price=args.price,
                   pue=args.pue, grid=args.grid, region=args.region)  # fmt: skip
    if args.preset:
        if rest:
            raise UserError(f"estimate: --preset takes no config or overrides (got {rest[0]!r})")
        result = estimate_preset(args.preset, gpu_name=args.gpu, **options)
    else:
        if not any(a in ("-c", "--config") or a.startswith("--config=") for a in rest):
            raise UserError("estimate: give a config (-c configs/gpt-small.yaml) or --preset NAME")
        config, precision = parse_config(rest)
        source = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a in ("-c", "--config")), "config")
        result = estimate(run_from_config(config, precision, source), gpu_name=args.gpu or "h100", **options)
    if args.plot:
        result["plot"] = {"path": str(args.plot), "renderer": write_plot(result, args.plot)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
        if args.plot:
            print(f"memory chart: {args.plot}")
