"""The ``gguf`` exporter: an lmforge checkpoint as one GGUF file for llama.cpp.

It writes what llama.cpp's convert_hf_to_gguf.py writes for the same model in Hugging Face form: the
architecture is the one the model's family names (:data:`lmforge.families.FAMILIES`), and the tensors are
the family's Hugging Face tensors (its weight template, fused parts concatenated) renamed by gguf-py's own
map of Hugging Face names (``gguf.TensorNameMap``), so that:

- GPT-2 family models (learned positions, LayerNorm, GELU) as the ``gpt2`` architecture: q, k and v
  fused into ``attn_qkv`` (in that order, weights and biases), every bias present (zeros for a model
  trained without biases: llama.cpp's gpt2 requires them, and a zero bias is the same function);
- Llama family models (RoPE, RMSNorm, SwiGLU) as the ``llama`` architecture: separate ``attn_q``,
  ``attn_k`` and ``attn_v``, the q and k rows permuted from the rotate-half RoPE layout lmforge (and
  Hugging Face) use to GGML's interleaved pairs, as ``LlamaModel.permute`` does. Mistral models are
  ``llama`` too, as convert_hf_to_gguf.py writes them: only those whose sliding window spans the whole
  context, since llama.cpp's llama attends to every earlier token;
- Qwen2 models (the Llama family with biases on q, k and v alone) as the ``qwen2`` architecture, whose
  RoPE is rotate-half: q and k are stored as they are, with their biases.

Tensor types follow convert_hf_to_gguf.py: norms, biases, other 1-D tensors and the position
embedding stay F32; 2-D weights take the requested type, and for q8_0 a matrix whose rows do not
split into 32-value blocks falls back to F16. A tied output head is not stored (llama.cpp reuses
``token_embd``).

The exporter writes the file into ``out_dir``, an empty folder that lmforge (``lmforge export``, or
``lmforge.export.export``) created beside ``--to`` and renames to it once the exporter returns, so a failed
export leaves nothing behind. Everything that can be refused is checked before the file is opened.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType

from lmforge.export import read_checkpoint
from lmforge.families import FAMILIES, Family, claimant, shapes
from lmforge.model import GPTConfig
from lmforge_gguf.errors import GGUFError
from lmforge_gguf.vocab import Vocab, vocab_for

DTYPES: dict[str, tuple[gguf.LlamaFileType, QType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
}
"""dtype argument -> (general.file_type, the type of 2-D weight matrices)."""


_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
"""llama.cpp architecture name -> gguf.MODEL_ARCH."""


def _families_by_arch() -> dict[gguf.MODEL_ARCH, Family]:
    """llama.cpp architecture -> the lmforge family it computes (the first, where several name one)."""
    out: dict[gguf.MODEL_ARCH, Family] = {}
    for fam in FAMILIES.values():
        if fam.gguf_arch:
            out.setdefault(_BY_NAME[fam.gguf_arch], fam)
    return out


_FAMILIES = _families_by_arch()
ARCHS: dict[gguf.MODEL_ARCH, dict[str, str]] = {
    arch: dict(fam.features) for arch, fam in _FAMILIES.items() if fam.claims is None
}
"""The llama.cpp architectures of the families that claim nothing, and the lmforge model options each one
computes; the families that claim models with those options (Qwen2, Mistral) have their own (see choose_arch)."""

_ALL_BIASES = {gguf.MODEL_ARCH.GPT2}
"""llama.cpp architectures that require every bias (zeros compute the same function as none)."""
_INTERLEAVED_ROPE = {gguf.MODEL_ARCH.LLAMA}
"""llama.cpp architectures whose RoPE rotates interleaved pairs: q and k rows are permuted (LlamaModel.permute)."""


def export_gguf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "f16", filename: str | None = None) -> Path:
    """Write the model of ``checkpoint`` as ``out_dir/<name>.gguf``, into the existing empty folder ``out_dir``.

    Run it through ``lmforge.export.export`` (``lmforge export --format gguf``), which checks the checkpoint,
    creates the folder beside the final one and renames it into place when this returns.

    Args:
        checkpoint: A .ckpt written by ``lmforge fit``.
        out_dir: The (empty) folder to write into.
        dtype: Type of the 2-D weight matrices: f32, f16, bf16 or q8_0 (norms and biases stay f32).
        filename: Name of the file in ``out_dir``; default ``<run>-<dtype>.gguf``, where <run> is the run
            folder of ``runs/<run>/checkpoints/*.ckpt`` (else the checkpoint's file name).
    """
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in DTYPES:
        raise GGUFError(f"exporter gguf: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise GGUFError(
            f"exporter gguf: {out_dir} is not an empty folder; run the exporter through lmforge export "
            "(lmforge.export.export), which creates the folder and renames it into place"
        )
    name = model_name(checkpoint)
    file = _file_name(filename if filename is not None else f"{name}-{key}")
    file_type, matrix_type = DTYPES[key]

    # everything that can fail on the model is checked before anything is created
    config, state, tokenizer = read_checkpoint(checkpoint)
    arch = choose_arch(config)
    vocab = vocab_for(tokenizer, config.vocab_size)
    tensors = [(n, *encode(n, data, matrix_type)) for n, data in gguf_tensors(config, state, arch)]

    writer = _Writer(out_dir / file, gguf.MODEL_ARCH_NAMES[arch])
    try:
        _add_metadata(writer, config, name, file_type, vocab)
        for tensor_name, data, qtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out_dir


def model_name(checkpoint: str | Path) -> str:
    """``gpt-small`` for ``runs/gpt-small/checkpoints/last.ckpt``; the file's stem for other paths."""
    path = Path(checkpoint).absolute()
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return path.parent.parent.name
    return path.stem


def _file_name(filename: Any) -> str:
    if not isinstance(filename, str) or filename in ("", ".", "..") or "/" in filename or os.sep in filename:
        raise GGUFError(f"exporter gguf: filename={filename!r} must be a plain file name (it goes inside out_dir)")
    return filename if filename.endswith(".gguf") else filename + ".gguf"


def choose_arch(config: GPTConfig) -> gguf.MODEL_ARCH:
    """gpt2, llama or qwen2, whichever computes exactly this model; a GGUFError naming what none can express."""
    if not isinstance(config, GPTConfig):  # an encoder (BERT, DistilBERT): llama.cpp runs decoders here
        raise GGUFError(
            f"exporter gguf: the checkpoint holds an encoder ({type(config).__name__}); GGUF export is for decoder "
            "language models (gpt2, llama, qwen2); export encoders with --format hf"
        )
    refusals = []
    for arch, needs in ARCHS.items():
        off = [f"{key}={getattr(config, key)}" for key, value in needs.items() if getattr(config, key) != value]
        if not off:
            return _claimed_arch(config) or arch
        wants = ", ".join(f"{key}={value}" for key, value in needs.items())
        refusals.append(f"{gguf.MODEL_ARCH_NAMES[arch]} ({wants}) cannot express {', '.join(off)}")
    raise GGUFError(f"exporter gguf: no llama.cpp architecture computes this model: {'; '.join(refusals)}")


def _claimed_arch(config: GPTConfig) -> gguf.MODEL_ARCH | None:
    """The architecture of the family that claims ``config`` (Qwen2, Mistral), or None when none does; a
    GGUFError for what that family, or llama.cpp's architecture for it, cannot express."""
    fam = claimant(config)
    if fam is None:
        return None
    problem = fam.check_export(config) if fam.check_export else None
    if problem is None and fam.gguf_arch is None:
        problem = f"llama.cpp has no architecture for {fam.display} models"
    window = config.sliding_window
    if problem is None and window is not None and window < config.block_size:
        problem = (
            f"sliding_window={window} is shorter than the context (block_size={config.block_size}); "
            f"llama.cpp's {fam.gguf_arch} has no sliding window and would attend to every earlier token"
        )
    if problem:
        raise GGUFError(f"exporter gguf: {problem}")
    return _BY_NAME[fam.gguf_arch]


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q or k (weight or bias) from the rotate-half RoPE layout to GGML's interleaved pairs.

    convert_hf_to_gguf.py's ``LlamaModel.permute``: within each head, row ``j * head_dim / 2 + i``
    (half j of rotation pair i) moves to row ``2 * i + j``.
    """
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(
    config: GPTConfig, state: dict[str, torch.Tensor], arch: gguf.MODEL_ARCH
) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in PyTorch (out, in) orientation) for every tensor of the file."""
    allowed = gguf.MODEL_TENSORS[arch]
    names = gguf.TensorNameMap(arch, config.n_layer)
    needed = [k for k in shapes(config) if not (config.tie_embeddings and k == "lm_head.weight")]  # tied: not stored
    for key in needed:
        if key not in state:
            raise GGUFError(f"exporter gguf: the checkpoint has no tensor {key!r} although its model config needs it")
    tensors = {key: state[key].detach().to(torch.float32).cpu() for key in needed}
    if arch in _ALL_BIASES and not config.bias:
        for key, shape in shapes(replace(config, bias=True)).items():
            if key.endswith(".bias"):
                tensors[key] = torch.zeros(shape)  # (out,)
    out: list[tuple[str, np.ndarray]] = []
    for hf_name, tensor in _FAMILIES[arch].to_hf(tensors, config.n_layer, transpose=False).items():
        module, _, suffix = hf_name.rpartition(".")
        kind, gguf_name = names.get_type_and_name(module) or (None, None)
        assert kind in allowed, f"{hf_name} is not a {gguf.MODEL_ARCH_NAMES[arch]} tensor"
        data = tensor.numpy()  # (out, in) or (out,)
        if arch in _INTERLEAVED_ROPE and kind in (T.ATTN_Q, T.ATTN_K):
            data = permute_rope(data, data.shape[0] // config.head_dim)  # heads of q (n_head) or k (kv_heads)
        out.append((f"{gguf_name}.{suffix}", data))
    return out


def encode(name: str, data: np.ndarray, matrix_type: QType) -> tuple[np.ndarray, QType]:
    """(the bytes or values to store, their GGML type) for one tensor, by convert_hf_to_gguf.py's rules."""
    keep_f32 = (
        data.ndim <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or name.startswith(gguf.TENSOR_NAMES[T.POS_EMBD] + ".")
    )
    qtype = QType.F32 if keep_f32 else matrix_type
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows that do not split into q8_0's 32-value blocks
        return gguf.quants.quantize(data, QType.F16), QType.F16


def _add_metadata(writer: gguf.GGUFWriter, config: GPTConfig, name: str, file_type: int, vocab: Vocab) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_vocab_size(config.vocab_size)
    if config.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(config.norm_eps)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    if config.pos_encoding == "rope":
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    # llama.cpp refuses a gpt2 vocabulary without the merges key, even when there are none (the byte
    # tokenizer): write the array, empty if need be (GGUFWriter.add_token_merges drops empty arrays)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty typed array (the GGUF format allows it; the writer refuses)."""

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and isinstance(val, Sequence) and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)
