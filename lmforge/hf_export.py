"""The ``hf`` exporter (an ``lmforge.exporters`` plugin): an lmforge checkpoint as a transformers model folder.

``lmforge export CKPT --to DIR --format hf`` writes what ``transformers.AutoModelForCausalLM.from_pretrained``
(``AutoModelForSequenceClassification`` for classifiers) and ``AutoTokenizer.from_pretrained`` load with the
same logits and token ids as lmforge:

- ``config.json`` (GPT-2 or Llama, see :mod:`lmforge.hf`) and, for language models, ``generation_config.json``
  (the special token ids; no ``max_length``, so ``generate(max_new_tokens=...)`` runs without a warning);
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``
  when the weights exceed ``max_shard_size``;
- the tokenizer: ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``. lmforge's byte
  tokenizer becomes an exact byte-level BPE: 256 byte tokens (id = byte, in GPT-2's byte-to-unicode spelling),
  no merges, ``<|endoftext|>`` = 256, with ``split_special_tokens`` so that the text "<|endoftext|>" stays
  bytes as it does in lmforge. Language models pad with the end-of-text token; classifiers get a padding
  token of their own (:func:`classifier_pad`), because transformers pools a sequence at its last token that
  is not padding, which for a text ending in the end-of-text token would be the wrong one;
- ``README.md``, a model card (``huggingface_hub.ModelCard``, see :func:`model_card`): what the model is and
  was trained from and on, architecture, training configuration, an estimate of the training compute, a
  usage snippet that runs as it is, the evaluation metrics (also as ``model-index``) and the licence.

LoRA fine-tunes export merged; ``adapter_only=True`` writes the PEFT adapter instead
(``adapter_config.json`` + ``adapter_model.safetensors``, see :func:`lmforge.lora.write_peft_adapter`).

No exported file names a path of the machine that exported it: a base model is named by its Hub id, else by
the name of its local folder or file (the card says how to point the snippet at it). The licence is the
``license`` argument, else the base model's (its model card's, from its folder or the Hub cache), else none:
the card then says so and how to set one, and never claims a licence nobody chose.

The exporter writes into ``out_dir``, an empty folder that lmforge (:func:`lmforge.export.export`, used by
``lmforge export``) created beside ``--to`` and renames to it once the exporter returns: a failed export
leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lmforge
from lmforge import families, hf
from lmforge.encoder import EncoderConfig
from lmforge.errors import UserError
from lmforge.export import DTYPES, Checkpoint, load_checkpoint
from lmforge.hub import card_license, card_metadata
from lmforge.model import GPTConfig
from lmforge.tokenizers import EOS_TOKEN, ByteTokenizer, HFTokenizer, WordPieceTokenizer

PAD_TOKENS = ("<|pad|>", "<|lmforge_pad|>")
"""The padding token an exported classifier gets: the first of these its tokenizer does not have already."""
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_METRIC_TYPES = {
    "loss": "loss",
    "ppl": "perplexity",
    "acc": "accuracy",
    "f1": "f1",
    "f1_macro": "f1",
    "gap_to_entropy": "loss",
}
_EVAL_METRIC = re.compile(
    r"(loss|ppl|perplexity|bpb|bits_per_byte|gap_to_entropy|acc|accuracy|(f1|precision|recall)(_\w+)?)"
)
"""Names of evaluation metrics (after val/ or test/); rates, learning rates and counts are not."""
_SPLITS = {"val": "validation", "test": "test"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
_DATA_FILES = {".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz", ".zip", ".bin", ".npy"}
"""Suffixes of local data files, which a Hub dataset id does not end in."""
_PROMPT = "Once upon a time"
_TEXTS = ["This is great!", "Not for me."]


def __getattr__(name: str) -> Any:
    """``ARCHITECTURES`` ((family, classifier?) -> transformers class) and ``FAMILY_NAMES`` (family -> name in
    prose), the constants these once were: computed from :data:`lmforge.families.FAMILIES` on access."""
    if name == "ARCHITECTURES":
        return {
            (f.name, classify): f.architecture(classify)
            for classify in (False, True)
            for f in families.FAMILIES.values()
        }
    if name == "FAMILY_NAMES":
        return {f.name: f.display for f in families.FAMILIES.values()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ExportError(UserError):
    """An export that cannot be done as asked (one line: what and what to do)."""


@dataclass(frozen=True)
class PadToken:
    """The padding token of an exported classifier."""

    token: str
    id: int
    in_tokenizer: bool
    """The tokenizer has it already (e.g. a base that was itself an exported lmforge classifier)."""
    new_row: bool
    """The embedding gets one row more for it (the model had no unused row)."""


@dataclass(frozen=True)
class BaseModel:
    """The model a fine-tune started from, as an export names it: by its Hub id, or by the name of its local
    folder or file, never by a path of this machine."""

    name: str
    """The Hub id, or the local folder's or file's name."""
    hub_id: str | None = None
    kind: str = "hf"
    """hf (transformers loads it) or lmforge (a .ckpt or an lmforge export, to export for transformers first)."""
    revision: str | None = None
    local: Path | None = None
    """Where it is on this machine at export time (to read its model card); never written anywhere."""

    @property
    def transformers_name(self) -> str:
        """What transformers loads for it: the Hub id, the local folder's name, or for an lmforge base the
        folder that ``lmforge export NAME --to NAME-hf --format hf`` would write."""
        if self.hub_id or self.kind == "hf":
            return self.hub_id or self.name
        return f"{Path(self.name).stem}-hf"


@dataclass(frozen=True)
class License:
    """A model card's licence and who chose it: ``argument`` (the exporter's) or ``base`` (the base model's card)."""

    id: str
    source: str
    name: str | None = None
    """license_name and license_link, for a licence ``other`` (a custom one)."""
    link: str | None = None


@dataclass
class CardFacts:
    """What the exporter decided, for the model card."""

    name: str
    """The export folder's name: the card's title, and the model id in its snippet."""
    family: str
    config: GPTConfig | EncoderConfig
    """The model as exported (a classifier's padding row included)."""
    num_params: int
    dtype: str
    files: list[str]
    adapter_only: bool = False
    license: License | None = None
    base: BaseModel | None = None
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids."""
    tags: list[str] = field(default_factory=list)
    pad: PadToken | None = None


# -- the exporter ---------------------------------------------------------------------------------------


def export_hf(
    checkpoint: str | Path | Checkpoint,
    out_dir: str | Path,
    dtype: str = "float32",
    max_shard_size: int | str = "2GB",
    adapter_only: bool = False,
    license: str | None = None,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    tags: str | list[str] | None = None,
) -> Path:
    """Write ``checkpoint`` as a transformers model folder into ``out_dir``, an existing empty folder.

    Run it through :func:`lmforge.export.export` (``lmforge export --format hf``), which checks the
    checkpoint, creates the folder beside the final one and renames it into place when this returns.

    Args:
        checkpoint: A ``.ckpt`` written by ``lmforge fit`` (or a loaded :class:`~lmforge.export.Checkpoint`).
        out_dir: The (empty) folder to write into; its name is the model card's title.
        dtype: float32, float16 or bfloat16: the weights' type on disk.
        max_shard_size: Largest safetensors file (bytes, or e.g. "2GB", "500MB", "1GiB"); bigger models are
            sharded with an index, as transformers does.
        adapter_only: For LoRA fine-tunes: write the PEFT adapter only (the base model stays where it is).
        license: The model card's licence (a Hub licence id such as mit or apache-2.0). Default: the base
            model's, when its model card names one; else none, and the card says how to set one.
        base_model: The model the fine-tune started from, as the card and adapter_config.json name it: a Hub
            id (ORG/NAME) or a local folder (only its name is written). Default: the checkpoint's base.
        datasets: Hub dataset ids of the training data, for the card's metadata (default: the Hub datasets
            the run recorded). Other data is described from the checkpoint in the card's text.
        tags: Extra model card tags ("lmforge" is always there).
    """
    if dtype not in DTYPES:
        raise ExportError(f"exporter hf: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    license = _license_argument(license)
    datasets = _dataset_ids(datasets)
    tags = _as_list(tags, "tags")
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise ExportError(
            f"exporter hf: {out_dir} is not an empty folder; run the exporter through lmforge export "
            "(lmforge.export.export), which creates the folder and renames it into place"
        )
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    family = hf.family_of(ckpt.config)  # HFError naming what no transformers architecture expresses
    classify = ckpt.task == "classify"
    encoder = isinstance(ckpt.config, EncoderConfig)
    head = _classifier_head(ckpt) if classify else {}
    if adapter_only:
        _check_adapter(ckpt)
    base = base_reference(ckpt, base_model)
    pad = classifier_pad(ckpt) if classify and not encoder else None  # an encoder pools [CLS], not the last token
    config = replace(ckpt.config, vocab_size=ckpt.config.vocab_size + 1) if pad and pad.new_row else ckpt.config
    special = _special_tokens(ckpt.tokenizer, pad)
    tokenizer_json = _tokenizer_json(ckpt.tokenizer, pad)  # an unexportable tokenizer fails before any write
    facts = CardFacts(
        name=out_dir.name,
        family=family,
        config=config,
        num_params=0,
        dtype=dtype,
        files=[],
        adapter_only=adapter_only,
        license=License(license, "argument") if license else base_license(base),
        base=base,
        datasets=datasets or recorded_hub_datasets(ckpt),
        tags=tags,
        pad=pad,
    )

    if adapter_only:
        from lmforge.lora import write_peft_adapter

        facts.files = write_peft_adapter(
            ckpt.adapters,
            ckpt.config,
            ckpt.lora,
            out_dir,
            base_model_name_or_path=base.name if base else None,
            task_type="SEQ_CLS" if head else "FEATURE_EXTRACTION" if encoder else "CAUSAL_LM",
            modules_to_save=head or None,
        )
        facts.num_params = sum(t.numel() for t in hf.state_dict_to_hf(ckpt.state, ckpt.config, family).values())
    else:
        tensors = _hf_tensors(ckpt, config, family, head, DTYPES[dtype], pad)
        facts.num_params = sum(t.numel() for t in tensors.values())
        facts.files = write_safetensors(tensors, out_dir, shard_bytes)
        _write_json(out_dir / "config.json", hf_config(ckpt, config, family, special, dtype))
        if not classify and not encoder:
            _write_json(out_dir / "generation_config.json", generation_config(special))
    if tokenizer_json is not None:
        _write_tokenizer(ckpt, out_dir, tokenizer_json, special)
    model_card(ckpt, facts).save(str(out_dir / "README.md"))
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
    if isinstance(ckpt.config, EncoderConfig):
        return _encoder_classifier_head(ckpt)
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


def _encoder_classifier_head(ckpt: Checkpoint) -> dict[str, Tensor]:
    """BERT's ``classifier`` (on the pooled output) or DistilBERT's ``pre_classifier`` + ``classifier``, checked."""
    fam = families.family(hf.family_of(ckpt.config))
    C = ckpt.config.n_embd
    names = [f"{prefix}{kind}" for prefix in fam.head_tensors for kind in ("weight", "bias")]
    missing = [name for name in names if name not in ckpt.head]
    if missing:
        raise ExportError(
            f"exporter hf: {ckpt.path} is a {fam.display} classifier without {missing[0]}; was it saved by lmforge fit?"
        )
    others = sorted(set(ckpt.head) - set(names))
    if others:
        raise ExportError(f"exporter hf: classifier head tensors {others} have no {fam.classifier} counterpart")
    n = ckpt.head["classifier.weight"].shape[0]
    expected = {
        "classifier.weight": (n, C),
        "classifier.bias": (n,),
        "pre_classifier.weight": (C, C),
        "pre_classifier.bias": (C,),
    }
    for name in names:
        if tuple(ckpt.head[name].shape) != expected[name]:
            raise ExportError(
                f"exporter hf: {name} has shape {tuple(ckpt.head[name].shape)}; expected {expected[name]}"
            )
    if ckpt.labels is not None and len(ckpt.labels) != n:
        raise ExportError(f"exporter hf: {len(ckpt.labels)} labels but classifier.weight has {n} rows")
    return {name: ckpt.head[name] for name in names}


def num_labels(ckpt: Checkpoint) -> int:
    """The classes of a classifier checkpoint's head (0 for other checkpoints)."""
    if ckpt.labels:
        return len(ckpt.labels)
    for name in ("score.weight", "classifier.weight"):
        if name in ckpt.head:
            return int(ckpt.head[name].shape[0])
    return 0


def _hf_tensors(
    ckpt: Checkpoint,
    config: GPTConfig,
    family: str,
    head: dict[str, Tensor],
    dtype: torch.dtype,
    pad: PadToken | None = None,
) -> dict[str, Tensor]:
    state = dict(ckpt.state)
    if head:  # *ForSequenceClassification has no LM head
        state.pop("lm_head.weight", None)
    fam = families.family(family)
    dropped = fam.leaves_out(fam.architecture(bool(head), config))  # e.g. BertForMaskedLM has no pooler
    state = {k: v for k, v in state.items() if not k.startswith(dropped)} if dropped else state
    if pad is not None and pad.new_row:  # the padding token's row: zeros (no real token attends to a pad)
        wte = state["wte.weight"]
        state["wte.weight"] = torch.cat([wte, wte.new_zeros(1, wte.shape[1])])
    out = hf.state_dict_to_hf(state, config, family)
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


def _check_adapter(ckpt: Checkpoint) -> None:
    """Refuse an adapter-only export that would not reproduce the fine-tune."""
    if not (ckpt.lora and ckpt.adapters):
        raise ExportError(
            f"exporter hf: adapter_only=true but {ckpt.path} has no LoRA adapters; export it without adapter_only"
        )
    if ckpt.lora.get("train_also"):
        raise ExportError(
            f"exporter hf: {ckpt.path} also trained base weights (lora.train_also={ckpt.lora['train_also']!r}), "
            "which this PEFT adapter would not carry; export it merged (without adapter_only)"
        )


# -- config files ---------------------------------------------------------------------------------------


def _special_tokens(tokenizer, pad: PadToken | None = None) -> dict[str, Any]:
    """eos/bos/pad tokens and ids; bos is the tokenizer's own when it adds one, else eos (as GPT-2); pad is
    ``pad`` (a classifier's own padding token), else eos."""
    if tokenizer is None:
        return {}
    if isinstance(tokenizer, WordPieceTokenizer):  # BERT's five: [CLS] [SEP] [PAD] [MASK] [UNK]
        names = tokenizer.names
        return {"wordpiece": True, **names, "pad": names["pad_token"], "pad_id": tokenizer.pad_id}
    if isinstance(tokenizer, ByteTokenizer):
        eos, eos_id, bos, bos_id = EOS_TOKEN, tokenizer.eos_id, EOS_TOKEN, tokenizer.eos_id
    else:
        eos, eos_id = getattr(tokenizer, "eos_token", EOS_TOKEN), tokenizer.eos_id
        bos = getattr(tokenizer, "bos_token", None) or eos
        bos_id = getattr(tokenizer, "bos_id", None)
        bos_id = eos_id if bos_id is None else bos_id
    pad_token, pad_id = (pad.token, pad.id) if pad is not None else (eos, eos_id)
    return {"eos": eos, "eos_id": eos_id, "bos": bos, "bos_id": bos_id, "pad": pad_token, "pad_id": pad_id}


def hf_config(ckpt: Checkpoint, config: GPTConfig, family: str, special: dict, dtype: str) -> dict:
    """config.json: the architecture of ``config`` (:func:`lmforge.hf.config_to_hf`) plus what transformers
    reads beside it."""
    classify = ckpt.task == "classify"
    encoder = isinstance(config, EncoderConfig)
    values: dict[str, Any] = {"architectures": [families.family(family).architecture(classify, config)]}
    values.update(hf.config_to_hf(config, family))
    if special.get("wordpiece"):
        values.update(pad_token_id=special["pad_id"])
    elif special:
        values.update(bos_token_id=special["bos_id"], eos_token_id=special["eos_id"], pad_token_id=special["pad_id"])
    if classify:
        n = num_labels(ckpt)
        labels = ckpt.labels or [f"LABEL_{i}" for i in range(n)]
        values.update(
            num_labels=n,
            id2label={str(i): str(label) for i, label in enumerate(labels)},
            label2id={str(label): i for i, label in enumerate(labels)},
            problem_type="single_label_classification",
        )
    values.update(dtype=dtype, torch_dtype=dtype)
    if not encoder:
        values["use_cache"] = True
    version = _transformers_version()
    if version:
        values["transformers_version"] = version
    return values


def generation_config(special: dict) -> dict:
    """generation_config.json: the special token ids only. No ``max_length``: transformers warns on every
    ``generate(max_new_tokens=...)`` when both are set, and the context length is in config.json already."""
    values: dict[str, Any] = {}
    if special:
        values.update(bos_token_id=special["bos_id"], eos_token_id=special["eos_id"], pad_token_id=special["pad_id"])
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


def classifier_pad(ckpt: Checkpoint) -> PadToken | None:
    """The padding token an exported classifier gets, so that no real token is padding.

    transformers' ``*ForSequenceClassification`` pools each sequence at its last token that is not
    ``pad_token_id``; with the end-of-text token as padding, a text that ends in it is pooled one token early.
    The token is ``<|pad|>`` (added as a special token) with the first embedding row the tokenizer does not
    use, or a new row when the model has none to spare. None without a tokenizer.
    """
    tokenizer = ckpt.tokenizer
    rows = ckpt.config.vocab_size
    if isinstance(tokenizer, ByteTokenizer):
        vocab = {EOS_TOKEN: ByteTokenizer.eos_id}
        used = ByteTokenizer.vocab_size
    elif isinstance(tokenizer, HFTokenizer):
        vocab = tokenizer._tok.get_vocab(with_added_tokens=True)
        used = max(vocab.values(), default=-1) + 1
        special = set(tokenizer.special_tokens())
        for token in PAD_TOKENS:  # already a padding token of its own: keep it
            if token in special and vocab.get(token) not in (None, tokenizer.eos_id) and vocab[token] < rows:
                return PadToken(token, vocab[token], in_tokenizer=True, new_row=False)
    else:
        return None  # no tokenizer, or one with no Hugging Face form (refused when written)
    if used > rows:
        raise ExportError(
            f"exporter hf: the tokenizer has {used} tokens but the model only {rows} embedding rows; "
            "the checkpoint and its tokenizer do not belong together"
        )
    token = next((t for t in PAD_TOKENS if t not in vocab), None)
    if token is None:
        raise ExportError(f"exporter hf: the tokenizer has tokens {' and '.join(PAD_TOKENS)} that are not special")
    return PadToken(token, used, in_tokenizer=False, new_row=used == rows)


def _tokenizer_json(tokenizer, pad: PadToken | None = None) -> str | None:
    """tokenizer.json of ``tokenizer`` (with the padding token ``pad`` added), or None without a tokenizer."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, ByteTokenizer):
        text = byte_tokenizer_json()
    elif isinstance(tokenizer, HFTokenizer):  # WordPiece too
        text = tokenizer._tok.to_str(pretty=True)
    else:
        raise ExportError(
            f"exporter hf: tokenizer {type(tokenizer).__name__} has no Hugging Face form (bytes and hf/bpe do)"
        )
    if pad is not None and not pad.in_tokenizer:
        text = _with_special_token(text, pad.token, pad.id)
    return text


def _with_special_token(text: str, token: str, token_id: int) -> str:
    """tokenizer.json ``text`` with ``token`` added as a special token of id ``token_id``."""
    from tokenizers import Tokenizer

    values = json.loads(text)
    values.setdefault("added_tokens", []).append(
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    tok = Tokenizer.from_str(json.dumps(values, ensure_ascii=False))
    if tok.token_to_id(token) != token_id:
        raise AssertionError(f"tokenizer.json: {token} did not get id {token_id}")
    return tok.to_str(pretty=True)


def _write_wordpiece_files(ckpt: Checkpoint, folder: Path, special: dict) -> None:
    """BERT's tokenizer files beside tokenizer.json: vocab.txt, tokenizer_config.json (the BERT tokenizer class of
    the family, its lowercasing and special tokens, token types for BERT) and special_tokens_map.json."""
    tokenizer = ckpt.tokenizer
    vocab = tokenizer._tok.get_vocab(with_added_tokens=True)
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])),
                                      encoding="utf-8")  # fmt: skip
    normalizer = json.loads(tokenizer._tok.to_str()).get("normalizer") or {}
    lowercase = bool(normalizer.get("lowercase", False)) if normalizer.get("type") == "BertNormalizer" else False
    tokens = {key: special[key] for key in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token")}
    types = bool(getattr(ckpt.config, "type_vocab_size", 0))
    fam = families.family(hf.family_of(ckpt.config))
    config = {
        "tokenizer_class": fam.classifier.removesuffix("ForSequenceClassification") + "Tokenizer",
        "do_lower_case": lowercase,
        **tokens,
        "model_max_length": ckpt.config.block_size,
        "model_input_names": ["input_ids", *(["token_type_ids"] if types else []), "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", tokens)


def _write_tokenizer(ckpt: Checkpoint, folder: Path, text: str, special: dict) -> None:
    """tokenizer.json (``text``), tokenizer_config.json and special_tokens_map.json."""
    tokenizer = ckpt.tokenizer
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    if special.get("wordpiece"):
        _write_wordpiece_files(ckpt, folder, special)
        return
    tokens = {"bos_token": special["bos"], "eos_token": special["eos"], "pad_token": special["pad"]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "model_max_length": ckpt.config.block_size,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: neither GPT-2 nor Llama uses them
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


# -- the base model, the licence and the data -----------------------------------------------------------


def _as_list(value, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ExportError(f"exporter hf: {name}={value!r} must be a string or a list of strings")


def _license_argument(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[\w.\-+]+", value.strip()):
        raise ExportError(
            f"exporter hf: license={value!r} is not a Hub licence id (such as mit, apache-2.0 or cc-by-4.0)"
        )
    return value.strip()


def _dataset_ids(value: Any) -> list[str]:
    ids = _as_list(value, "datasets")
    for dataset in ids:
        if not _HUB_ID.fullmatch(dataset) or Path(dataset).suffix.lower() in _DATA_FILES:
            raise ExportError(
                f"exporter hf: datasets={dataset!r} is not a Hub dataset id (ORG/NAME); the card describes "
                "local training data from what the checkpoint recorded"
            )
    return ids


def recorded_hub_datasets(ckpt: Checkpoint) -> list[str]:
    """The Hugging Face dataset ids the run recorded that it trained on."""
    found = (ckpt.data or {}).get("hub_datasets") or []
    return [d for d in found if isinstance(d, str) and _HUB_ID.fullmatch(d)] if isinstance(found, list) else []


def _hub_cache_id(path: Path) -> str | None:
    """``owner/name`` for a snapshot folder of the Hugging Face cache (``models--owner--name/snapshots/SHA``)."""
    path = path.resolve()
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    repo_id = "/".join(repo.removeprefix("models--").split("--"))
    return repo_id if _HUB_ID.fullmatch(repo_id) else None


def base_reference(ckpt: Checkpoint, base_model: str | None = None) -> BaseModel | None:
    """The base model of ``ckpt`` as the export names it: ``base_model`` when given, else the recorded base.

    A Hub id is used as it is; a local folder or file only by its name (a snapshot of the Hub cache by the
    Hub id it came from). None for a model trained from scratch.
    """
    recorded = ckpt.base or {}
    if base_model is not None:
        if not isinstance(base_model, str) or not base_model.strip():
            raise ExportError(f"exporter hf: base_model={base_model!r} must be a Hub id (ORG/NAME) or a local folder")
        same = base_model == recorded.get("source")
        return _base_named(
            base_model.strip(), recorded.get("kind") if same else None, recorded.get("revision") if same else None, True
        )
    source = recorded.get("source")
    if not source:
        return None
    return _base_named(str(source), recorded.get("kind"), recorded.get("revision"), False)


def _base_named(source: str, kind: str | None, revision: str | None, given: bool) -> BaseModel:
    path = Path(source).expanduser()
    if path.exists():
        hub_id = _hub_cache_id(path) if path.is_dir() else None
        kind = "hf" if hf.is_hf_folder(path) else "lmforge"
        return BaseModel(hub_id or path.resolve().name, hub_id, kind, revision, path)
    if kind in (None, "hf") and _HUB_ID.fullmatch(source):
        return BaseModel(source, source, "hf", revision)
    if given:
        raise ExportError(f"exporter hf: base_model={source!r} is neither a Hub id (ORG/NAME) nor an existing folder")
    return BaseModel(Path(source).name or source, None, kind or "lmforge", revision)  # a local base gone since


def base_license(base: BaseModel | None) -> License | None:
    """The licence the base model's card names: the card in its local folder, or a Hub card in the local
    Hugging Face cache (nothing is downloaded)."""
    if base is None:
        return None
    cards: list[Path] = []
    if base.local is not None and base.local.is_dir():
        cards.append(base.local / "README.md")
    if base.hub_id:
        cached = _cached_hub_card(base.hub_id, base.revision)
        if cached is not None:
            cards.append(cached)
    for card in cards:
        values = card_metadata(card)
        found = card_license(values)
        if found:
            name, link = values.get("license_name"), values.get("license_link")
            return License(found, "base", str(name) if name else None, str(link) if link else None)
    return None


def _cached_hub_card(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "README.md", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


# -- the model card -------------------------------------------------------------------------------------


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


def _eval_rows(metrics: dict) -> list[tuple[str, str, float]]:
    """(stage, metric, value) of the evaluation metrics: val/ and test/ losses, perplexities, accuracies, F1 and
    the like. Training metrics, learning rates and throughput are not evaluations of the model."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        stage, _, name = key.rpartition("/")
        if stage in _SPLITS and _EVAL_METRIC.fullmatch(name):
            rows.append((stage, name, float(value)))
    return rows


def _eval_results(ckpt: Checkpoint, datasets: list[str], pipeline_tag: str):
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=datasets[0] if datasets else "custom",
            dataset_name=datasets[0] if datasets else "held-out data",
            dataset_split=_SPLITS[stage],
            metric_type=_METRIC_TYPES.get(name, name),
            metric_name=f"{stage}/{name}",
            metric_value=round(value, 6),
        )
        for stage, name, value in _eval_rows(ckpt.metrics)
    ]


def model_card(ckpt: Checkpoint, facts: CardFacts):
    """The README.md: Hub metadata (ModelCardData) and a body describing the model, its training and its use."""
    from huggingface_hub import ModelCard, ModelCardData

    config = facts.config
    classify = ckpt.task == "classify"
    encoder = isinstance(config, EncoderConfig)
    pipeline_tag = "text-classification" if classify else "fill-mask" if encoder else "text-generation"
    extra_tags = (["lora"] if ckpt.lora else []) + (["peft"] if facts.adapter_only else [])
    card_tags = list(dict.fromkeys(["lmforge", facts.family, pipeline_tag, *extra_tags, *facts.tags]))
    results = _eval_results(ckpt, facts.datasets, pipeline_tag)
    licence = facts.license
    data = ModelCardData(
        library_name="peft" if facts.adapter_only else "transformers",
        license=licence.id if licence else None,
        license_name=licence.name if licence else None,
        license_link=licence.link if licence else None,
        tags=card_tags,
        datasets=facts.datasets or None,
        base_model=facts.base.hub_id if facts.base else None,
        pipeline_tag=pipeline_tag,
        model_name=facts.name,
        eval_results=results or None,
        metrics=sorted({r.metric_type for r in results}) or None,
        co2_eq_emissions=_co2_metadata(ckpt),
    )
    train = training_facts(ckpt)
    arch = families.family(facts.family).display
    lines = [f"# {facts.name}", "", summary(ckpt, facts), *_base_note(facts)]
    if classify and ckpt.labels:
        lines += ["", "Labels (id: name): " + ", ".join(f"{i}: `{label}`" for i, label in enumerate(ckpt.labels)) + "."]
    if facts.pad is not None:
        lines += ["", _pad_note(facts)]
    lines += [
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| family | {arch} (`{facts.family}`) |",
        *(_encoder_rows(config) if encoder else _decoder_rows(config, facts)),
        f"| parameters | {facts.num_params:,} |",
        "",
        "## Training data",
        "",
        *_data_lines(ckpt, facts.datasets),
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| task | {ckpt.task} |",
        f"| steps | {train['steps']:,} |",
        f"| optimizer | {_describe_plugin(train['optimizer'])} |",
        f"| scheduler | {_describe_plugin(train['scheduler'])} |",
    ]
    for key, label in (
        ("batch_size", "batch size"),
        ("seq_len", "sequence length"),
        ("accumulate", "gradient accumulation"),
        ("precision", "precision"),
    ):
        if train.get(key) is not None:
            lines.append(f"| {label} | {train[key]} |")
    if ckpt.lora:
        lora = ", ".join(f"{k}={v}" for k, v in ckpt.lora.items())
        lines.append(f"| LoRA | {lora} |")
    hardware = train.get("hardware")
    if hardware is None and train.get("accelerator") not in (None, "auto"):
        hardware = f"{train['accelerator']} x {train.get('devices') or 1}"
    lines += ["", f"Hardware: {hardware if hardware is not None else 'not recorded in the checkpoint'}."]
    seen = _tokens_seen(train)
    lines += ["", "### Compute (estimate)", ""]
    if seen:
        tokens, how = seen
        flops = 6 * facts.num_params * tokens
        lines.append(
            f"About {_fmt_count(tokens)} training tokens ({how}), so an estimated 6 x {facts.num_params:,} "
            f"parameters x {tokens:,} tokens = {flops:.2e} FLOPs (an estimate: padding, evaluation and "
            "recomputation are not counted)."
        )
    else:
        lines.append(
            "Not estimated: the checkpoint does not record the batch size and sequence length "
            "(the estimate would be 6 x parameters x training tokens)."
        )
    lines += _measured_lines(ckpt)
    lines += ["", "## How to use", "", "```python", *usage(ckpt, facts), "```"]
    if ckpt.tokenizer is None:
        lines += ["", "No tokenizer was saved with the checkpoint: tokenize the input as it was in training."]
    elif isinstance(ckpt.tokenizer, ByteTokenizer):
        lines += [
            "",
            "The tokenizer is lmforge's byte tokenizer: token ids 0-255 are the UTF-8 bytes of the text and "
            "256 is `<|endoftext|>`.",
        ]
    rows = _eval_rows(ckpt.metrics)
    lines += _memorization_lines(ckpt)
    lines += ["", "## Evaluation", ""]
    if rows:
        lines += ["| split | metric | value |", "|---|---|---|"]
        lines += [f"| {_SPLITS[stage]} | {metric} | {value:.4f} |" for stage, metric, value in rows]
    else:
        lines.append("The checkpoint records no evaluation metrics.")
    lines += ["", "## Files", "", "Weights: " + ", ".join(f"`{f}`" for f in facts.files) + "."]
    lines += ["", "## License", "", _license_text(facts)]
    body = "\n".join(lines) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _memorization_lines(ckpt: Checkpoint) -> list[str]:
    """The card's "Memorization" section: the canaries the run put into its text (data.canaries) and, when
    ``lmforge evaluate --task memorization`` wrote its results beside the run (``<run>/eval/``), their exposure."""
    settings = (ckpt.data or {}).get("canaries")
    if not settings:
        return []
    lines = ["", "## Memorization", "", f"The training text held {settings.get('count')} canaries (random secrets "
             f"put in on purpose, repeated {settings.get('repeats')} times; Carlini et al. 2019)."]  # fmt: skip
    results = None
    if ckpt.path and ckpt.path.parent.name == "checkpoints":
        found = ckpt.path.parent.parent / "eval" / "memorization-canaries.json"
        if found.is_file():
            try:
                results = json.loads(found.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                results = None
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict):
        lines.append("Their exposure was not measured (`lmforge evaluate CKPT --task memorization`).")
        return lines
    metrics = results["metrics"]
    lines += ["", "| repeats | mean exposure (bits) | extracted by greedy decoding |", "|---|---|---|"]
    for repeats in settings.get("repeats") or []:
        if f"exposure@{repeats}" in metrics:
            lines.append(f"| {repeats} | {metrics[f'exposure@{repeats}']:.2f} of {metrics.get('max_exposure', 0):.2f} | "
                         f"{100 * metrics.get(f'extracted@{repeats}', 0):.0f}% |")  # fmt: skip
    return lines


def _measured(ckpt: Checkpoint) -> dict:
    """What the run's EnergyMeter recorded (empty for runs before it, or without it)."""
    measured = ckpt.run.get("measured")
    return measured if isinstance(measured, dict) else {}


def _co2_metadata(ckpt: Checkpoint) -> dict | None:
    """The Hub's ``co2_eq_emissions`` (grams), when the run measured its energy and was given a grid intensity."""
    measured = _measured(ckpt)
    if measured.get("co2_g") is None:
        return None
    sources = " + ".join(measured.get("energy_sources") or [])
    return {
        "emissions": round(float(measured["co2_g"]), 3),
        "source": f"measured by lmforge's EnergyMeter ({sources} energy counters x PUE {measured.get('pue', 1.0):g} "
        f"x {measured['grid_g_per_kwh']:g} g CO2eq/kWh)",
        "training_type": "pre-training" if ckpt.task in ("lm", "masked_lm") else "fine-tuning",
        "hardware_used": str(ckpt.run.get("hardware") or "not recorded"),
    }


def _measured_lines(ckpt: Checkpoint) -> list[str]:
    """The card's "Compute (measured)" section: what the run's EnergyMeter recorded."""
    measured = _measured(ckpt)
    if not measured:
        return []

    lines = [
        "",
        "### Compute (measured)",
        "",
        "| | |",
        "|---|---|",
        f"| training time | {measured['seconds']:,.1f} s |",
    ]
    if measured.get("energy_kwh") is not None:
        sources = " + ".join(measured.get("energy_sources") or [])
        lines.append(
            f"| energy | {measured['energy_kwh']:.4g} kWh ({sources} counters, PUE {measured.get('pue', 1.0):g}) |"
        )
    else:
        lines.append("| energy | not measured (no readable GPU or RAPL energy counter) |")
    if measured.get("co2_g") is not None:
        lines.append(f"| CO2eq | {measured['co2_g']:.4g} g (at {measured['grid_g_per_kwh']:g} g/kWh) |")
    if measured.get("peak_memory_bytes"):
        lines.append(
            f"| peak memory | {measured['peak_memory_bytes'] / 2**30:.2f} GiB ({measured.get('peak_memory_what')}) |"
        )
    if (measured.get("ranks") or 1) > 1:
        lines.append(f"| processes | {measured['ranks']} (energy summed, peak memory the largest) |")
    return lines


_PREFERENCE_NAMES = {"dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "orpo": "ORPO"}


def _decoder_rows(config: GPTConfig, facts: CardFacts) -> list[str]:
    """The architecture table's rows for a decoder."""
    added_row = " (one row added for the padding token)" if facts.pad and facts.pad.new_row else ""
    positions = f"rotary (theta {config.rope_theta:g})" if config.pos_encoding == "rope" else "learned"
    window = [f"| sliding window | {config.sliding_window} tokens |"] if config.sliding_window else []
    return [
        f"| layers | {config.n_layer} |",
        f"| width (n_embd) | {config.n_embd} |",
        f"| attention heads | {config.n_head} |",
        f"| key/value heads | {config.kv_heads}{' (grouped-query)' if config.kv_heads != config.n_head else ''} |",
        f"| MLP hidden width | {config.mlp_width} ({config.mlp}) |",
        f"| context length | {config.block_size} |",
        *window,
        f"| vocabulary | {config.vocab_size}{added_row} |",
        f"| positions | {positions} |",
        f"| norm | {config.norm} (eps {config.norm_eps:g}) |",
        f"| tied embeddings | {'yes' if config.tie_embeddings else 'no'} |",
    ]


def _encoder_rows(config: EncoderConfig) -> list[str]:
    """The architecture table's rows for an encoder."""
    heads = ["masked-LM (tied to the word embedding)", *(["pooler"] if config.pooler else [])]
    heads += ["next-sentence"] if config.nsp else []
    return [
        "| attention | bidirectional (encoder) |",
        f"| layers | {config.n_layer} |",
        f"| width (hidden size) | {config.n_embd} |",
        f"| attention heads | {config.n_head} |",
        f"| MLP hidden width | {config.mlp_width} ({config.activation}) |",
        f"| positions | {config.max_positions} learned |",
        f"| token types | {config.type_vocab_size or 'none'} |",
        f"| vocabulary | {config.vocab_size} |",
        f"| norm | LayerNorm {config.norm_position} (eps {config.norm_eps:g}) |",
        f"| pretraining heads | {', '.join(heads)} |",
    ]


def summary(ckpt: Checkpoint, facts: CardFacts) -> str:
    """The card's first sentence: what the model is, what it was trained from and how, and where it came from."""
    fam = families.family(facts.family)
    arch = fam.display
    size = f"{_fmt_count(facts.num_params)}-parameter {arch}-architecture"
    base = f"`{facts.base.name}`" if facts.base else None
    weights = "LoRA" if ckpt.lora else "all weights"
    tool = f"with lmforge {lmforge.__version__}"
    origin = f"`{ckpt.path.name}` at step {ckpt.global_step}" if ckpt.path else f"step {ckpt.global_step}"
    n_labels = num_labels(ckpt)
    encoder = isinstance(ckpt.config, EncoderConfig)
    lm = "masked language model" if encoder else "language model"
    if facts.adapter_only:
        what = (
            f"A LoRA adapter (PEFT format) with a {n_labels}-label classification head"
            if n_labels
            else "A LoRA adapter (PEFT format)"
        )
        how = {"sft": "trained by supervised fine-tuning (SFT)", "classify": "trained for text classification",
               "preference": "trained by preference tuning"}  # fmt: skip
        return (
            f"{what} for {base or 'its base model'}, a {size} {lm}, "
            f"{how.get(ckpt.task, 'trained further on text')} {tool} and exported from {origin}."
        )
    if ckpt.task == "classify":
        what = f"A {size} text classifier with {n_labels} labels"
        how = (
            f": {base} fine-tuned for classification ({weights}) {tool},"
            if base
            else f", trained for classification {tool} and"
        )
    elif ckpt.task == "sft":
        what = f"A {size} language model"
        how = (
            f": {base} after supervised fine-tuning (SFT, {weights}) {tool},"
            if base
            else f", trained by supervised fine-tuning (SFT) {tool} and"
        )
    elif ckpt.task == "preference":
        what = f"A {size} language model"
        method = _PREFERENCE_NAMES.get(str(ckpt.hparams.get("loss", "dpo")), str(ckpt.hparams.get("loss")))
        beta = ckpt.hparams.get("beta")
        method += f", beta {beta:g}" if isinstance(beta, (int, float)) else ""
        how = (
            f": {base} after preference tuning ({method}; {weights}) {tool},"
            if base
            else f", trained by preference tuning ({method}) {tool} and"
        )
    elif ckpt.task == "masked_lm":
        what = f"A {size} {lm}"
        nsp = " and next-sentence prediction" if getattr(ckpt.config, "nsp", False) else ""
        how = f", pretrained from scratch by masked-language modelling{nsp} {tool} and"
    else:
        what = f"A {size} language model"
        how = (
            f": {base} after further pretraining ({weights}) {tool},"
            if base
            else f", pretrained from scratch {tool} and"
        )
    return (
        f"{what}{how} exported to transformers format (`{fam.architecture(ckpt.task == 'classify', ckpt.config)}`, "
        f"{facts.dtype} weights) from {origin}."
    )


def _base_note(facts: CardFacts) -> list[str]:
    """How to find the base model: an adapter needs it, and a local base is named without its path."""
    base = facts.base
    if base is None:
        if facts.adapter_only:
            return [
                "",
                "The checkpoint does not record its base model: set `base_id` below to the model it was trained from.",
            ]
        return []
    if base.hub_id:
        if not facts.adapter_only:
            return []
        link = f"[`{base.hub_id}`](https://huggingface.co/{base.hub_id})"
        return ["", f"This folder holds only the LoRA adapter: load it on top of {link}, as below."]
    target = base.transformers_name
    if base.kind == "hf":
        what, hint = "local folder", ""
    else:
        checkpoint = Path(base.name).suffix == ".ckpt"
        what = "lmforge checkpoint" if checkpoint else "lmforge export"
        source, ckpt = (base.name, base.name) if checkpoint else ("the checkpoint it was exported from", "CKPT")
        hint = f", which transformers does not read: export {source} with `lmforge export {ckpt} --to {target} --format hf`"
    if not facts.adapter_only:
        return [
            "",
            f"The base model was the {what} `{base.name}`, not a model on the Hub; exporting with "
            "`--arg base_model=ORG/NAME` names its Hub id here (and links it on the Hub).",
        ]
    return [
        "",
        f"This folder holds only the LoRA adapter. Its base model is the {what} `{base.name}`{hint}; set "
        f"`base_id` in the snippet below to the path of `{target}` (or to its Hub id once uploaded). Exporting "
        "with `--arg base_model=ORG/NAME` names the base's Hub id here and in adapter_config.json.",
    ]


def _pad_note(facts: CardFacts) -> str:
    pad = facts.pad
    text = (
        f"Padding token: `{pad.token}` (id {pad.id}), a token of its own: transformers pools each text at its last "
        "token that is not padding, so padding with the end-of-text token would pool a text that ends in it "
        "one token early."
    )
    if pad.new_row and facts.adapter_only:
        text += (
            " The base model has no embedding row for it: the snippet adds one (`resize_token_embeddings`); "
            "no real token attends to it."
        )
    elif pad.new_row:
        text += " The embedding has one row more than the checkpoint's for it (no real token attends to it)."
    return text


_FILE_ROLES = {"train": "training", "val": "validation", "test": "test"}


def _data_lines(ckpt: Checkpoint, datasets: list[str]) -> list[str]:
    """What the model was trained on, from what the checkpoint recorded (local paths are file names there)."""
    data = dict(ckpt.data or {})
    lines = []
    if ckpt.base and data:
        lines += ["The fine-tuning data (the base model's card describes what the base was trained on):", ""]
    if datasets:
        lines.append(
            "- Hugging Face datasets: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets)
        )
    spec = data.pop("dataset", None)
    if isinstance(spec, dict) and spec.get("name"):
        args = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
        lines.append(f"- dataset plugin: `{spec['name']}`" + (f" ({args})" if args else ""))
    elif spec is not None:
        lines.append(f"- dataset: `{spec}`")
    files = data.pop("files", None)
    if isinstance(files, dict) and files:
        lines.append("- files: " + ", ".join(f"{_FILE_ROLES.get(k, k)} `{v}`" for k, v in files.items() if v))
    description = data.pop("description", None)
    data.pop("hub_datasets", None)
    pipeline, report = data.pop("pipeline", None), data.pop("pipeline_report", None)
    if isinstance(pipeline, list) and pipeline:
        lines += _cleaning_lines(pipeline, report if isinstance(report, list) else [])
    lines += [f"- {key}: {value}" for key, value in data.items() if value not in (None, "", [], {})]
    if description:
        lines += ["", str(description).strip()]
    if not ckpt.data:
        lines += [
            *([""] if lines else []),
            "The checkpoint does not record what the model was trained on (it was written before lmforge "
            "recorded it, or by a data module that does not describe its data).",
        ]
    return lines


def _cleaning_lines(pipeline: list, report: list) -> list[str]:
    """The card's lines on ``data.pipeline``: the steps with their options, then what each did (documents and bytes
    in and out, what it removed and why, duplicate clusters, PII redactions by type)."""
    from lmforge.data.pipeline import summary_line

    def described(step: Any) -> str:
        if not isinstance(step, dict):
            return f"`{step}`"
        options = ", ".join(f"{k}={v}" for k, v in step.items() if k != "name")
        return f"`{step.get('name')}`" + (f" ({options})" if options else "")

    lines = ["- cleaned before tokenizing (`data.pipeline`): " + " -> ".join(described(s) for s in pipeline)]
    for entry in report:
        try:
            lines.append("  - " + summary_line(entry).removeprefix("pipeline "))
        except (KeyError, TypeError):  # a report from another version: leave it out rather than guess
            continue
    return lines


def _license_text(facts: CardFacts) -> str:
    licence = facts.license
    if licence is None:
        return (
            "No licence was given for this model, so this card names none. Choose one and set it when exporting "
            "with `--arg license=mit` (any Hub licence id), or add a `license:` line to the YAML header above."
        )
    named = f"`{licence.id}`"
    if licence.name:
        named += f" ([{licence.name}]({licence.link}))" if licence.link else f" ({licence.name})"
    if licence.source == "base" and facts.base is not None:
        what = "adapter" if facts.adapter_only else "model"
        return (
            f"{named}: the licence the model card of the base model `{facts.base.name}` names; check that its terms "
            f"cover this {what} and its use. Exporting with `--arg license=...` sets another."
        )
    return f"{named}, as chosen at export."


def usage(ckpt: Checkpoint, facts: CardFacts) -> list[str]:
    """The "How to use" snippet: Python that runs as it is, with the export's folder (and an adapter's base)
    where the snippet's ids say."""
    classify = ckpt.task == "classify"
    adapter = facts.adapter_only
    tokenizer = ckpt.tokenizer is not None
    encoder = isinstance(ckpt.config, EncoderConfig)
    if encoder and not classify:
        return _masked_lm_usage(ckpt, facts)
    auto = "AutoModelForSequenceClassification" if classify else "AutoModelForCausalLM"
    pipe = classify and tokenizer and not adapter
    names = ["pipeline"] if pipe else [auto, *(["AutoTokenizer"] if tokenizer else [])]
    lines = ["import torch"] if not tokenizer or (classify and adapter) else []
    lines += ["from peft import PeftModel"] if adapter else []
    lines += [f"from transformers import {', '.join(names)}", ""]
    model_id = "adapter_id" if adapter else "model_id"
    if adapter:
        base = facts.base.transformers_name if facts.base else "BASE_MODEL"
        lines.append(f"base_id = {_py_str(base)}  # the base model: its Hub id, or the path of its transformers folder")
    lines.append(f"{model_id} = {_py_str(facts.name)}  # this folder, or its Hub id once uploaded")
    if tokenizer and not pipe:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({model_id})")
    if adapter and classify:
        n = num_labels(ckpt)
        labels = dict(enumerate(ckpt.labels or [f"LABEL_{i}" for i in range(n)]))
        new_row = facts.pad is not None and facts.pad.new_row  # the base has no row for it: add one first
        lines += [
            f"labels = {labels!r}",
            f"base = {auto}.from_pretrained(",
            "    base_id,",
            "    num_labels=len(labels),",
            "    id2label=labels,",
            "    label2id={name: i for i, name in labels.items()},",
            *(["    pad_token_id=tokenizer.pad_token_id,"] if tokenizer and not new_row else []),
            ")",
        ]
        if new_row:
            lines += [
                "base.resize_token_embeddings(len(tokenizer))  # a row for the padding token",
                "base.config.pad_token_id = tokenizer.pad_token_id",
            ]
        lines.append("model = PeftModel.from_pretrained(base, adapter_id).eval()")
    elif adapter:
        lines += [
            f"base = {auto}.from_pretrained(base_id)",
            "model = PeftModel.from_pretrained(base, adapter_id).eval()",
        ]
    elif not pipe:
        lines.append(f"model = {auto}.from_pretrained(model_id).eval()")
    ids = "input_ids = torch.tensor([[0, 1, 2]])  # token ids, from the tokenizer the model was trained with"
    if pipe:
        lines += ['classifier = pipeline("text-classification", model=model_id)', f"print(classifier({_TEXTS!r}))"]
    elif classify and tokenizer:
        lines += [
            f'inputs = tokenizer({_TEXTS!r}, padding=True, return_tensors="pt")',
            "with torch.no_grad():",
            "    probs = model(**inputs).logits.softmax(-1)",
            "print([labels[int(i)] for i in probs.argmax(-1)])",
        ]
    elif classify:
        lines += [
            ids,
            "with torch.no_grad():",
            "    probs = model(input_ids).logits.softmax(-1)[0]",
            "print({model.config.id2label[i]: round(float(p), 3) for i, p in enumerate(probs)})",
        ]
    elif tokenizer:
        lines += [
            f'inputs = tokenizer({_py_str(_PROMPT)}, return_tensors="pt")',
            f"out = model.generate(**inputs, max_new_tokens={_new_tokens(ckpt)}, do_sample=True, top_k=50)",
            "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        ]
    else:
        lines += [
            ids,
            "mask = torch.ones_like(input_ids)",
            f"out = model.generate(input_ids, attention_mask=mask, max_new_tokens={_new_tokens(ckpt)}, do_sample=True)",
            "print(out[0].tolist())",
        ]
    return lines


def _masked_lm_usage(ckpt: Checkpoint, facts: CardFacts) -> list[str]:
    """The snippet of a masked LM: the fill-mask pipeline, or the logits at a [MASK] without a tokenizer."""
    lines = []
    if ckpt.tokenizer is not None:
        mask = ckpt.tokenizer.names["mask_token"] if isinstance(ckpt.tokenizer, WordPieceTokenizer) else "[MASK]"
        return [
            "from transformers import pipeline",
            "",
            f"model_id = {_py_str(facts.name)}  # this folder, or its Hub id once uploaded",
            'fill = pipeline("fill-mask", model=model_id)',
            f"print(fill({_py_str(f'The old man walked to the {mask}.')}))",
        ]
    lines += [
        "import torch",
        "from transformers import AutoModelForMaskedLM",
        "",
        f"model_id = {_py_str(facts.name)}  # this folder, or its Hub id once uploaded",
        "model = AutoModelForMaskedLM.from_pretrained(model_id).eval()",
        "input_ids = torch.tensor([[0, 1, 2]])  # token ids, from the tokenizer the model was trained with",
        "with torch.no_grad():",
        "    logits = model(input_ids).logits",
        "print(logits.argmax(-1).tolist())",
    ]
    return lines


def _py_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a Python string literal


def _new_tokens(ckpt: Checkpoint) -> int:
    """Tokens the snippet generates: 50, or fewer when the prompt and they would not fit in the context."""
    tokenizer = ckpt.tokenizer
    prompt = len(tokenizer.encode(_PROMPT)) + (getattr(tokenizer, "bos_id", None) is not None) if tokenizer else 3
    return max(1, min(50, ckpt.config.block_size - prompt))


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
