"""The ``hf`` exporter (an ``lmforge.exporters`` plugin): an lmforge checkpoint as a transformers model folder.

``lmforge export CKPT --to DIR --format hf`` writes what ``transformers.AutoModelForCausalLM.from_pretrained``
(``AutoModelForSequenceClassification`` for classifiers) and ``AutoTokenizer.from_pretrained`` load with the
same logits and token ids as lmforge:

- ``config.json`` (GPT-2 or Llama, see :mod:`lmforge.hf`) and ``generation_config.json``;
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``
  when the weights exceed ``max_shard_size``;
- the tokenizer: ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``. lmforge's byte
  tokenizer becomes an exact byte-level BPE: 256 byte tokens (id = byte, in GPT-2's byte-to-unicode spelling),
  no merges, ``<|endoftext|>`` = 256, with ``split_special_tokens`` so that the text "<|endoftext|>" stays
  bytes as it does in lmforge;
- ``README.md``, a model card (``huggingface_hub.ModelCard``): architecture, training configuration, an
  estimate of the training compute, usage, and the checkpoint's metrics (also as ``model-index``).

LoRA fine-tunes export merged; ``adapter_only=True`` writes the PEFT adapter instead
(``adapter_config.json`` + ``adapter_model.safetensors``, see :func:`lmforge.lora.save_peft_adapter`). Like
the ``safetensors`` exporter, everything is written to a temporary folder beside ``out_dir`` that is renamed
into place at the end: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lmforge
from lmforge import hf
from lmforge.errors import UserError
from lmforge.export import DTYPES, Checkpoint, load_checkpoint
from lmforge.model import GPTConfig
from lmforge.tokenizers import EOS_TOKEN, ByteTokenizer, HFTokenizer

ARCHITECTURES = {
    ("gpt2", False): "GPT2LMHeadModel",
    ("llama", False): "LlamaForCausalLM",
    ("gpt2", True): "GPT2ForSequenceClassification",
    ("llama", True): "LlamaForSequenceClassification",
}
FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_METRIC_TYPES = {"loss": "loss", "ppl": "perplexity", "acc": "accuracy", "f1_macro": "f1", "gap_to_entropy": "loss"}
_SPLITS = {"val": "validation", "test": "test", "train": "train"}


class ExportError(UserError):
    """An export that cannot be done as asked (one line: what and what to do)."""


# -- the exporter ---------------------------------------------------------------------------------------


def export_hf(
    checkpoint: str | Path | Checkpoint,
    out_dir: str | Path,
    dtype: str = "float32",
    max_shard_size: int | str = "2GB",
    adapter_only: bool = False,
    license: str = "apache-2.0",
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    tags: str | list[str] | None = None,
) -> Path:
    """Write ``checkpoint`` as a transformers model folder ``out_dir`` (which must not exist yet).

    Args:
        checkpoint: A ``.ckpt`` written by ``lmforge fit`` (or a loaded :class:`~lmforge.export.Checkpoint`).
        out_dir: The folder to create.
        dtype: float32, float16 or bfloat16: the weights' type on disk.
        max_shard_size: Largest safetensors file (bytes, or e.g. "2GB", "500MB", "1GiB"); bigger models are
            sharded with an index, as transformers does.
        adapter_only: For LoRA fine-tunes: write the PEFT adapter only (the base model stays where it is).
        license: The model card's license (an SPDX-like Hub license id).
        base_model: The Hub id the model was fine-tuned from, for the model card (default: the checkpoint's
            base when it is a Hub id).
        datasets: Hub ids (or names) of the training data, for the model card.
        tags: Extra model card tags ("lmforge" is always there).
    """
    if dtype not in DTYPES:
        raise ExportError(f"exporter hf: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    family = hf.family_of(ckpt.config)  # HFError naming what GPT-2 / Llama cannot express
    classify = ckpt.task == "classify"
    head = _classifier_head(ckpt) if classify else {}
    if adapter_only and not (ckpt.lora and ckpt.adapters):
        raise ExportError(
            f"exporter hf: adapter_only=true but {ckpt.path} has no LoRA adapters; export it without adapter_only"
        )
    base_id = base_model if base_model is not None else _hub_base(ckpt)
    datasets = _as_list(datasets, "datasets")
    tags = _as_list(tags, "tags")

    special = _write_tokenizer(ckpt, out_dir)
    if adapter_only:
        _write_adapter(ckpt, out_dir, base_id, head)
        num_params = sum(t.numel() for t in hf.state_dict_to_hf(ckpt.state, ckpt.config, family).values())
        files = ["adapter_config.json", "adapter_model.safetensors"]
    else:
        tensors = _hf_tensors(ckpt, family, head, DTYPES[dtype])
        num_params = sum(t.numel() for t in tensors.values())
        files = write_safetensors(tensors, out_dir, shard_bytes)
        config = hf_config(ckpt, family, special, dtype)
        _write_json(out_dir / "config.json", config)
        if not classify:
            _write_json(out_dir / "generation_config.json", generation_config(ckpt.config, special))
    card = model_card(
        ckpt, family, num_params, out_dir.name, license, base_id, datasets, tags, adapter_only, dtype, files
    )
    card.save(str(out_dir / "README.md"))
    return out_dir


# -- weights --------------------------------------------------------------------------------------------


def parse_size(value: int | str) -> int:
    """Bytes from an int or a size like "2GB" (10^9), "500MB", "1GiB" (2^30), "64KB", "100"."""
    if isinstance(value, bool):
        raise ExportError(f"exporter hf: max_shard_size={value!r} is not a size")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(value), re.I)
        if not match:
            raise ExportError(f"exporter hf: max_shard_size={value!r} is not a size such as 2GB, 500MB or 1GiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 1:
        raise ExportError(f"exporter hf: max_shard_size={value!r} must be positive")
    return size


def _classifier_head(ckpt: Checkpoint) -> dict[str, Tensor]:
    score = ckpt.head.get("score.weight")
    if score is None:
        raise ExportError(
            f"exporter hf: {ckpt.path} is a classifier without score.weight; was it saved by lmforge fit?"
        )
    others = sorted(set(ckpt.head) - {"score.weight"})
    if others:
        raise ExportError(f"exporter hf: classifier head tensors {others} have no transformers counterpart")
    if score.dim() != 2 or score.shape[1] != ckpt.config.n_embd:
        raise ExportError(
            f"exporter hf: score.weight has shape {tuple(score.shape)}; expected (num_labels, {ckpt.config.n_embd})"
        )
    if ckpt.labels is not None and len(ckpt.labels) != score.shape[0]:
        raise ExportError(f"exporter hf: {len(ckpt.labels)} labels but score.weight has {score.shape[0]} rows")
    return {"score.weight": score}


def _hf_tensors(ckpt: Checkpoint, family: str, head: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    state = dict(ckpt.state)
    if head:  # *ForSequenceClassification has no LM head
        state.pop("lm_head.weight", None)
    out = hf.state_dict_to_hf(state, ckpt.config, family)
    if head:
        out.pop("lm_head.weight", None)
        out.update(head)
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in out.items():
        if not tensor.is_floating_point():
            continue
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if where in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        tensors[key] = tensor
    return tensors


def write_safetensors(tensors: dict[str, Tensor], folder: Path, max_shard_size: int) -> list[str]:
    """``model.safetensors``, or shards plus ``model.safetensors.index.json`` (transformers' layout).

    Tensors are packed in order; a shard is closed when the next tensor would take it past
    ``max_shard_size`` (a single larger tensor gets a shard of its own). Returns the files written.
    """
    from safetensors.torch import save_file

    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(sizes.values())
    if total <= max_shard_size:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    weight_map: dict[str, str] = {}
    files = []
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        files.append(name)
    index = {
        "metadata": {"total_size": total, "total_parameters": sum(t.numel() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(folder / "model.safetensors.index.json", index)
    return [*files, "model.safetensors.index.json"]


def _write_adapter(ckpt: Checkpoint, folder: Path, base_id: str | None, head: dict[str, Tensor]) -> None:
    try:
        from lmforge.lora import save_peft_adapter
    except ImportError as err:
        raise ExportError(f"exporter hf: adapter_only needs lmforge.lora.save_peft_adapter ({err})") from None
    if (ckpt.lora or {}).get("train_also"):
        raise ExportError(
            f"exporter hf: {ckpt.path} also trained base weights (lora.train_also={ckpt.lora['train_also']!r}), "
            "which this PEFT adapter would not carry; export it merged (without adapter_only)"
        )
    base = base_id or (ckpt.base or {}).get("source")
    staging = folder / ".adapter"
    save_peft_adapter(
        ckpt.adapters,
        ckpt.config,
        ckpt.lora,
        staging,
        base_model_name_or_path=base,
        task_type="SEQ_CLS" if head else "CAUSAL_LM",
        modules_to_save=head or None,
    )
    for path in staging.iterdir():
        path.rename(folder / path.name)
    staging.rmdir()


# -- config files ---------------------------------------------------------------------------------------


def _special_tokens(tokenizer) -> dict[str, Any]:
    """eos/bos/pad tokens and ids; bos is the tokenizer's own when it adds one, else eos (as GPT-2)."""
    if tokenizer is None:
        return {}
    if isinstance(tokenizer, ByteTokenizer):
        eos, eos_id, bos, bos_id = EOS_TOKEN, tokenizer.eos_id, EOS_TOKEN, tokenizer.eos_id
    else:
        eos, eos_id = getattr(tokenizer, "eos_token", EOS_TOKEN), tokenizer.eos_id
        bos = getattr(tokenizer, "bos_token", None) or eos
        bos_id = getattr(tokenizer, "bos_id", None)
        bos_id = eos_id if bos_id is None else bos_id
    return {"eos": eos, "eos_id": eos_id, "bos": bos, "bos_id": bos_id, "pad": eos, "pad_id": eos_id}


def hf_config(ckpt: Checkpoint, family: str, special: dict, dtype: str) -> dict:
    """config.json: the architecture (:func:`lmforge.hf.config_to_hf`) plus what transformers reads beside it."""
    classify = ckpt.task == "classify"
    values: dict[str, Any] = {"architectures": [ARCHITECTURES[family, classify]]}
    values.update(hf.config_to_hf(ckpt.config, family))
    if special:
        values.update(bos_token_id=special["bos_id"], eos_token_id=special["eos_id"], pad_token_id=special["pad_id"])
    if classify:
        n = ckpt.head["score.weight"].shape[0]
        labels = ckpt.labels or [f"LABEL_{i}" for i in range(n)]
        values.update(
            num_labels=n,
            id2label={str(i): str(label) for i, label in enumerate(labels)},
            label2id={str(label): i for i, label in enumerate(labels)},
            problem_type="single_label_classification",
        )
    values.update(dtype=dtype, torch_dtype=dtype, use_cache=True)
    version = _transformers_version()
    if version:
        values["transformers_version"] = version
    return values


def generation_config(config: GPTConfig, special: dict) -> dict:
    values: dict[str, Any] = {}
    if special:
        values.update(bos_token_id=special["bos_id"], eos_token_id=special["eos_id"], pad_token_id=special["pad_id"])
    values["max_length"] = config.block_size
    version = _transformers_version()
    if version:
        values["transformers_version"] = version
    return values


def _transformers_version() -> str | None:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


# -- the tokenizer --------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the table byte-level BPE vocabularies use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer_json() -> str:
    """tokenizer.json of lmforge's ByteTokenizer: ids 0..255 are the bytes, 256 is ``<|endoftext|>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    spelling = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={spelling[i]: i for i in range(256)}, merges=[]))
    # No merges: every byte is its own token, whatever the pre-tokenizer splits; no regex needed.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    if tok.token_to_id(EOS_TOKEN) != ByteTokenizer.eos_id:
        raise AssertionError("byte tokenizer: <|endoftext|> is not id 256")
    return tok.to_str(pretty=True)


def _write_tokenizer(ckpt: Checkpoint, folder: Path) -> dict:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the special tokens."""
    tokenizer = ckpt.tokenizer
    if tokenizer is None:
        return {}
    if isinstance(tokenizer, ByteTokenizer):
        text = byte_tokenizer_json()
    elif isinstance(tokenizer, HFTokenizer):
        text = tokenizer._tok.to_str(pretty=True)
    else:
        raise ExportError(
            f"exporter hf: tokenizer {type(tokenizer).__name__} has no Hugging Face form (bytes and hf/bpe do)"
        )
    special = _special_tokens(tokenizer)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    tokens = {"bos_token": special["bos"], "eos_token": special["eos"], "pad_token": special["pad"]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "model_max_length": ckpt.config.block_size,
        "clean_up_tokenization_spaces": False,
    }
    if isinstance(tokenizer, ByteTokenizer):
        config["split_special_tokens"] = True  # "<|endoftext|>" typed in text stays bytes, as in lmforge
    chat_template = getattr(tokenizer, "chat_template", None)
    if chat_template:  # the base model's template travels with the fine-tune (transformers reads both places)
        config["chat_template"] = chat_template
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", tokens)
    return special


# -- the model card -------------------------------------------------------------------------------------


def _as_list(value, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ExportError(f"exporter hf: {name}={value!r} must be a string or a list of strings")


def _hub_base(ckpt: Checkpoint) -> str | None:
    """The base model's Hub id, when the fine-tune started from one (not from a local path)."""
    base = ckpt.base or {}
    source = base.get("source")
    if base.get("kind") != "hf" or not source or Path(str(source)).expanduser().exists():
        return None
    return str(source) if re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", str(source)) else None


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif prefix:
        out[prefix[:-1]] = values
    return out


def _find(flat: dict[str, Any], *names: str) -> Any:
    """The value of the first key whose last part is one of ``names`` (e.g. data.init_args.batch_size)."""
    for name in names:
        for key, value in flat.items():
            if key.rsplit(".", 1)[-1] == name and value is not None and not isinstance(value, dict):
                return value
    return None


def _run_config(path: Path) -> dict:
    """The run's config.yaml, when it lies beside the checkpoint or, for lmforge's layout
    (``<root>/checkpoints/last.ckpt``), where LightningCLI saves it: ``<root>/csv/version_N/`` (the
    first logger's folder; the newest run) or ``<root>`` without loggers."""
    import yaml

    candidates = [path.parent / "config.yaml"]
    if path.parent.name == "checkpoints":
        root = path.parent.parent
        logged = sorted(root.glob("*/version_*/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
        candidates += [*logged, root / "config.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                values = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                continue
            if isinstance(values, dict):
                return values
    return {}


def training_facts(ckpt: Checkpoint) -> dict[str, Any]:
    """What the checkpoint (and the run's config.yaml, when found) tell about the training run."""
    flat = _flatten(_run_config(ckpt.path) if ckpt.path else {})
    flat.update(_flatten(ckpt.hparams))
    facts: dict[str, Any] = {"steps": ckpt.global_step}
    for key, names in {
        "batch_size": ("batch_size",),
        "seq_len": ("seq_len", "max_length"),
        "accumulate": ("accumulate_grad_batches",),
        "devices": ("devices",),
        "num_nodes": ("num_nodes",),
        "accelerator": ("accelerator",),
        "precision": ("precision",),
        "hardware": ("hardware", "gpu", "device_name"),
    }.items():
        facts[key] = _find(flat, *names)
    facts["optimizer"] = ckpt.hparams.get("optimizer")
    facts["scheduler"] = ckpt.hparams.get("scheduler")
    for key in ("hardware", "precision", "tokens_seen"):  # recorded by the run itself: preferred
        if ckpt.run.get(key) is not None:
            facts[key] = ckpt.run[key]
    if ckpt.run.get("devices"):
        facts["hardware"] = (
            f"{facts.get('hardware')} x {ckpt.run['devices']}" if ckpt.run["devices"] > 1 else facts.get("hardware")
        )
    return facts


def _describe_plugin(spec: Any) -> str:
    if isinstance(spec, dict):
        args = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
        return f"{spec.get('name', '?')}" + (f" ({args})" if args else "")
    return "not recorded" if spec is None else str(spec)


def _tokens_seen(facts: dict) -> tuple[int, str] | None:
    """(training tokens, how they were counted) when the run counted them, or the batch size and
    sequence length are known."""
    if isinstance(facts.get("tokens_seen"), int) and facts["tokens_seen"] > 0:
        return facts["tokens_seen"], "tokens counted during training (padding included)"
    batch, seq = facts.get("batch_size"), facts.get("seq_len")
    if not (isinstance(batch, int) and isinstance(seq, int) and facts["steps"]):
        return None
    tokens, factors = facts["steps"] * batch * seq, ["steps", "batch size", "sequence length"]
    for key, label in (("accumulate", "accumulation"), ("devices", "devices"), ("num_nodes", "nodes")):
        value = facts.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            tokens *= value
            factors.append(label)
    return tokens, " x ".join(factors)


def _fmt_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _metric_rows(metrics: dict) -> list[tuple[str, str, float]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        stage, _, name = key.rpartition("/")
        rows.append((stage or "-", name, float(value)))
    return rows


def _eval_results(ckpt: Checkpoint, datasets: list[str], pipeline_tag: str):
    from huggingface_hub import EvalResult

    results = []
    for stage, name, value in _metric_rows(ckpt.metrics):
        if stage not in ("val", "test"):
            continue
        results.append(
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=datasets[0] if datasets else "custom",
                dataset_name=datasets[0] if datasets else "held-out data",
                dataset_split=_SPLITS[stage],
                metric_type=_METRIC_TYPES.get(name, name),
                metric_name=f"{stage}/{name}",
                metric_value=round(value, 6),
            )
        )
    return results


def model_card(
    ckpt: Checkpoint,
    family: str,
    num_params: int,
    name: str,
    license: str,
    base_id: str | None,
    datasets: list[str],
    tags: list[str],
    adapter_only: bool,
    dtype: str,
    files: list[str],
):
    """The README.md: Hub metadata (ModelCardData) and a body describing the model and its training."""
    from huggingface_hub import ModelCard, ModelCardData

    config = ckpt.config
    classify = ckpt.task == "classify"
    pipeline_tag = "text-classification" if classify else "text-generation"
    extra_tags = (["lora"] if ckpt.lora else []) + (["peft"] if adapter_only else [])
    card_tags = list(dict.fromkeys(["lmforge", family, pipeline_tag, *extra_tags, *tags]))
    results = _eval_results(ckpt, datasets, pipeline_tag)
    data = ModelCardData(
        library_name="peft" if adapter_only else "transformers",
        license=license,
        tags=card_tags,
        datasets=datasets or None,
        base_model=base_id,
        pipeline_tag=pipeline_tag,
        model_name=name,
        eval_results=results or None,
        metrics=sorted({r.metric_type for r in results}) or None,
    )
    facts = training_facts(ckpt)
    arch = FAMILY_NAMES[family]
    base = ckpt.base or {}
    if base.get("source"):
        origin = f"fine-tuned ({'LoRA' if ckpt.lora else 'full'}, task `{ckpt.task}`) from `{base['source']}`"
    else:
        origin = "pretrained from scratch"
    what = {"lm": "language model", "sft": "fine-tuned (SFT) language model", "classify": "text classifier"}
    lines = [
        f"# {name}",
        "",
        f"A {_fmt_count(num_params)}-parameter {arch}-architecture {what.get(ckpt.task, 'model')}, {origin} with "
        f"lmforge {lmforge.__version__} and exported to transformers format "
        f"(`{ARCHITECTURES[family, classify]}`, {dtype} weights) from `{ckpt.path.name if ckpt.path else 'a checkpoint'}` "
        f"at step {ckpt.global_step}.",
    ]
    if adapter_only:
        lines += [
            "",
            f"This folder holds only the LoRA adapter (PEFT format); load it on top of `{base_id or base.get('source')}`.",
        ]
    if classify and ckpt.labels:
        lines += ["", "Labels (id: name): " + ", ".join(f"{i}: `{label}`" for i, label in enumerate(ckpt.labels)) + "."]
    lines += [
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| family | {arch} (`{family}`) |",
        f"| layers | {config.n_layer} |",
        f"| width (n_embd) | {config.n_embd} |",
        f"| attention heads | {config.n_head} |",
        f"| key/value heads | {config.kv_heads}{' (grouped-query)' if config.kv_heads != config.n_head else ''} |",
        f"| MLP hidden width | {config.mlp_width} ({config.mlp}) |",
        f"| context length | {config.block_size} |",
        f"| vocabulary | {config.vocab_size} |",
        f"| positions | {'rotary (theta ' + format(config.rope_theta, 'g') + ')' if config.pos_encoding == 'rope' else 'learned'} |",
        f"| norm | {config.norm} (eps {config.norm_eps:g}) |",
        f"| tied embeddings | {'yes' if config.tie_embeddings else 'no'} |",
        f"| parameters | {num_params:,} |",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| task | {ckpt.task} |",
        f"| steps | {facts['steps']:,} |",
        f"| optimizer | {_describe_plugin(facts['optimizer'])} |",
        f"| scheduler | {_describe_plugin(facts['scheduler'])} |",
    ]
    for key, label in (
        ("batch_size", "batch size"),
        ("seq_len", "sequence length"),
        ("accumulate", "gradient accumulation"),
        ("precision", "precision"),
    ):
        if facts.get(key) is not None:
            lines.append(f"| {label} | {facts[key]} |")
    if ckpt.lora:
        lora = ", ".join(f"{k}={v}" for k, v in ckpt.lora.items())
        lines.append(f"| LoRA | {lora} |")
    hardware = facts.get("hardware")
    if hardware is None and facts.get("accelerator") not in (None, "auto"):
        hardware = f"{facts['accelerator']} x {facts.get('devices') or 1}"
    lines += ["", f"Hardware: {hardware if hardware is not None else 'not recorded in the checkpoint'}."]
    seen = _tokens_seen(facts)
    lines += ["", "### Compute (estimate)", ""]
    if seen:
        tokens, how = seen
        flops = 6 * num_params * tokens
        lines.append(
            f"About {_fmt_count(tokens)} training tokens ({how}), so an estimated 6 x {num_params:,} parameters "
            f"x {tokens:,} tokens = {flops:.2e} FLOPs (an estimate: padding, evaluation and recomputation are "
            "not counted)."
        )
    else:
        lines.append(
            "Not estimated: the checkpoint does not record the batch size and sequence length "
            "(the estimate would be 6 x parameters x training tokens)."
        )
    lines += [
        "",
        "## How to use",
        "",
        "```python",
        *_usage(name, classify, adapter_only, base_id or base.get("source")),
        "```",
    ]
    if ckpt.tokenizer is None:
        lines += ["", "No tokenizer was saved with the checkpoint: tokenize the input as it was in training."]
    elif isinstance(ckpt.tokenizer, ByteTokenizer):
        lines += [
            "",
            "The tokenizer is lmforge's byte tokenizer: token ids 0-255 are the UTF-8 bytes of the text and "
            "256 is `<|endoftext|>`.",
        ]
    rows = _metric_rows(ckpt.metrics)
    lines += ["", "## Evaluation", ""]
    if rows:
        lines += ["| split | metric | value |", "|---|---|---|"]
        lines += [f"| {_SPLITS.get(stage, stage)} | {metric} | {value:.4f} |" for stage, metric, value in rows]
    else:
        lines.append("The checkpoint records no metrics.")
    lines += ["", "## Files", "", "Weights: " + ", ".join(f"`{f}`" for f in files) + "."]
    body = "\n".join(lines) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _usage(name: str, classify: bool, adapter_only: bool, base: str | None) -> list[str]:
    path = f'"{name}"  # this folder, or its Hub id once uploaded'
    if adapter_only:
        auto = "AutoModelForSequenceClassification" if classify else "AutoModelForCausalLM"
        return [
            "from peft import PeftModel",
            f"from transformers import AutoTokenizer, {auto}",
            "",
            f'base = {auto}.from_pretrained("{base}")',
            f"model = PeftModel.from_pretrained(base, {path})",
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        ]
    if classify:
        return [
            "from transformers import pipeline",
            "",
            f'classifier = pipeline("text-classification", model={path})',
            'print(classifier("This is great!"))',
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model_id = {path}",
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        "model = AutoModelForCausalLM.from_pretrained(model_id)",
        'inputs = tokenizer("Once upon a time", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=50, do_sample=True, top_k=50)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
    ]


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
