"""lmforge-gguf: every tensor and metadata key read back with gguf.GGUFReader, a numpy forward pass that
follows llama.cpp's gpt2 and llama graphs on the file, the error cases, atomic output, and discovery.

The checkpoints are built without training: a GPT with randomised weights (norm weights and biases
included, so that a swapped or dropped tensor shows) saved the way ``lmforge fit`` saves one. Exports
run the way users run them: through ``lmforge.export.export`` (what ``lmforge export`` calls), which
hands the exporter an empty folder and renames it to ``--to``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import TokenType
from lmforge_gguf import GGUFError, bytes_to_unicode, export_gguf, permute_rope
from tokenizers import Tokenizer, models, pre_tokenizers

import lmforge
from lmforge import cli, plugins
from lmforge.errors import UserError
from lmforge.export import export
from lmforge.model import GPT, GPTConfig
from lmforge.tokenizers import EOS_TOKEN, ByteTokenizer, HFTokenizer

REPO = Path(__file__).resolve().parents[3]
DTYPE_NAMES = ["f32", "f16", "bf16", "q8_0"]
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
MATRIX_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}

GPT2_LIKE = dict(vocab_size=320, block_size=32, n_layer=2, n_head=4, n_embd=64, norm_eps=1e-5)
LLAMA_LIKE = dict(
    vocab_size=320, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=80,
    pos_encoding="rope", rope_theta=50000.0, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
    bias=False, tie_embeddings=False,
)  # fmt: skip
# mlp_hidden=80: ffn_down's rows (80 values) do not split into q8_0's 32-value blocks -> F16 fallback


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    """A byte-level BPE as ``tokenizer: {name: bpe}`` trains it (fewer tokens than the embedding rows)."""
    text = (REPO / "lmforge" / "model.py").read_text()
    return HFTokenizer.train_bpe([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=300)


def save_checkpoint(path: Path, config: GPTConfig, tokenizer, seed: int = 0) -> GPT:
    """A checkpoint in the format of ``lmforge fit`` (what read_checkpoint reads) and the model in it."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():  # norm weights away from 1, biases away from 0
            p.add_(0.1 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "lmforge": {
                "version": lmforge.__version__,
                "model_config": config.to_dict(),
                "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
            },
        },
        path,
    )
    return model.eval()


def only_file(folder: Path) -> Path:
    (file,) = folder.iterdir()
    return file


# -- what the file must hold, written out independently of the exporter ---------------------------


def expected_tensors(config: GPTConfig, model: GPT) -> dict[str, np.ndarray]:
    """GGUF name -> values in PyTorch orientation; q and k of llama still in lmforge's (unpermuted) layout."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    gpt2 = config.pos_encoding == "learned"

    def b(key: str, n: int) -> np.ndarray:
        return sd[key] if config.bias else np.zeros(n, np.float32)

    C, kv = config.n_embd, config.kv_heads * config.head_dim
    e = {"token_embd.weight": sd["wte.weight"]}
    if gpt2:
        e["position_embd.weight"] = sd["wpe.weight"]
    for i in range(config.n_layer):
        p, g = f"blocks.{i}.", f"blk.{i}."
        e[g + "attn_norm.weight"] = sd[p + "ln_1.weight"]
        e[g + "ffn_norm.weight"] = sd[p + "ln_2.weight"]
        e[g + "attn_output.weight"] = sd[p + "attn.c_proj.weight"]
        e[g + "ffn_up.weight"] = sd[p + "mlp.c_fc.weight"]
        e[g + "ffn_down.weight"] = sd[p + "mlp.c_proj.weight"]
        if gpt2:
            e[g + "attn_norm.bias"] = b(p + "ln_1.bias", C)
            e[g + "ffn_norm.bias"] = b(p + "ln_2.bias", C)
            e[g + "attn_qkv.weight"] = np.concatenate([sd[p + f"attn.{x}_proj.weight"] for x in "qkv"])
            e[g + "attn_qkv.bias"] = np.concatenate(
                [b(p + f"attn.{x}_proj.bias", n) for x, n in zip("qkv", (C, kv, kv))]
            )
            e[g + "attn_output.bias"] = b(p + "attn.c_proj.bias", C)
            e[g + "ffn_up.bias"] = b(p + "mlp.c_fc.bias", config.mlp_width)
            e[g + "ffn_down.bias"] = b(p + "mlp.c_proj.bias", C)
        else:
            for x, name in zip("qkv", ("attn_q", "attn_k", "attn_v")):
                e[g + name + ".weight"] = sd[p + f"attn.{x}_proj.weight"]
                if config.bias:
                    e[g + name + ".bias"] = sd[p + f"attn.{x}_proj.bias"]
            e[g + "ffn_gate.weight"] = sd[p + "mlp.gate.weight"]
            if config.bias:
                e[g + "attn_output.bias"] = sd[p + "attn.c_proj.bias"]
                e[g + "ffn_gate.bias"] = sd[p + "mlp.gate.bias"]
                e[g + "ffn_up.bias"] = sd[p + "mlp.c_fc.bias"]
                e[g + "ffn_down.bias"] = sd[p + "mlp.c_proj.bias"]
    e["output_norm.weight"] = sd["ln_f.weight"]
    if gpt2:
        e["output_norm.bias"] = b("ln_f.bias", C)
    if not config.tie_embeddings:
        e["output.weight"] = sd["lm_head.weight"]
    return e


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute: GGML's interleaved pairs back to rotate-half."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_type(name: str, shape: tuple[int, ...], dtype: str) -> Q:
    """llama.cpp's rules: 1-D, norms, biases and position_embd in F32; q8_0 rows not a multiple of 32 in F16."""
    if len(shape) == 1 or name.startswith("position_embd") or not name.endswith(".weight") or "_norm" in name:
        return Q.F32
    if dtype == "q8_0" and shape[-1] % 32:
        return Q.F16
    return MATRIX_TYPES[dtype]


def check_tensors(reader: gguf.GGUFReader, config: GPTConfig, model: GPT, dtype: str) -> None:
    expected = expected_tensors(config, model)
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(expected)
    assert len(reader.tensors) == len(expected)
    heads = {"attn_q": config.n_head, "attn_k": config.kv_heads}
    for name, want in expected.items():
        t = got[name]
        assert t.shape.tolist() == list(reversed(want.shape)), name  # GGUF order: innermost dimension first
        qtype = expected_type(name, want.shape, dtype)
        assert t.tensor_type == qtype, (name, t.tensor_type.name, qtype.name)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        kind = name.split(".")[-2]
        if config.pos_encoding == "rope" and kind in heads:
            values = unpermute(values, heads[kind])
        if qtype == Q.F32:
            np.testing.assert_array_equal(values, want, err_msg=name)
        elif qtype == Q.F16:
            np.testing.assert_array_equal(values, want.astype(np.float16).astype(np.float32), err_msg=name)
        elif qtype == Q.BF16:
            bf16 = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(values, bf16, err_msg=name)
        else:  # q8_0: within half a quantisation step (block max / 127), plus the f16 rounding of the step
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(values.reshape(-1, 32) - blocks) <= step * 0.6), name
            assert not np.array_equal(values, want)


def byte_vocab(vocab_size: int) -> tuple[list[str], list[int]]:
    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)] + [EOS_TOKEN] + [f"[PAD{i}]" for i in range(257, vocab_size)]
    types = [TokenType.NORMAL] * 256 + [TokenType.CONTROL] + [TokenType.UNUSED] * (vocab_size - 257)
    return tokens, [int(t) for t in types]


def bpe_vocab(tokenizer: HFTokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    by_id = {i: tok for tok, i in tokenizer._tok.get_vocab(with_added_tokens=True).items()}
    n = tokenizer.vocab_size
    assert sorted(by_id) == list(range(n))
    tokens = [by_id[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    types = [TokenType.CONTROL if i == tokenizer.eos_id else TokenType.NORMAL for i in range(n)]
    types += [TokenType.UNUSED] * (vocab_size - n)
    merges = json.loads(tokenizer._tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert merges  # a real BPE
    return tokens, [int(t) for t in types], merges


def expected_metadata(config: GPTConfig, name: str, dtype: str, tokenizer) -> dict[str, tuple[V, object]]:
    arch = "gpt2" if config.pos_encoding == "learned" else "llama"
    if isinstance(tokenizer, ByteTokenizer):
        tokens, types = byte_vocab(config.vocab_size)
        merges: list[str] = []
    else:
        tokens, types, merges = bpe_vocab(tokenizer, config.vocab_size)
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    meta = {
        "general.architecture": (V.STRING, arch),
        "general.type": (V.STRING, "model"),
        "general.name": (V.STRING, name),
        "general.file_type": (V.UINT32, FILE_TYPES[dtype]),
        "general.quantization_version": (V.UINT32, 2),
        f"{arch}.context_length": (V.UINT32, config.block_size),
        f"{arch}.embedding_length": (V.UINT32, config.n_embd),
        f"{arch}.feed_forward_length": (V.UINT32, config.mlp_width),
        f"{arch}.block_count": (V.UINT32, config.n_layer),
        f"{arch}.attention.head_count": (V.UINT32, config.n_head),
        f"{arch}.attention.head_count_kv": (V.UINT32, config.kv_heads),
        f"{arch}.vocab_size": (V.UINT32, config.vocab_size),
        "tokenizer.ggml.model": (V.STRING, "gpt2"),
        "tokenizer.ggml.pre": (V.STRING, "gpt-2"),
        "tokenizer.ggml.tokens": (V.ARRAY, tokens),
        "tokenizer.ggml.token_type": (V.ARRAY, types),
        "tokenizer.ggml.merges": (V.ARRAY, merges),
        "tokenizer.ggml.bos_token_id": (V.UINT32, tokenizer.eos_id),
        "tokenizer.ggml.eos_token_id": (V.UINT32, tokenizer.eos_id),
        "tokenizer.ggml.add_bos_token": (V.BOOL, False),
        "tokenizer.ggml.add_eos_token": (V.BOOL, False),
    }
    if arch == "gpt2":
        meta["gpt2.attention.layer_norm_epsilon"] = (V.FLOAT32, f32(config.norm_eps))
    else:
        meta["llama.attention.layer_norm_rms_epsilon"] = (V.FLOAT32, f32(config.norm_eps))
        meta["llama.rope.dimension_count"] = (V.UINT32, config.head_dim)
        meta["llama.rope.freq_base"] = (V.FLOAT32, f32(config.rope_theta))
    return meta


def check_metadata(reader: gguf.GGUFReader, expected: dict[str, tuple[V, object]]) -> None:
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert sorted(fields) == sorted(expected)
    for key, (vtype, value) in expected.items():
        field = fields[key]
        assert field.types[0] == vtype, key
        if vtype == V.ARRAY and value:
            sub = V.STRING if isinstance(value[0], str) else V.INT32
            assert field.types[-1] == sub, key
        assert field.contents() == value, key
    assert reader.fields["GGUF.tensor_count"].contents() == len(reader.tensors)


# -- the exports, every tensor and every key ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_gpt2_like_every_tensor_and_key(tmp_path, dtype):
    config = GPTConfig(**GPT2_LIKE)
    model = save_checkpoint(tmp_path / "tiny-gpt2" / "checkpoints" / "last.ckpt", config, ByteTokenizer())
    out = export(tmp_path / "tiny-gpt2" / "checkpoints" / "last.ckpt", tmp_path / "out", "gguf", dtype=dtype)
    assert out == tmp_path / "out"
    file = only_file(out)
    assert file.name == f"tiny-gpt2-{dtype}.gguf"
    reader = gguf.GGUFReader(file)
    check_tensors(reader, config, model, dtype)
    check_metadata(reader, expected_metadata(config, "tiny-gpt2", dtype, ByteTokenizer()))
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_llama_like_every_tensor_and_key(tmp_path, bpe, dtype):
    config = GPTConfig(**LLAMA_LIKE)
    model = save_checkpoint(tmp_path / "ckpt" / "step-7.ckpt", config, bpe)
    out = export(
        tmp_path / "ckpt" / "step-7.ckpt", tmp_path / "deep" / "er" / "out", "gguf", dtype=dtype, filename="model"
    )
    file = only_file(out)
    assert file.name == "model.gguf"
    reader = gguf.GGUFReader(file)
    check_tensors(reader, config, model, dtype)
    check_metadata(reader, expected_metadata(config, "step-7", dtype, bpe))
    types = {t.name: t.tensor_type for t in reader.tensors}
    if dtype == "q8_0":
        assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q8_0


def test_permutation_is_convert_hf_to_gguf_layout():
    """Head h's rotation pair i sits at rows (i, i + d/2) in lmforge and at rows (2i, 2i + 1) in GGML."""
    n_head, d = 3, 8
    w = np.arange(n_head * d * 2, dtype=np.float32).reshape(n_head * d, 2)
    p = permute_rope(w, n_head)
    for h in range(n_head):
        for i in range(d // 2):
            np.testing.assert_array_equal(p[h * d + 2 * i], w[h * d + i])
            np.testing.assert_array_equal(p[h * d + 2 * i + 1], w[h * d + i + d // 2])
    np.testing.assert_array_equal(unpermute(p, n_head), w)
    bias = np.arange(n_head * d, dtype=np.float32)
    np.testing.assert_array_equal(unpermute(permute_rope(bias, n_head), n_head), bias)


def test_byte_tokens_are_gpt2_byte_level_characters():
    table = bytes_to_unicode()
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("a")], table[0], table[255]) == ("Ġ", "Ċ", "a", "Ā", "ÿ")
    text = "Every quiet fox\nfollows\tthe lantern, naïve café 東京 🦊!"
    (mapped, _), *_ = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert "".join(table[i] for i in ByteTokenizer().encode(text)) == mapped


# -- a forward pass on the file, as llama.cpp's gpt2 and llama graphs compute it ------------------


def gguf_logits(reader: gguf.GGUFReader, ids: list[int]) -> np.ndarray:
    f = {k: v.contents() for k, v in reader.fields.items() if k != "tokenizer.ggml.tokens"}
    arch = f["general.architecture"]
    W = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    C, L = f[f"{arch}.embedding_length"], f[f"{arch}.block_count"]
    nh, nkv = f[f"{arch}.attention.head_count"], f[f"{arch}.attention.head_count_kv"]
    hd, T = C // nh, len(ids)
    pos = np.arange(T)

    def norm(x, name):
        if arch == "gpt2":
            eps = f["gpt2.attention.layer_norm_epsilon"]
            y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
            return y * W[name + ".weight"] + W[name + ".bias"]
        eps = f["llama.attention.layer_norm_rms_epsilon"]
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * W[name + ".weight"]

    def linear(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    def rope(x):  # GGML's normal mode: adjacent pairs (2i, 2i+1) rotate by pos * base^(-2i/n_rot)
        n_rot, base = f["llama.rope.dimension_count"], f["llama.rope.freq_base"]
        theta = pos[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    x = W["token_embd.weight"][ids]
    if arch == "gpt2":
        x = x + W["position_embd.weight"][pos]
    for i in range(L):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if arch == "gpt2":
            q, k, v = np.split(linear(h, b + "attn_qkv"), [C, C + nkv * hd], axis=-1)
            q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        else:
            q = rope(linear(h, b + "attn_q").reshape(T, nh, hd))
            k = rope(linear(h, b + "attn_k").reshape(T, nkv, hd))
            v = linear(h, b + "attn_v").reshape(T, nkv, hd)
        att = np.empty((T, nh, hd))
        for j in range(nh):
            g = j // (nh // nkv)  # ggml broadcasts query head j onto kv head j / (n_head / n_head_kv)
            s = q[:, j] @ k[:, g].T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            p = np.exp(s - s.max(-1, keepdims=True))
            att[:, j] = (p / p.sum(-1, keepdims=True)) @ v[:, g]
        x = x + linear(att.reshape(T, C), b + "attn_output")
        h = norm(x, b + "ffn_norm")
        if arch == "gpt2":
            u = linear(h, b + "ffn_up")
            h = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        else:
            g = linear(h, b + "ffn_gate")
            h = g / (1 + np.exp(-g)) * linear(h, b + "ffn_up")
        x = x + linear(h, b + "ffn_down")
    x = norm(x, "output_norm")
    return x @ W.get("output.weight", W["token_embd.weight"]).T


@pytest.mark.parametrize(
    "options",
    [
        GPT2_LIKE,
        {**GPT2_LIKE, "bias": False, "tie_embeddings": False, "n_kv_head": 2},  # zero biases, GQA, own head
        LLAMA_LIKE,
        {**LLAMA_LIKE, "bias": True, "tie_embeddings": True, "n_kv_head": 1},  # permuted q/k biases, MQA
    ],
    ids=["gpt2", "gpt2-nobias-gqa-untied", "llama-gqa", "llama-bias-mqa-tied"],
)
def test_file_computes_the_lmforge_model(tmp_path, options):
    config = GPTConfig(**options)
    model = save_checkpoint(tmp_path / "m.ckpt", config, ByteTokenizer(), seed=1)
    reader = gguf.GGUFReader(only_file(export(tmp_path / "m.ckpt", tmp_path / "out", "gguf", dtype="f32")))
    ids = [3, 200, 17, 256, 42, 99, 311, 5, 77, 128, 64]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(gguf_logits(reader, ids), want, atol=2e-4, rtol=1e-4)


# -- errors, and nothing left behind --------------------------------------------------------------


def assert_nothing_written(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before


def test_unknown_dtype_lists_the_choices(tmp_path):
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**GPT2_LIKE), ByteTokenizer())
    with pytest.raises(GGUFError, match=r"dtype='q4_0' is not one of f32, f16, bf16, q8_0"):
        export(tmp_path / "m.ckpt", tmp_path / "out", "gguf", dtype="q4_0")
    assert_nothing_written(tmp_path, {"m.ckpt"})


def test_existing_out_dir_is_refused_and_kept(tmp_path):
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**GPT2_LIKE), ByteTokenizer())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        export(tmp_path / "m.ckpt", tmp_path / "out", "gguf")
    # called directly, the exporter writes only into an empty folder (lmforge export makes one)
    with pytest.raises(GGUFError, match="is not an empty folder; run the exporter through lmforge export"):
        export_gguf(tmp_path / "m.ckpt", tmp_path / "out")
    with pytest.raises(GGUFError, match="is not an empty folder"):
        export_gguf(tmp_path / "m.ckpt", tmp_path / "missing")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert_nothing_written(tmp_path, {"m.ckpt", "out"})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pos_encoding": "rope"}, r"gpt2 \(.*\) cannot express pos_encoding=rope; llama \(.*\) cannot express "
         r"norm=layernorm, mlp=gelu"),
        ({"norm": "rmsnorm"}, r"gpt2 \(.*\) cannot express norm=rmsnorm; llama .* pos_encoding=learned, mlp=gelu"),
        ({"mlp": "swiglu"}, r"gpt2 \(.*\) cannot express mlp=swiglu;"),
        ({**LLAMA_LIKE, "mlp": "gelu"}, r"norm=rmsnorm; llama \(pos_encoding=rope, norm=rmsnorm, mlp=swiglu\) "
         r"cannot express mlp=gelu$"),
    ],
)  # fmt: skip
def test_model_neither_architecture_computes(tmp_path, options, message):
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**{**GPT2_LIKE, **options}), ByteTokenizer())
    with pytest.raises(GGUFError, match=message) as err:
        export(tmp_path / "m.ckpt", tmp_path / "out", "gguf")
    assert str(err.value).startswith("exporter gguf: no llama.cpp architecture computes this model: gpt2 (")
    assert_nothing_written(tmp_path, {"m.ckpt"})


def word_level() -> HFTokenizer:
    return HFTokenizer(Tokenizer(models.WordLevel({"a": 0, EOS_TOKEN: 1}, unk_token="a")))


def byte_fallback_bpe() -> HFTokenizer:
    return HFTokenizer(Tokenizer(models.BPE({"a": 0, "b": 1, EOS_TOKEN: 2}, [], byte_fallback=True)))


def whitespace_bpe() -> HFTokenizer:
    tok = Tokenizer(models.BPE({"a": 0, "b": 1, EOS_TOKEN: 2}, []))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(tok)


@pytest.mark.parametrize(
    "tokenizer, message",
    [
        (None, "holds no tokenizer"),
        (word_level, "its model is 'WordLevel', not BPE"),
        (byte_fallback_bpe, "byte_fallback"),
        (whitespace_bpe, "its pre-tokenizer is 'Whitespace', not ByteLevel"),
    ],
)
def test_tokenizer_llama_cpp_cannot_reproduce(tmp_path, tokenizer, message):
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**GPT2_LIKE), tokenizer() if tokenizer else None)
    with pytest.raises(GGUFError, match=message):
        export(tmp_path / "m.ckpt", tmp_path / "out", "gguf")
    assert_nothing_written(tmp_path, {"m.ckpt"})


def test_tokenizer_larger_than_the_embedding(tmp_path):
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**{**GPT2_LIKE, "vocab_size": 200}), ByteTokenizer())
    with pytest.raises(GGUFError, match="257 tokens but the model's embedding only 200 rows"):
        export(tmp_path / "m.ckpt", tmp_path / "out", "gguf")
    assert_nothing_written(tmp_path, {"m.ckpt"})


@pytest.mark.parametrize("filename", ["a/b.gguf", "..", "", 7])
def test_filename_must_be_a_plain_name(tmp_path, filename):
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**GPT2_LIKE), ByteTokenizer())
    refused = GGUFError if isinstance(filename, str) else UserError  # lmforge may refuse a non-string first
    with pytest.raises(refused, match="filename"):
        export(tmp_path / "m.ckpt", tmp_path / "out", "gguf", filename=filename)
    assert_nothing_written(tmp_path, {"m.ckpt"})
    (tmp_path / "empty").mkdir()  # the exporter's own check, whoever calls it
    with pytest.raises(GGUFError, match="must be a plain file name"):
        export_gguf(tmp_path / "m.ckpt", tmp_path / "empty", filename=filename)
    assert not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, exc):
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**GPT2_LIKE), ByteTokenizer())
    written = []

    def fail(self, *args, **kwargs):  # after the header and metadata are on disk
        written.append(self.path.stat().st_size)
        raise exc

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(type(exc)):
        export(tmp_path / "m.ckpt", tmp_path / "sub" / "out", "gguf")
    assert written and written[0] > 0
    assert_nothing_written(tmp_path / "sub", set())
    assert_nothing_written(tmp_path, {"m.ckpt", "sub"})


# -- discovery and the command line ----------------------------------------------------------------


def test_found_as_the_gguf_exporter_and_run_by_lmforge_export(tmp_path, capsys):
    (info,) = plugins.discover("exporter")["gguf"]
    assert (info.distribution, info.value) == ("lmforge-gguf", "lmforge_gguf:export_gguf")
    with pytest.raises(plugins.PluginError, match="has no argument 'dtyp'; did you mean 'dtype'"):
        plugins.validate("exporter", {"name": "gguf", "dtyp": "f16"})

    ckpt = tmp_path / "runs" / "gpt-tiny" / "checkpoints" / "last.ckpt"
    save_checkpoint(ckpt, GPTConfig(**GPT2_LIKE), ByteTokenizer())
    (tmp_path / "a").mkdir()  # the protocol: the exporter fills the empty folder it is given
    out = plugins.build("exporter", {"name": "gguf", "filename": "tiny"}, ckpt, tmp_path / "a")
    assert only_file(out).name == "tiny.gguf"
    assert gguf.GGUFReader(only_file(out)).fields["general.file_type"].contents() == 1  # f16 by default

    cli.main(["export", str(ckpt), "--to", str(tmp_path / "b"), "--format", "gguf", "--arg", "dtype=q8_0"])
    assert f"as gguf to {tmp_path / 'b'}" in capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "b" / "gpt-tiny-q8_0.gguf")
    assert reader.fields["general.name"].contents() == "gpt-tiny"
    # the folder and the file get the usual permissions (0755 and 0644 under umask 022), not mkdtemp's 0700
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "b" / "gpt-tiny-q8_0.gguf").stat().st_mode) == 0o666 & ~mask


def test_refusal_on_the_command_line_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """A user error of the exporter (here a dtype llama.cpp has no writer for) is exit 2 and one line, not a
    traceback, and no folder is left, final or temporary."""
    save_checkpoint(tmp_path / "m.ckpt", GPTConfig(**GPT2_LIKE), ByteTokenizer())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(tmp_path / "m.ckpt"), "--to", str(tmp_path / "out"), "--format", "gguf",
                  "--arg", "dtype=q4_k"])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: exporter gguf: dtype='q4_k'") and "\n" not in err
    assert_nothing_written(tmp_path, {"m.ckpt"})
