"""KV-cache decoding and ``lmforge generate``: cached == uncached, batched == alone, sampling, stops, streaming,
parity with transformers' generate."""

import json
import logging

import pytest
import torch
from torch import nn

import lmforge
from lmforge.commands import generate_command as main
from lmforge.generate import generate, generate_completions, generate_ids, sample_next
from lmforge.model import GPT, GPTConfig, KVCache
from lmforge.tokenizers import ByteTokenizer

GPT2_LIKE = dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
LLAMA_LIKE = dict(
    pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2, rope_theta=500.0
)
ARCHS = pytest.mark.parametrize("arch", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
PROMPTS = ["The brave fox", "Hello, world! A longer prompt here", "x"]


def random_gpt(arch: dict, seed: int = 0, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=320, block_size=block_size, n_layer=2, n_head=4, n_embd=32, **arch)
    model = GPT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the init: sharper, more varied distributions
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def save_ckpt(path, model: GPT, tokenizer) -> str:
    """A checkpoint as ``lmforge fit`` writes it (no training needed)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = {"version": lmforge.__version__, "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}
    torch.save({"state_dict": state, "lmforge": meta, "global_step": 1, "hyper_parameters": {}}, path)
    return str(path)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation (slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def model(request):
    return random_gpt(request.param)


# -- the cache in the model -------------------------------------------------------------------------


@ARCHS
@torch.no_grad()
def test_cached_logits_equal_full_forward(arch):
    model = random_gpt(arch)
    x = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(1))
    full = model(x)
    cache = model.new_kv_cache(2)
    assert cache.k.dtype == torch.float32 and cache.k.shape == (2, 2, model.config.kv_heads, 64, 8)
    steps = [model(x[:, :7], kv_cache=cache)]  # a prompt, then one token at a time, then a chunk
    for t in range(7, 20):
        steps.append(model(x[:, t : t + 1], kv_cache=cache))
    steps.append(model(x[:, 20:24], kv_cache=cache))
    for t in range(24, 30):
        steps.append(model(x[:, t : t + 1], kv_cache=cache))
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@ARCHS
@torch.no_grad()
def test_cached_left_padding_equals_each_row_alone(arch):
    model = random_gpt(arch)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (3, 11, 7)]
    follow = torch.randint(0, 320, (3, 6), generator=gen)  # tokens fed one step at a time after the prompts
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    cache = model.new_kv_cache(3, width + 6)
    logits = [model(ids, key_padding_mask=mask, kv_cache=cache)[:, -1]]
    for t in range(6):
        logits.append(model(follow[:, t : t + 1], kv_cache=cache)[:, -1])
    for b, row in enumerate(rows):
        alone = model(torch.tensor([row + follow[b].tolist()]))[0]  # (len + 6, V)
        expected = alone[len(row) - 1 :]
        torch.testing.assert_close(torch.stack([step[b] for step in logits]), expected, atol=1e-5, rtol=0)
    # the uncached path with a padding mask and position ids agrees too
    full = torch.cat([ids, follow], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=torch.bool)], dim=1)
    positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
    uncached = model(full, key_padding_mask=full_mask, position_ids=positions)[:, width - 1 :]
    torch.testing.assert_close(uncached, torch.stack(logits, dim=1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_cache_errors_and_reset():
    model = random_gpt(LLAMA_LIKE, block_size=16)
    cache = model.new_kv_cache(1)
    model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    big = KVCache(model.config, 1, 40)  # slots may exceed block_size (left padding), positions may not
    with pytest.raises(ValueError, match="beyond block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long), kv_cache=big)
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.zeros(1, 2, dtype=torch.long), segment_ids=torch.zeros(1, 2), kv_cache=big)
    with pytest.raises(ValueError, match="built for 1"):
        model(torch.zeros(2, 2, dtype=torch.long), kv_cache=big)
    cache.reset()
    assert cache.length == 0
    x = torch.randint(0, 320, (1, 5))
    torch.testing.assert_close(model(x, kv_cache=cache), model(x), atol=1e-5, rtol=0)


# -- generate -----------------------------------------------------------------------------------------


def test_greedy_cache_equals_no_cache_and_batched_equals_alone(model):
    tok = ByteTokenizer()
    cached = generate(model, tok, PROMPTS, max_new_tokens=24)
    assert cached == generate(model, tok, PROMPTS, max_new_tokens=24, use_cache=False)
    assert cached == [generate(model, tok, [p], max_new_tokens=24)[0] for p in PROMPTS]
    ids = [tok.encode(p) for p in PROMPTS]
    new = generate_ids(model, ids, max_new_tokens=24)
    assert [len(n) for n in new] == [24, 24, 24]  # no eos given: always max_new_tokens
    assert new == generate_ids(model, ids, max_new_tokens=24, use_cache=False)
    assert new == [generate_ids(model, [row], max_new_tokens=24)[0] for row in ids]
    # greedy: each token is the argmax of the full forward over everything before it
    seq = torch.tensor([ids[0] + new[0]])
    with torch.no_grad():
        expected = model(seq)[0, len(ids[0]) - 1 : -1].argmax(-1).tolist()
    assert expected == new[0]


def test_seeded_sampling(model):
    tok = ByteTokenizer()
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    a = generate(model, tok, PROMPTS, seed=1, **kw)
    assert a == generate(model, tok, PROMPTS, seed=1, **kw)
    assert a == generate(model, tok, PROMPTS, seed=1, use_cache=False, **kw)  # same draws, cache or not
    assert a != generate(model, tok, PROMPTS, seed=2, **kw)
    greedy = generate_ids(model, [tok.encode(p) for p in PROMPTS], max_new_tokens=20)
    top1 = generate_ids(model, [tok.encode(p) for p in PROMPTS], max_new_tokens=20, temperature=1.5, top_k=1, seed=3)
    assert top1 == greedy


def test_sample_next_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.1, generator=gen).tolist()) == {0}
    assert set(sample_next(logits, 1.0, generator=gen).tolist()) == {0, 1, 2, 3, 4}
    assert sample_next(logits[:2], 0.0).tolist() == [0, 0]


def test_max_new_tokens_and_block_size(caplog):
    model = random_gpt(GPT2_LIKE, block_size=16)
    tok = ByteTokenizer()
    assert all(len(n) == 5 for n in generate_ids(model, [[1, 2, 3], [4]], max_new_tokens=5))
    completions = generate_completions(model, tok, ["abc"], max_new_tokens=5)
    assert len(completions[0].token_ids) <= 5
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        new = generate_ids(model, [list(range(10)), [7]], max_new_tokens=30)
    assert [len(n) for n in new] == [6, 15]  # prompt + continuation stop at block_size
    assert "does not fit in block_size=16" in caplog.text
    assert new == [generate_ids(model, [row], max_new_tokens=30, use_cache=False)[0] for row in (list(range(10)), [7])]
    with pytest.raises(ValueError, match="leaves no room"):
        generate(model, tok, ["x" * 16])
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            generate(model, tok, ["a"], **bad)


def test_stop_strings_cut(model):
    tok = ByteTokenizer()
    full = generate_completions(model, tok, PROMPTS, max_new_tokens=30)
    # a two-character stop string that first occurs at least 3 characters into some row's text
    row, at, stop = next(
        (r, i, c.text[i : i + 2])
        for r, c in enumerate(full)
        for i in range(3, len(c.text) - 2)
        if "\ufffd" not in c.text[i : i + 2] and c.text.find(c.text[i : i + 2]) == i
    )
    cut = full[row].text[:at]
    pieces: list[str] = []
    stream = lambda r, p: pieces.append(p) if r == row else None  # noqa: E731
    got = generate_completions(model, tok, PROMPTS, max_new_tokens=30, stop=[stop], stream=stream)
    assert got[row].text == cut and got[row].finish_reason == "stop"
    assert "".join(pieces) == cut
    assert len(got[row].token_ids) < len(full[row].token_ids)
    assert generate(model, tok, PROMPTS, max_new_tokens=30, stop=stop, use_cache=False)[row] == cut
    for other in range(len(PROMPTS)):  # every row is cut at its first occurrence of the stop string, if any
        index = full[other].text.find(stop)
        assert got[other].text == (full[other].text if index < 0 else full[other].text[:index])
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, tok, PROMPTS, stop=[""])


def test_streaming_pieces_concatenate(model):
    tok = ByteTokenizer()
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    texts = generate(
        model, tok, PROMPTS, max_new_tokens=25, temperature=1.0, seed=5, stream=lambda r, p: pieces[r].append(p)
    )
    assert ["".join(pieces[r]) for r in range(3)] == texts
    assert all(p for ps in pieces.values() for p in ps)  # no empty pieces


class ScriptedLM(nn.Module):
    """A stand-in model that writes a fixed byte string after any prompt (to test text handling)."""

    def __init__(self, script: bytes, block_size: int = 64) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=320, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.script = list(script) + [256]
        self.weight = nn.Parameter(torch.zeros(1))
        self.inputs: list[torch.Tensor] = []

    def forward(self, idx, key_padding_mask=None, position_ids=None, kv_cache=None):
        assert kv_cache is None
        self.inputs.append(idx)
        mask = torch.ones_like(idx, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
        done = mask.sum(-1) - self.prompt_len
        logits = torch.zeros(idx.size(0), idx.size(1), 320)
        for b, n in enumerate(done.tolist()):
            logits[b, -1, self.script[min(n, len(self.script) - 1)]] = 1.0
        return logits


def test_streaming_waits_for_whole_characters():
    text = "héllo 🙂 wörld 日本"
    lm = ScriptedLM(text.encode())
    lm.prompt_len = 2
    pieces: list[str] = []
    got = generate_completions(
        lm, ByteTokenizer(), ["ab"], max_new_tokens=60, use_cache=False, stream=lambda r, p: pieces.append(p)
    )
    assert got[0].text == text and got[0].finish_reason == "eos"
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "🙂" in pieces  # four bytes, emitted once whole
    # a stop string is never streamed, not even its first characters
    pieces.clear()
    assert generate(
        lm, ByteTokenizer(), ["ab"], stop=["wör", "日本"], use_cache=False, stream=lambda r, p: pieces.append(p)
    ) == ["héllo 🙂 "]
    assert "".join(pieces) == "héllo 🙂 "


def test_bos_and_empty_prompt():
    class BosBytes(ByteTokenizer):
        bos_id = 255

    lm = ScriptedLM(b"ok")
    lm.prompt_len = 3
    assert generate(lm, BosBytes(), ["ab"], use_cache=False) == ["ok"]
    assert lm.inputs[0][0].tolist() == [255, 97, 98]
    lm.inputs.clear()
    lm.prompt_len = 1
    assert generate(lm, ByteTokenizer(), [""], use_cache=False) == ["ok"]
    assert lm.inputs[0][0].tolist() == [256]  # an empty prompt starts a new document


# -- parity with transformers --------------------------------------------------------------------------


@ARCHS
def test_greedy_ids_match_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    from lmforge.checkpoint import load_base
    from lmforge.export import export

    model = random_gpt(arch)
    with torch.no_grad():  # no end-of-text from this random model, so both run all 20 steps
        model.lm_head.weight[ByteTokenizer.eos_id] = 0.0
    tok = ByteTokenizer()
    out = export(save_ckpt(tmp_path / "last.ckpt", model, tok), tmp_path / "hf", "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    rows = [tok.encode(p) for p in PROMPTS]
    for ids in rows:
        x = torch.tensor([ids])
        with torch.no_grad():
            theirs = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20)
        ours = generate_ids(model, [ids], max_new_tokens=20, eos_id=tok.eos_id)[0]
        assert ours == theirs[0, len(ids) :].tolist() and len(ours) == 20
    # a left-padded batch: transformers derives the positions from the attention mask, as lmforge does
    width = max(len(r) for r in rows)
    x = torch.tensor([[tok.eos_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        theirs = ref.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=tok.eos_id)
    assert generate_ids(model, rows, max_new_tokens=20, eos_id=tok.eos_id) == theirs[:, width:].tolist()
    # lmforge generate reads the transformers folder too
    assert generate(load_base(str(out))[0], tok, ["The brave fox"], max_new_tokens=20) == [
        generate(model, tok, ["The brave fox"], max_new_tokens=20)[0]
    ]


# -- the command ------------------------------------------------------------------------------------------


def test_main_end_to_end(tmp_path, capsys):
    model = random_gpt(LLAMA_LIKE)
    tok = ByteTokenizer()
    ckpt = save_ckpt(tmp_path / "last.ckpt", model, tok)
    expected = generate(model, tok, ["The brave fox", "Hello"], max_new_tokens=12)

    main([ckpt, "--prompt", "The brave fox", "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    assert captured.out == "The brave fox" + expected[0] + "\n"
    assert "tokens/s" in captured.err

    main([ckpt, "--prompt", "The brave fox", "--prompt", "Hello", "--max-new-tokens", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "=== prompt 1 ===\nThe brave fox\n" in out and "=== prompt 2 ===\nHello\n" in out
    assert expected[0] in out and expected[1] in out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n\n")
    main(
        [
            ckpt,
            "--prompt",
            "The brave fox",
            "--prompts-file",
            str(prompts),
            "--max-new-tokens",
            "12",
            "--json",
            "--no-cache",
        ]
    )
    records = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in records] == ["The brave fox", "Hello"]
    assert [r["completion"] for r in records] == expected
    assert all(r["finish_reason"] in ("eos", "length", "stop") for r in records)

    lines = tmp_path / "prompts.txt"
    lines.write_text("The brave fox\n\nHello\n")
    sampled = [ckpt, "--prompts-file", str(lines), "--max-new-tokens", "12", "--temperature", "0.8"]
    sampled += ["--top-k", "5", "--top-p", "0.9", "--seed", "3", "--json"]
    main(sampled)
    first = json.loads(capsys.readouterr().out)
    main(sampled)  # the same seed: the same samples
    assert json.loads(capsys.readouterr().out) == first and len(first) == 2

    main(
        [
            ckpt,
            "--prompt",
            "The brave fox",
            "--max-new-tokens",
            "12",
            "--stop",
            expected[0][3:5],
            "--json",
            "--dtype",
            "float32",
        ]
    )
    assert json.loads(capsys.readouterr().out)[0]["completion"] == expected[0][: expected[0].find(expected[0][3:5])]


@pytest.mark.parametrize(
    "args, error, match",
    [
        (["missing/dir/last.ckpt", "--prompt", "x"], FileNotFoundError, "does not exist"),
        (["{ckpt}"], ValueError, "no prompt"),
        (["{ckpt}", "--prompt", "x", "--temperature", "hot"], ValueError, "not a number"),
        (["{ckpt}", "--prompt", "x", "--max-new-tokens", "0"], ValueError, "at least 1"),
        (["{ckpt}", "--prompt", "x", "--top-p", "1.5"], ValueError, "top_p"),
        (["{ckpt}", "--prompt", "x", "--temperature", "-1"], ValueError, "temperature"),
        (["{ckpt}", "--prompt", "x", "--device", "tpu"], ValueError, "invalid choice"),
        (["{ckpt}", "--prompts-file", "nope.txt"], FileNotFoundError, "nope.txt"),
        (["{ckpt}", "--prompt", "x" * 70], ValueError, "leaves no room"),
    ],
)
def test_main_errors(tmp_path, args, error, match):
    ckpt = save_ckpt(tmp_path / "last.ckpt", random_gpt(GPT2_LIKE), ByteTokenizer())
    with pytest.raises(error, match=match) as info:
        main([a.replace("{ckpt}", ckpt) for a in args])
    assert "\n" not in str(info.value)


def test_bad_jsonl(tmp_path):
    ckpt = save_ckpt(tmp_path / "last.ckpt", random_gpt(GPT2_LIKE), ByteTokenizer())
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match='line 1: needs a "prompt"'):
        main([ckpt, "--prompts-file", str(bad)])
