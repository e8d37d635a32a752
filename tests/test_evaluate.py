"""Evaluation: multiple-choice log-likelihoods, BLEU/ROUGE/exact match and perplexity against hand-computed
values, one-line errors naming file and line, and ``lmforge evaluate`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmforge
from lmforge import evaluate
from lmforge.commands import evaluate_command
from lmforge.data.sources import CorpusError
from lmforge.model import GPT, GPTConfig
from lmforge.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data"
TINY = dict(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_embd=64, attention="torch")


# -- a model whose log-probabilities are known exactly ------------------------------------------------------


class CharTokenizer:
    """Characters a, b, c and space as ids 0-3; end-of-text is 4."""

    chars = "abc "
    vocab_size = 5
    eos_id = 4

    def __init__(self, bos_id: int | None = None) -> None:
        self.bos_id = bos_id

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(ch) for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids if i < 4)


# P[prev][next]: the probability of the next token given the previous one (rows: a, b, c, space, eos).
P = [
    [1 / 8, 1 / 2, 1 / 4, 1 / 16, 1 / 16],
    [1 / 4, 1 / 16, 1 / 2, 1 / 8, 1 / 16],
    [1 / 2, 1 / 4, 1 / 16, 1 / 8, 1 / 16],
    [1 / 4, 1 / 4, 1 / 4, 1 / 8, 1 / 8],
    [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 16],
]
A, B, C, SPACE, EOS = range(5)


class BigramStub(nn.Module):
    """forward(idx) -> logits whose log-softmax at each position is log P[that token] (a bigram model)."""

    def __init__(self, table, block_size: int | None = None) -> None:
        super().__init__()
        self.register_buffer("logp", torch.tensor(table, dtype=torch.float64).log().float())
        self.config = None if block_size is None else GPTConfig(vocab_size=5, block_size=block_size, n_embd=8, n_head=1)
        self.longest = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.longest = max(self.longest, idx.size(1))
        if self.config is not None:
            assert idx.size(1) <= self.config.block_size
        return self.logp[idx]


def lp(prev: int, nxt: int) -> float:
    return math.log(P[prev][nxt])


def test_multiple_choice_accuracy_equals_hand_computed_loglikelihoods():
    records = [
        # LL(b|a) = log 1/2, LL(c|a) = log 1/4, LL(a|a) = log 1/8: "b" wins, with or without length norm.
        {"question": "a", "choices": ["b", "c", "a"], "answer": 0},
        # LL("c") = log 1/4 = -1.386 beats LL("bca") = log(1/2 * 1/2 * 1/2) = -2.079: acc picks 0 (wrong);
        # per byte: -1.386 / 1 < -2.079 / 3 = -0.693: acc_norm picks 1 (right).
        {"question": "a", "choices": ["c", "bca"], "answer": 1},
        # HellaSwag names, label as a string. LL("a"|b) = log 1/4 = -1.386, LL("cc") = log(1/2 * 1/16) =
        # -3.466 (-1.733 per byte), LL(" ") = log 1/8 = -2.079: both pick 0, the answer is 1: both wrong.
        {"context": "b", "endings": ["a", "cc", " "], "label": "1"},
        # An empty question starts from end-of-text: LL(a|eos) = log 1/2 > LL(b|eos) = log 1/4: right.
        {"question": "", "choices": ["a", "b"], "answer": 0},
    ]
    result = evaluate.multiple_choice(BigramStub(P), CharTokenizer(), records, batch_size=3)
    expected = [
        [lp(A, B), lp(A, C), lp(A, A)],
        [lp(A, C), lp(A, B) + lp(B, C) + lp(C, A)],
        [lp(B, A), lp(B, C) + lp(C, C), lp(B, SPACE)],
        [lp(EOS, A), lp(EOS, B)],
    ]
    for example, lls in zip(result["examples"], expected):
        assert example["loglikelihoods"] == pytest.approx(lls, abs=1e-5)
    assert [e["pred"] for e in result["examples"]] == [0, 0, 0, 0]
    assert [e["pred_norm"] for e in result["examples"]] == [0, 1, 0, 0]
    assert [e["choice_bytes"] for e in result["examples"]] == [[1, 1, 1], [1, 3], [1, 2, 1], [1, 1]]
    m = result["metrics"]
    assert m["acc"] == 2 / 4 and m["acc_norm"] == 3 / 4  # records 1, 4 and records 1, 2, 4
    assert m["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3 + 1 / 2) / 4) and m["examples"] == 4
    # normalize picks what is reported
    only = evaluate.multiple_choice(BigramStub(P), CharTokenizer(), records, normalize="length")
    assert "acc" not in only["metrics"] and only["metrics"]["acc_norm"] == 3 / 4
    assert "pred" not in only["examples"][0] and "pred_norm" in only["examples"][0]


def test_multiple_choice_bos_and_left_truncation():
    # With a bos (id 4 here), the context is [bos] + question: the first choice token follows the question's
    # last token as before, and an empty question now starts from the bos.
    tok = CharTokenizer(bos_id=EOS)
    result = evaluate.multiple_choice(BigramStub(P), tok, [{"question": "", "choices": ["c", "a"], "answer": 1}])
    assert result["examples"][0]["loglikelihoods"] == pytest.approx([lp(EOS, C), lp(EOS, A)], abs=1e-6)
    # block_size 4: "abcab" + the longest choice (2 tokens) needs 5 + 2 > 4 + 1 tokens, so the question is cut
    # from the left to its last 3 tokens ("cab"); the choices still follow "b".
    stub = BigramStub(P, block_size=4)
    records = [{"question": "abcab", "choices": ["ca", "b"], "answer": 0}]
    result = evaluate.multiple_choice(stub, CharTokenizer(), records)
    assert result["metrics"]["truncated"] == 1 and stub.longest == 4
    assert result["examples"][0]["loglikelihoods"] == pytest.approx([lp(B, C) + lp(C, A), lp(B, B)], abs=1e-6)
    with pytest.raises(CorpusError, match=r"record 1: choice 0 has 5 tokens, more than the model's block_size=4"):
        evaluate.multiple_choice(stub, CharTokenizer(), [{"question": "a", "choices": ["abcab", "b"], "answer": 0}])


def test_multiple_choice_batches_match_one_sequence_at_a_time():
    """A real GPT: right padding and batching change nothing; each score is the plain forward's sum."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    tok = ByteTokenizer()
    records = [
        {"question": "The brave fox", "choices": [" sees the river.", " sleeps.", " x"], "answer": 0},
        {"question": "One owl", "choices": [" flies", " hides under the bridge today."], "answer": 1},
    ]
    result = evaluate.multiple_choice(model, tok, records, batch_size=2)
    for record, example in zip(records, result["examples"]):
        for choice, score in zip(record["choices"], example["loglikelihoods"]):
            ctx, cont = tok.encode(record["question"]), tok.encode(choice)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
            manual = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
            assert score == pytest.approx(manual, abs=1e-4)


# -- BLEU, ROUGE, exact match ---------------------------------------------------------------------------------


def test_bleu_equals_hand_computed_values():
    # Pair 1: "the cat sat on the mat" vs "the cat is on the mat" (6 words each).
    #   1-grams: the x2, cat, on, mat match of 6 -> 5/6; 2-grams: "the cat", "on the", "the mat" of 5 -> 3/5;
    #   3-grams: "on the mat" of 4 -> 1/4; 4-grams: none of 3 -> 0/3. Unsmoothed BLEU-4 = 0.
    #   Smoothed (add one to the 2- to 4-gram counts): 5/6, 4/6, 2/5, 1/4; product 1/18; brevity 1
    #   (6 words each): BLEU = (1/18) ** (1/4) = 0.4855.
    # Pair 2: "the quick brown fox jumps" vs "the quick brown fox jumps over": every n-gram matches
    #   (5/5, 4/4, 3/3, 2/2); 5 words against 6: brevity exp(1 - 6/5): BLEU = exp(-0.2) = 0.8187.
    # Corpus (counts summed): 10/11, 7/9, 4/7, 2/5; 11 words against 12: exp(1 - 12/11) * (16/99) ** (1/4).
    preds = ["the cat sat on the mat", "the quick brown fox jumps"]
    refs = [["the cat is on the mat"], ["the quick brown fox jumps over"]]
    plain = evaluate.text_metrics(preds, refs)
    assert plain["metrics"]["bleu"] == pytest.approx(math.exp(-1 / 11) * (16 / 99) ** 0.25, abs=1e-5)
    assert [e["bleu"] for e in plain["examples"]] == pytest.approx([0.0, math.exp(-0.2)], abs=1e-5)
    smooth = evaluate.text_metrics(preds, refs, smooth=True)
    assert [e["bleu"] for e in smooth["examples"]] == pytest.approx([(1 / 18) ** 0.25, math.exp(-0.2)], abs=1e-5)
    # Corpus smoothed: 10/11, 8/10, 5/8, 3/6; brevity exp(1 - 12/11).
    expected = math.exp(-1 / 11) * (10 / 11 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25
    assert smooth["metrics"]["bleu"] == pytest.approx(expected, abs=1e-5)
    # A one-word answer: unsmoothed 0; smoothed, the 2- to 4-gram precisions are (0+1)/(0+1) = 1, so BLEU is
    # the word precision times the brevity penalty: 1.
    assert evaluate.text_metrics(["wizard"], [["wizard"]])["metrics"]["bleu"] == 0.0
    assert evaluate.text_metrics(["wizard"], [["wizard"]], smooth=True)["metrics"]["bleu"] == pytest.approx(1.0)
    # Two references: counts clipped by the most of each n-gram in any one of them. "the cat sat on the mat"
    # against "the cat is on the mat" and "a cat sat on the mat": 6/6, 5/5, 3/4 ("the cat sat" is in
    # neither), 2/3 ("the cat sat on" is not): BLEU = (3/4 * 2/3) ** (1/4) = 0.5 ** 0.25 = 0.8409.
    multi = evaluate.text_metrics(["the cat sat on the mat"], [["the cat is on the mat", "a cat sat on the mat"]])
    assert multi["metrics"]["bleu"] == pytest.approx(0.5**0.25, abs=1e-5)


def test_rouge_and_exact_match_equal_hand_computed_values():
    preds = ["the cat sat on the mat", "the fox sees the river", "the fox"]
    refs = [["the cat is on the mat"], ["The river sees the fox."], ["the brave fox runs"]]
    result = evaluate.text_metrics(preds, refs)
    # Pair 1: 5 of 6 words shared (P = R = 5/6); bigrams 3 of 5; longest common subsequence "the cat on the
    #   mat" = 5: F = 5/6, 3/5, 5/6.
    # Pair 2 (lower-cased, punctuation dropped): the same words: F1 = 1; bigrams "the fox", "sees the",
    #   "the river" = 3 of 4: 0.75; LCS "the sees the" = 3 of 5: 0.6.
    # Pair 3: 2 words against 4: P = 1, R = 1/2, F = 2 * 1 * 0.5 / 1.5 = 2/3; no shared bigram: 0; LCS
    #   "the fox" = 2: 2/3.
    per = [v for e in result["examples"] for v in (e["rouge1"], e["rouge2"], e["rougeL"])]
    assert per == pytest.approx([5 / 6, 3 / 5, 5 / 6, 1, 3 / 4, 3 / 5, 2 / 3, 0, 2 / 3], abs=1e-5)
    m = result["metrics"]
    assert m["rouge1"] == pytest.approx((5 / 6 + 1 + 2 / 3) / 3, abs=1e-5)  # 0.8333
    assert m["rouge2"] == pytest.approx((3 / 5 + 3 / 4 + 0) / 3, abs=1e-5)  # 0.45
    assert m["rougeL"] == pytest.approx((5 / 6 + 3 / 5 + 2 / 3) / 3, abs=1e-5)  # 0.7
    assert m["exact_match"] == 0.0
    # Exact match strips surrounding whitespace and accepts any reference.
    em = evaluate.text_metrics([" wizard\n", "fox", "owl"], [["wizard"], ["the fox"], ["tiger", " owl"]])
    assert [e["exact_match"] for e in em["examples"]] == [True, False, True]
    assert em["metrics"]["exact_match"] == pytest.approx(2 / 3)


def test_generation_metrics_score_greedy_outputs(monkeypatch):
    import lmforge.generate

    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens=64, temperature=0.0, stop=None, **kwargs):
        seen.update(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop)
        return [{"Q1:": " wizard", "Q2:": " the fox", "Q3:": "x"}[p] for p in prompts]

    monkeypatch.setattr(lmforge.generate, "generate", fake_generate)
    records = [
        {"prompt": "Q1:", "completion": " wizard"},
        {"prompt": "Q2:", "references": ["the brave fox runs", "a fox"]},
        {"prompt": "Q3:", "completion": " owl"},
    ]
    result = evaluate.generation_metrics(BigramStub(P), CharTokenizer(), records, max_new_tokens=5, batch_size=2)
    assert seen == {"max_new_tokens": 5, "temperature": 0.0, "stop": None}
    assert [e["output"] for e in result["examples"]] == [" wizard", " the fox", "x"]
    assert result["metrics"]["exact_match"] == pytest.approx(1 / 3)
    # ROUGE-1: 1; best of "the brave fox runs" (2/3, see above) and "a fox" (P = R = 1/2): 2/3; 0.
    assert result["examples"][1]["rouge1"] == pytest.approx(2 / 3, abs=1e-5)
    assert result["metrics"]["rouge1"] == pytest.approx((1 + 2 / 3 + 0) / 3, abs=1e-5)


# -- perplexity ------------------------------------------------------------------------------------------------


class Uniform(nn.Module):
    def __init__(self, vocab: int, block_size: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = GPTConfig(vocab_size=vocab, block_size=block_size, n_embd=8, n_head=1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.size(1) <= self.config.block_size
        return torch.zeros(*idx.shape, self.vocab)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    texts = ["abc abc", "cab" * 20, ""]  # the second is longer than block_size: sliding windows
    result = evaluate.perplexity(Uniform(5, 8), CharTokenizer(), texts, stride=3)
    m = result["metrics"]
    assert m["perplexity"] == pytest.approx(5.0) and m["nll"] == pytest.approx(math.log(5))
    assert m["tokens"] == 7 + 60 and m["nats_per_byte"] == pytest.approx(math.log(5))  # every token once
    assert [e["tokens"] for e in result["examples"]] == [7, 60, 0] and result["examples"][2]["nll"] is None
    with pytest.raises(ValueError, match="no tokens to score"):
        evaluate.perplexity(Uniform(5, 8), CharTokenizer(), [""])


def test_sliding_windows_score_every_token_once_with_enough_context():
    for n, block, stride in [(11, 4, 2), (50, 16, 5), (5, 8, 4), (17, 4, 4)]:
        scored = []
        for a, b, first in evaluate._windows(n, block, stride):
            assert b - a <= block and first >= a + 1
            assert first == 1 or first - a >= block - stride  # the context each new token gets
            scored += range(first, b + 1)
        assert scored == list(range(1, n))
    # With stride 1 each token is predicted from the block_size tokens before it: the same as one forward each.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "block_size": 16}))
    tok = ByteTokenizer()
    text = "Every quiet fox follows the lantern."
    ids = [tok.eos_id, *tok.encode(text)]
    total = 0.0
    with torch.no_grad():
        for p in range(1, len(ids)):
            window = torch.tensor([ids[max(0, p - 16) : p]])
            total -= F.log_softmax(model(window)[0, -1], dim=-1)[ids[p]].item()
    result = evaluate.perplexity(model, tok, [text], stride=1, batch_size=7)
    assert result["metrics"]["nll"] == pytest.approx(total / (len(ids) - 1), abs=1e-5)


# -- the command and its errors --------------------------------------------------------------------------------


def save_run(tmp_path: Path) -> Path:
    """A random tiny lmforge checkpoint in <run>/checkpoints/, as lmforge fit writes one."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{**TINY, "block_size": 128})
    model = GPT(cfg)
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "lmforge": {"version": lmforge.__version__, "model_config": cfg.to_dict(), "tokenizer": {"type": "bytes"}},
            "global_step": 0,
        },
        path,
    )
    return path


def test_main_writes_json_and_prints_table(tmp_path, capsys, monkeypatch):
    ckpt = save_run(tmp_path)
    evaluate_command([str(ckpt), "--task", "multiple_choice", "--data", str(DATA / "mc-example.jsonl"), "--limit", "6"])
    out = capsys.readouterr()
    assert "acc_norm" in out.out and "metric" in out.out and "results written to" in out.err
    results = json.loads((tmp_path / "run" / "eval" / "multiple_choice-mc-example.json").read_text())
    assert results["task"] == "multiple_choice" and results["num_examples"] == 6 == len(results["examples"])
    assert results["model"] == str(ckpt) and results["data"] == str(DATA / "mc-example.jsonl")
    assert results["lmforge_version"] == lmforge.__version__ and results["date"]
    assert 0 <= results["metrics"]["acc"] <= 1 and results["examples"][1]["line"] == 2

    evaluate_command(
        [str(ckpt), "--task", "generation", "--data", str(DATA / "gen-example.jsonl"), "--limit", "3"]
        + ["--max-new-tokens", "4", "--batch-size", "2", "--smooth-bleu"]
    )
    results = json.loads((tmp_path / "run" / "eval" / "generation-gen-example.json").read_text())
    assert set(results["metrics"]) >= {"bleu", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert len(results["examples"]) == 3 and isinstance(results["examples"][0]["output"], str)
    assert "bleu" in capsys.readouterr().out

    text = tmp_path / "corpus.txt"
    text.write_text("Every quiet fox follows the lantern beyond the river. " * 6)
    monkeypatch.chdir(tmp_path)
    out_file = tmp_path / "ppl.json"
    evaluate_command([str(ckpt), "--task", "perplexity", "--data", str(text), "--output", str(out_file)])
    results = json.loads(out_file.read_text())
    assert results["metrics"]["tokens"] == len(text.read_text()) and results["metrics"]["perplexity"] > 1
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".ppl.json.*"))
    # a model outside <run>/checkpoints: results in ./eval
    other = tmp_path / "model.ckpt"
    other.write_bytes(ckpt.read_bytes())
    evaluate_command([str(other), "--task", "perplexity", "--data", str(text)])
    assert (tmp_path / "eval" / "perplexity-corpus.json").is_file()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_naming_file_line_and_key(tmp_path):
    ckpt = save_run(tmp_path)
    good = {"question": "Q", "choices": [" a", " b"], "answer": 0}

    def run(lines: list[str], task: str = "multiple_choice") -> str:
        data = tmp_path / "data.jsonl"
        data.write_text("\n".join(lines) + "\n")
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            evaluate_command([str(ckpt), "--task", task, "--data", str(data)])
        return one_line(err)

    msg = run([json.dumps(good), json.dumps({"question": "Q", "answer": 0})])
    assert f"{tmp_path / 'data.jsonl'} line 2" in msg and "'choices'" in msg
    msg = run([json.dumps(good), "", json.dumps({**good, "answer": 2})])
    assert "line 3" in msg and "'answer'=2 is out of range for 2 choices" in msg
    msg = run([json.dumps({**good, "label": "x"}).replace('"answer": 0, ', "")])
    assert "line 1" in msg and "'label'='x'" in msg
    msg = run([json.dumps(good), "{not json"])
    assert "line 2: not valid JSON" in msg and "--bad-lines skip" in msg
    msg = run([json.dumps({"prompt": "Q", "answer": " a"})], task="generation")
    assert "line 1" in msg and "'completion' or 'references'" in msg
    msg = run([json.dumps({"prompt": "Q", "references": []})], task="generation")
    assert "line 1" in msg and "'references' must be a non-empty list" in msg
    msg = run([json.dumps({"body": "x"})], task="perplexity")
    assert "line 1" in msg and "'text'" in msg

    with pytest.raises(FileNotFoundError) as err:
        evaluate_command([str(ckpt), "--task", "perplexity", "--data", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl not found" in one_line(err)
    with pytest.raises(FileNotFoundError) as err:
        evaluate_command(
            [str(tmp_path / "nope.ckpt"), "--task", "multiple_choice", "--data", str(DATA / "mc-example.jsonl")]
        )
    assert "nope.ckpt does not exist" in one_line(err)
    with pytest.raises(ValueError) as err:
        evaluate_command([str(ckpt), "--task", "nonsense", "--data", "x.jsonl"])
    assert one_line(err).startswith("evaluate: argument --task")


def test_example_files_are_valid():
    mc = evaluate.choice_records(evaluate.read_data(str(DATA / "mc-example.jsonl"), "multiple_choice"))
    gen = evaluate.generation_records(evaluate.read_data(str(DATA / "gen-example.jsonl"), "generation"))
    assert len(mc) == 50 and len(gen) == 50
    assert all(len(r.choices) == 4 for r in mc)
    assert all(len((r.prompt + r.references[0]).encode()) + 32 <= 128 for r in gen)  # fit gpt-tiny's context


def test_generation_prompt_that_leaves_no_room_names_its_record():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))  # block_size 64
    records = [{"prompt": "short", "completion": " a"}, {"prompt": "x" * 64, "completion": " b"}]
    with pytest.raises(CorpusError) as err:
        evaluate.generation_metrics(model, ByteTokenizer(), records)
    assert one_line(err).startswith("evaluate: record 2: the prompt has 64 tokens")


def test_lmforge_evaluate_command(tmp_path, capsys):
    """The ``evaluate`` subcommand of the lmforge CLI: a table on success, one error line and exit 2 on bad input."""
    from lmforge import cli

    ckpt = save_run(tmp_path)
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "Q", "choices": [" a", " b"], "answer": 1}) + "\n")
    cli.main(["evaluate", str(ckpt), "--task", "multiple_choice", "--data", str(data)])
    assert "acc_norm" in capsys.readouterr().out and (tmp_path / "run" / "eval" / "multiple_choice-mc.json").is_file()
    data.write_text(json.dumps({"question": "Q", "choices": [" a", " b"], "answer": 5}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(ckpt), "--task", "multiple_choice", "--data", str(data)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lmforge: error: evaluate: {data} line 1: 'answer'=5 is out of range for 2 choices (0 to 1)"
    )
