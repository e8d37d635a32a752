"""The fine-tuning data modules: SFT (prompt/completion, chat, masking, truncation, packing) and classification."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.data.classify import ClassificationDataModule
from lmforge.data.packing import IGNORE_INDEX, pack
from lmforge.data.sft import SFTDataModule
from lmforge.data.sources import CorpusError
from lmforge.model import GPTConfig
from lmforge.tokenizers import ByteTokenizer, HFTokenizer

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"
EOS = ByteTokenizer.eos_id


class BosTokenizer(ByteTokenizer):
    """Bytes plus a beginning-of-sequence token 257."""

    vocab_size = 258
    bos_id = 257


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_text(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def sft(train: str, max_length: int = 64, tokenizer=None, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(train, **kwargs)
    dm.set_tokenizer(tokenizer or ByteTokenizer(), max_length)
    dm.setup("fit")
    return dm


def all_batches(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def unmasked(input_ids: torch.Tensor, labels: torch.Tensor) -> list[int]:
    return labels[labels != IGNORE_INDEX].tolist()


PC = [
    {"prompt": "Q: one\nA:", "completion": " 1"},
    {"prompt": "Question: three plus four\nA:", "completion": " seven"},
    {"prompt": "", "completion": "no prompt"},
]


# -- SFT: masking --------------------------------------------------------------------------------------------


def test_prompt_masking_and_padding(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", PC)
    dm = sft(train, val=train, batch_size=3)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool
    B, T = batch["input_ids"].shape
    tok = ByteTokenizer()
    lengths = [len(tok.encode(r["prompt"] + r["completion"] + "!")) - 1 for r in PC]  # len(ids) - 1 (! is the EOS)
    assert (B, T) == (3, max(lengths))
    for b, record in enumerate(PC):
        n_prompt = len(tok.encode(record["prompt"]))
        ids = tok.encode(record["prompt"]) + tok.encode(record["completion"]) + [EOS]
        n = lengths[b]
        assert batch["input_ids"][b, :n].tolist() == ids[:-1]
        assert (batch["input_ids"][b, n:] == EOS).all()  # right padding with the EOS id
        assert batch["attention_mask"][b].tolist() == [True] * n + [False] * (T - n)
        labels = batch["labels"][b].tolist()
        # target t is ids[t + 1]: masked exactly while it is a prompt token, and on padding
        expected = [IGNORE_INDEX if t + 1 < n_prompt else ids[t + 1] for t in range(n)] + [IGNORE_INDEX] * (T - n)
        assert labels == expected
        kept = [x for x in labels if x != IGNORE_INDEX]
        # the loss covers the completion and the EOS (without a prompt or bos, the first token has no context)
        completion = record["completion"] if record["prompt"] else record["completion"][1:]
        assert kept[-1] == EOS and tok.decode(kept[:-1]) == completion


def test_prompt_and_completion_tokenized_separately(tmp_path):
    seen = []

    class Recording(ByteTokenizer):
        def encode(self, text):
            seen.append(text)
            return super().encode(text)

    train = write_jsonl(tmp_path / "t.jsonl", PC[:2])
    sft(train, val=train, tokenizer=Recording())
    assert seen == ["Q: one\nA:", " 1", "Question: three plus four\nA:", " seven"] * 2  # once each, train and val


def test_chat_masking(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": "Forge"},
            {"role": "user", "content": "ignored: after the last answer"},
        ]
    }
    train = write_jsonl(tmp_path / "chat.jsonl", [record])
    dm = sft(train, val=train, max_length=128)
    batch = next(iter(dm.train_dataloader()))
    tok = ByteTokenizer()
    e = tok.encode
    expected = (
        e("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n")
        + e("Hello")
        + [EOS]
        + e("\n<|user|>\nName?\n<|assistant|>\n")
        + e("Forge")
        + [EOS]
    )
    assert batch["input_ids"][0].tolist() == expected[:-1]
    trained = set(range(len(e("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n")), len(expected)))
    first_tail = len(e("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello")) + 1
    trained -= set(range(first_tail, first_tail + len(e("\n<|user|>\nName?\n<|assistant|>\n"))))
    labels = batch["labels"][0].tolist()
    assert [i + 1 for i, x in enumerate(labels) if x != IGNORE_INDEX] == sorted(trained)
    assert unmasked(batch["input_ids"][0], batch["labels"][0]) == e("Hello") + [EOS] + e("Forge") + [EOS]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "bot", "content": "hi"}], r"role 'bot'; use one of system, user, assistant"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
            r"messages\[1\] \(assistant\) is empty",
        ),
        ([{"role": "user"}], r"messages\[0\] needs 'role' and 'content'"),
    ],
)
def test_chat_errors(tmp_path, messages, match):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(CorpusError, match=f"chat.jsonl line 1: .*{match}"):
        sft(train, val=train)


def test_bos(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ab", "completion": "cd"}, {"prompt": "", "completion": "x"}])
    dm = sft(train, val=train, tokenizer=BosTokenizer(), batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    a, b, c, d, x = (ord(ch) for ch in "abcdx")
    assert batch["input_ids"][0].tolist() == [257, a, b, c, d]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, c, d, EOS]
    assert batch["input_ids"][1].tolist() == [257, x, EOS, EOS, EOS]  # padded
    assert batch["labels"][1].tolist() == [x, EOS, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]  # bos predicts x


# -- SFT: truncation -----------------------------------------------------------------------------------------

LONG = [{"prompt": "p" * 20, "completion": "c" * 5}, {"prompt": "q", "completion": "short"}]


def test_truncation_error(tmp_path):
    train = write_jsonl(tmp_path / "long.jsonl", LONG)
    with pytest.raises(CorpusError) as err:
        sft(train, val=train, max_length=10)
    message = str(err.value)
    assert "\n" not in message
    assert "long.jsonl line 1" in message and "26 tokens" in message and "max_length=10" in message
    assert "truncate_prompt" in message and "drop" in message


def test_truncate_prompt_keeps_bos_and_completion(tmp_path, caplog):
    train = write_jsonl(tmp_path / "long.jsonl", LONG)
    with caplog.at_level(logging.INFO, logger="lmforge"):
        dm = sft(train, val=train, max_length=10, truncation="truncate_prompt", tokenizer=BosTokenizer())
    ex = dm.examples["val"][0]
    assert len(ex) == 10
    assert ex.input_ids.tolist() == [257] + [ord("p")] * 4 + [ord("c")] * 5  # 16 prompt tokens gone from the left
    assert unmasked(ex.input_ids, ex.labels) == [ord("c")] * 5 + [EOS]
    assert dm.stats["truncated"] == 2 and dm.stats["completion_cut"] == 0  # once in train, once in val
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_truncate_prompt_cuts_completion_when_it_alone_is_too_long(tmp_path):
    train = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "pp", "completion": "c" * 30}])
    dm = sft(train, val=train, max_length=8, truncation="truncate_prompt")
    ex = dm.examples["val"][0]
    assert len(ex) == 8
    assert ex.input_ids.tolist() == [ord("c")] * 8
    assert EOS not in ex.labels.tolist()  # cut on the right: no end-of-text
    assert dm.stats["completion_cut"] == 2


def test_truncation_drop(tmp_path):
    train = write_jsonl(tmp_path / "long.jsonl", LONG)
    dm = sft(train, val=train, max_length=10, truncation="drop")
    assert dm.num_examples == 1 and dm.stats["dropped"] == 2
    assert ByteTokenizer().decode(dm.examples["train"][0].input_ids.tolist()) == "qshort"
    only_long = write_jsonl(tmp_path / "only.jsonl", LONG[:1])
    with pytest.raises(CorpusError, match="no train examples left"):
        sft(only_long, val=only_long, max_length=10, truncation="drop")


# -- SFT: packing --------------------------------------------------------------------------------------------


def test_packing(tmp_path):
    records = [{"prompt": f"P{i}:" + "x" * (i % 7), "completion": "y" * (1 + i % 5)} for i in range(40)]
    train = write_jsonl(tmp_path / "t.jsonl", records)
    plain = sft(train, val=train, max_length=24)
    packed = sft(train, val=train, max_length=24, packing=True, batch_size=4)
    expected = Counter((tuple(ex.input_ids.tolist()), tuple(ex.labels.tolist())) for ex in plain.examples["train"])
    for epoch in range(2):
        found = Counter()
        for batch in packed.train_dataloader():
            assert set(batch) == {"input_ids", "labels", "attention_mask", "segment_ids", "position_ids"}
            assert batch["input_ids"].shape[1] == 24
            for row in range(batch["input_ids"].shape[0]):
                seg, pos = batch["segment_ids"][row], batch["position_ids"][row]
                mask = batch["attention_mask"][row]
                assert mask.tolist() == (seg > 0).tolist()
                assert (batch["labels"][row][~mask] == IGNORE_INDEX).all()
                assert (batch["input_ids"][row][~mask] == EOS).all()
                n_docs = int(seg.max())
                assert seg[mask].tolist() == sorted(seg[mask].tolist())  # documents contiguous, 1, 2, 3...
                for doc in range(1, n_docs + 1):
                    where = (seg == doc).nonzero().flatten()
                    assert pos[where].tolist() == list(range(len(where)))  # positions restart per document
                    ids = tuple(batch["input_ids"][row][where].tolist())
                    labels = tuple(batch["labels"][row][where].tolist())
                    found[(ids, labels)] += 1  # a whole example: it must equal an unpacked one
        assert found == expected, f"epoch {epoch}: every example exactly once, none split"
    assert packed.stats["packed_rows"] < len(records)


def test_pack_best_fit():
    rows = pack([5, 3, 4, 2, 6], capacity=8)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 6][i] for i in row) <= 8 for row in rows)
    assert len(rows) == 3


# -- SFT: reading and errors ---------------------------------------------------------------------------------


def test_jsonl_bad_line_error_and_skip(tmp_path, caplog):
    lines = [json.dumps(PC[0]), "", '{"prompt": "a" "completion": "b"}', json.dumps(PC[1]), "[1, 2]", json.dumps(PC[2])]
    train = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(
        CorpusError, match=r"train.jsonl line 3: not valid JSON \(Expecting ',' delimiter\).*bad_lines: skip"
    ):
        sft(train, val=train)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        dm = sft(train, val=train, bad_lines="skip")
    assert dm.num_examples == 3 and dm.stats["skipped_lines"] == 4  # 2 bad lines, in train and in val
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "skipped 2 bad line(s) (line 3, 5)" in warnings[0]


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": "a", "completion": ""}, r"line 2: the completion \('completion'\) is empty"),
        (
            {"prompt": "a", "answer": "b"},
            r"line 2: no field 'completion' \(the record has 'prompt', 'answer'\); set data.completion_field",
        ),
        ({"prompt": 3, "completion": "b"}, r"line 2: field 'prompt' is int, not text"),
    ],
)
def test_record_errors(tmp_path, record, match):
    train = write_jsonl(tmp_path / "train.jsonl", [PC[0], record])
    with pytest.raises(CorpusError, match=match):
        sft(train, val=train)


def test_file_errors(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", PC)
    with pytest.raises(CorpusError, match=r"missing.jsonl not found; check data.val"):
        sft(good, val=str(tmp_path / "missing.jsonl"))
    with pytest.raises(CorpusError, match=r"unknown format '.txt'"):
        sft(write_text(tmp_path / "a.txt", "hi"), val=good)
    with pytest.raises(CorpusError, match=r"empty.jsonl has no records"):
        sft(write_text(tmp_path / "empty.jsonl", "\n\n"), val=good)
    unconnected = SFTDataModule(good)
    unconnected.setup("fit")  # waits for connect()
    with pytest.raises(CorpusError, match=r"no tokenizer"):
        unconnected.train_dataloader()


def test_json_list_format_and_line_numbers(tmp_path):
    text = '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": ""}\n]\n'
    path = write_text(tmp_path / "data.json", text)
    with pytest.raises(CorpusError, match=r"data.json line 3: the completion"):
        sft(path, val=path)
    path = write_text(tmp_path / "ok.json", json.dumps(PC, indent=1))
    assert sft(path, val=path).num_examples == 3
    path = write_text(tmp_path / "bad.json", '[{"prompt": "a",\n "completion": }]')
    with pytest.raises(CorpusError, match=r"bad.json line 2 column 16: not valid JSON"):
        sft(path, val=path)


def test_val_split_is_deterministic(tmp_path):
    records = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(50)]
    train = write_jsonl(tmp_path / "t.jsonl", records)

    def val_texts(seed):
        dm = sft(train, val_fraction=0.2, seed=seed)
        assert dm.stats["examples"] == 40 and dm.stats["val_examples"] == 10
        assert dm.examples["test"] is dm.examples["val"]
        return [ByteTokenizer().decode(ex.input_ids.tolist()) for ex in dm.examples["val"]]

    assert val_texts(0) == val_texts(0)
    assert val_texts(0) != val_texts(1)
    train_texts = {
        ByteTokenizer().decode(ex.input_ids.tolist()) for ex in sft(train, val_fraction=0.2).examples["train"]
    }
    assert not train_texts & set(val_texts(0))


def test_shuffling_is_seeded(tmp_path):
    records = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(30)]
    train = write_jsonl(tmp_path / "t.jsonl", records)
    first = [b["input_ids"].tolist() for b in sft(train, batch_size=4, seed=3).train_dataloader()]
    again = [b["input_ids"].tolist() for b in sft(train, batch_size=4, seed=3).train_dataloader()]
    assert first == again


def test_tokenizer_and_max_length_from_the_model(tmp_path):
    train = write_jsonl(tmp_path / "long.jsonl", LONG)
    dm = SFTDataModule(train, val=train, truncation="drop")
    module = SimpleNamespace(tokenizer=ByteTokenizer(), config=GPTConfig(vocab_size=320, block_size=10))
    dm.setup("fit")
    dm.connect(tokenizer=module.tokenizer, max_seq_length=module.config.block_size)  # as the task's setup does
    assert dm.tokenizer is module.tokenizer and dm.stats["dropped"] == 2


# -- classification -----------------------------------------------------------------------------------------

CSV = 'text,label\nthe fox runs,animal\nthe king rules,person\n"a river, wide\nand long",place\nthe owl sees,animal\n'


def classify(train: str, max_length: int = 32, tokenizer=None, **kwargs) -> ClassificationDataModule:
    dm = ClassificationDataModule(train, **kwargs)
    dm.set_tokenizer(tokenizer or ByteTokenizer(), max_length)
    dm.setup("fit")
    return dm


def test_classification_batches_and_labels(tmp_path):
    train = write_text(tmp_path / "train.csv", CSV)
    dm = ClassificationDataModule(train, val=train, batch_size=4)
    assert dm.label_names == ["animal", "person", "place"]  # before setup, without a tokenizer
    dm.set_tokenizer(BosTokenizer(), max_length=8)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].tolist() == [0, 1, 2, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == (4, 8) and batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"][0, :8].tolist() == [257, *b"the fox"]  # bos, then the beginning of the text
    assert batch["input_ids"][3].tolist() == [257, *b"the owl sees"][:8]
    assert dm.stats["truncated"] == 2 * 4  # all 4 texts are longer than 8 tokens, in train and in val


def test_classification_int_labels_and_given_labels(tmp_path):
    records = [{"text": f"t{i}", "label": i % 11} for i in range(22)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = classify(train, val=train)
    assert dm.label_names == [str(i) for i in range(11)]  # numeric order
    assert dm.datasets["val"].labels[:11] == list(range(11))
    dm = ClassificationDataModule(train, val=train, labels=[str(i) for i in reversed(range(11))])
    assert dm.label_names[0] == "10"
    with pytest.raises(CorpusError, match=r"train.jsonl line 1: label '0' is not in data.labels \(1, 2\)"):
        _ = ClassificationDataModule(train, labels=["1", "2"]).label_names


def test_classification_unseen_label(tmp_path):
    train = write_text(tmp_path / "train.csv", CSV)
    val = write_text(tmp_path / "val.csv", "text,label\nthe fox,animal\n\nthe ship sails,vehicle\n")
    with pytest.raises(CorpusError) as err:
        classify(train, val=val)
    message = str(err.value)
    assert "val.csv line 4: label 'vehicle'" in message and "animal, person, place" in message


def test_classification_missing_column(tmp_path):
    train = write_text(tmp_path / "train.csv", "sentence,label\nthe fox,animal\n")
    with pytest.raises(
        CorpusError, match=r"train.csv: no column 'text' \(the columns are 'sentence', 'label'\); set data.text_field"
    ):
        _ = ClassificationDataModule(train).label_names
    dm = classify(train, val=train, text_field="sentence")
    assert dm.num_examples == 1


def test_classification_csv_line_numbers(tmp_path):
    # the quoted record spans lines 4-5, the owl is on line 6, the bad record on line 7
    train = write_text(tmp_path / "train.csv", CSV + "the end,,extra\nthe last,place\n")
    with pytest.raises(CorpusError, match=r"train.csv line 7: 3 field\(s\), the header has 2"):
        _ = ClassificationDataModule(train).label_names
    empty = write_text(tmp_path / "empty.csv", CSV.replace("the owl sees", "  "))
    with pytest.raises(CorpusError, match=r"empty.csv line 6: the text \('text'\) is empty"):
        _ = ClassificationDataModule(empty).label_names
    dm = ClassificationDataModule(train, bad_lines="skip")
    assert dm.num_examples == 5 and dm._skipped == 1


def test_classification_val_split(tmp_path):
    rows = "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(40))
    train = write_text(tmp_path / "train.csv", "text,label\n" + rows)
    a, b = classify(train, val_fraction=0.25), classify(train, val_fraction=0.25)
    assert len(a.datasets["val"]) == 10 and len(a.datasets["train"]) == 30
    assert [t.tolist() for t in a.datasets["val"].ids] == [t.tolist() for t in b.datasets["val"].ids]
    assert a.datasets["test"] is a.datasets["val"]


# -- the shipped examples ------------------------------------------------------------------------------------


def test_shipped_examples_load(tmp_path):
    before = sorted(p.name for p in DATA.iterdir())
    dm = sft(str(DATA / "sft-train.jsonl"), val=str(DATA / "sft-val.jsonl"), max_length=128)
    assert dm.stats["examples"] >= 700 and dm.stats["val_examples"] >= 90
    assert dm.stats["truncated"] == dm.stats["dropped"] == 0 and dm.stats["longest"] < 120
    chat = sft(str(DATA / "chat-train.jsonl"), max_length=128, packing=True)
    assert chat.stats["examples"] + chat.stats["val_examples"] >= 180
    cls = classify(str(DATA / "classify-train.csv"), val=str(DATA / "classify-val.csv"), max_length=128)
    assert len(cls.label_names) == 3
    assert len(set(cls.stats["label_counts"].values())) == 1  # balanced
    assert sorted(p.name for p in DATA.iterdir()) == before  # reading writes nothing
    for path in DATA.iterdir():
        assert path.stat().st_size < 100_000


# -- SFT: the model's own chat template (Jinja) ---------------------------------------------------------------

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (  # as Llama 3's: the bos before the first message, content trimmed, <|eot_id|> ends every turn
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_TEXTS = [
    "Be brief. You name the subject of the sentence.",
    "The brave fox sees the river. The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you? I am fine, thank you. What is your name?",
] * 20
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The brave fox sees the river."},
        {"role": "assistant", "content": "fox"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there, how are you?"},
        {"role": "user", "content": "Your name?"},
        {"role": "assistant", "content": "I am the fox.\nThank you."},
    ],
    [
        {"role": "system", "content": "You name the subject."},
        {"role": "user", "content": "The dog sees the fox."},
        {"role": "assistant", "content": " dog "},
        {"role": "user", "content": "And the river?"},
        {"role": "assistant", "content": "river"},
        {"role": "user", "content": "after the last answer: no loss, left out"},
    ],
]


def hf_chat_tokenizer(folder: Path, specials: list[str], template: str, post_bos: bool = False, **tokens):
    """A tiny byte-level BPE with ``specials``, saved with ``template`` by transformers (its tokenizer object)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CHAT_TEXTS, trainer=trainer)
    if post_bos:  # the tokenizer adds the bos itself, as Llama 3's does
        bos = tokens["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **tokens)
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def chat_model(request, tmp_path_factory):
    """(transformers tokenizer, lmforge HFTokenizer, how the template writes an answer's content and end of turn)
    of a ChatML or a Llama-3-style tokenizer."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "chatml":
        hf = hf_chat_tokenizer(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, eos_token="<|im_end|>")
        turn = "{}<|im_end|>\n".format
    else:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        hf = hf_chat_tokenizer(folder, specials, LLAMA3, post_bos=True, **tokens)
        turn = lambda content: content.strip() + "<|eot_id|>"  # noqa: E731
    tokenizer = HFTokenizer.from_pretrained_folder(folder)
    assert tokenizer.chat_template == hf.chat_template
    return hf, tokenizer, turn


def hf_ids(hf, messages: list[dict], prompt: bool = False) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def ids_of(example) -> list[int]:
    """The whole token sequence of an example (the model reads all but the last token)."""
    return example.input_ids.tolist() + example.labels[-1:].tolist()


def runs(labels: list[int]) -> list[list[int]]:
    """The unmasked labels, as runs of consecutive positions."""
    found: list[list[int]] = []
    previous = IGNORE_INDEX
    for x in labels:
        if x != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                found.append([])
            found[-1].append(x)
        previous = x
    return found


def test_tokenizer_chat_template_matches_transformers(tmp_path, chat_model):
    hf, tokenizer, turn = chat_model
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    dm = sft(train, val=train, tokenizer=tokenizer, chat_template="tokenizer", max_length=256)
    examples = dm.examples["val"]
    assert len(examples) == len(CONVERSATIONS)
    for example, messages in zip(examples, CONVERSATIONS):
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        kept = messages[: answers[-1] + 1]  # text after the last answer is left out
        ids = ids_of(example)
        assert ids == hf_ids(hf, kept)  # same text, same ids: special tokens are single ids, one bos at most
        if tokenizer.bos_id is not None:
            assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id
        # trained: exactly the tokens each answer adds to the prompt (messages[:i] + the generation prompt)
        trained = set()
        for i in answers:
            trained |= set(range(len(hf_ids(hf, messages[:i], prompt=True)), len(hf_ids(hf, messages[: i + 1]))))
        labels = example.labels.tolist()
        assert labels == [ids[t + 1] if t + 1 in trained else IGNORE_INDEX for t in range(len(labels))]
        # decoded, the unmasked labels are the assistant turns, each with its end-of-turn token
        decoded = [hf.decode(run, skip_special_tokens=False) for run in runs(labels)]
        assert decoded == [turn(messages[i]["content"]) for i in answers]
        for m in messages:
            if m["role"] != "assistant":
                assert all(m["content"] not in text for text in decoded)


def test_tokenizer_chat_template_truncate_prompt_keeps_the_bos(tmp_path, chat_model):
    hf, tokenizer, turn = chat_model
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    full = len(hf_ids(hf, CONVERSATIONS[0]))
    dm = sft(
        train,
        val=train,
        tokenizer=tokenizer,
        chat_template="tokenizer",
        max_length=full - 4,
        truncation="truncate_prompt",
    )
    assert dm.stats["truncated"] == 2  # the record, in train and in val
    ids = ids_of(dm.examples["val"][0])
    assert len(ids) == full - 3 and ids[-4:] == hf_ids(hf, CONVERSATIONS[0])[-4:]
    if tokenizer.bos_id is not None:
        assert ids[0] == tokenizer.bos_id
    assert hf.decode(runs(dm.examples["val"][0].labels.tolist())[0], skip_special_tokens=False) == turn("fox")


def test_tokenizer_chat_template_missing(tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(
        CorpusError, match="data.chat_template: tokenizer, but the tokenizer has no chat template"
    ) as err:
        sft(train, val=train, chat_template="tokenizer")
    assert "\n" not in str(err.value)
    # prompt/completion records do not need one
    pc = write_jsonl(tmp_path / "pc.jsonl", PC)
    with_option = sft(pc, val=pc, chat_template="tokenizer").examples["val"]
    plain = sft(pc, val=pc).examples["val"]
    assert [ids_of(a) for a in with_option] == [ids_of(b) for b in plain]


def test_chat_template_file_maps_special_tokens_to_ids(tmp_path):
    """A .jinja file with the byte tokenizer: the EOS written as text becomes the EOS id, lmforge adds no EOS;
    {% generation %} renders its body, and trim_blocks drops the newline after a block tag."""
    template = write_text(
        tmp_path / "t.jinja",
        "{% for m in messages %}[{{ m.role }}] {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    )
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    train = write_jsonl(tmp_path / "chat.jsonl", [record])
    example = sft(train, val=train, chat_template=template).examples["val"][0]
    e = ByteTokenizer().encode
    assert ids_of(example) == e("[user] Hi") + [EOS] + e("[assistant] Hello") + [EOS]
    assert runs(example.labels.tolist()) == [e("Hello") + [EOS]]


def test_chat_template_bos_written_by_the_template(tmp_path):
    """No second bos when the rendered text starts with the bos token; one is added when it does not."""

    class Bos(BosTokenizer):
        bos_token = "<s>"

        def special_tokens(self):
            return {"<s>": 257}

    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    train = write_jsonl(tmp_path / "chat.jsonl", [record])
    body = "{% for m in messages %}{{ m.content }}|{% endfor %}"
    e = ByteTokenizer().encode
    with_bos = write_text(tmp_path / "bos.jinja", "{{ bos_token }}" + body)
    assert ids_of(sft(train, val=train, tokenizer=Bos(), chat_template=with_bos).examples["val"][0]) == [
        257,
        *e("Hi|Yo|"),
    ]
    without = write_text(tmp_path / "plain.jinja", body)
    assert ids_of(sft(train, val=train, tokenizer=Bos(), chat_template=without).examples["val"][0]) == [
        257,
        *e("Hi|Yo|"),
    ]


@pytest.mark.parametrize(
    "template, match",
    [
        ("{% for m in messages %}{{ m.content }", r"t.jinja: not a valid Jinja template \(line 1: "),
        (
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "{{ m.content }}{% endfor %}",
            r"chat.jsonl line 2: chat template .*t.jinja fails on messages\[:1\]: TemplateError: no system role",
        ),
        (  # rewrites earlier turns: a message count in front
            "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
            r"chat.jsonl line 1: .*renders messages\[:2\] as text that does not start with its render of messages\[:1\]",
        ),
        (
            "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}",
            r"chat.jsonl line 1: .*renders messages\[:2\] as text that does not add to its render of messages\[:1\]",
        ),
    ],
)
def test_chat_template_errors(tmp_path, template, match):
    path = write_text(tmp_path / "t.jinja", template)
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Yo"}]},
    ]
    train = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(CorpusError, match=match) as err:
        sft(train, val=train, chat_template=path)
    assert "\n" not in str(err.value)


def test_chat_template_option_errors(tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(CorpusError, match=r"data.chat_template='nope.jinja' is not lmforge, tokenizer or an existing"):
        sft(train, val=train, chat_template="nope.jinja")
    with pytest.raises(ValueError, match="must be lmforge, tokenizer or the path"):
        SFTDataModule(train, chat_template="")


def test_chat_template_is_sandboxed(tmp_path):
    path = write_text(
        tmp_path / "t.jinja", "{{ messages.__class__.__mro__ }}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(CorpusError, match="fails on messages"):
        sft(train, val=train, chat_template=path)


def test_tokenizer_chat_template_sentencepiece_style(tmp_path):
    """A Metaspace (SentencePiece-style) tokenizer marks the start of a text: pieces that continue the chat are
    encoded as in the middle of it, so the ids still equal transformers' for the whole conversation."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RustTokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ[]/?,.▁\n")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CHAT_TEXTS + ["[INST] Hi [/INST] Hello"] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    template = (  # Llama 2's layout
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=template
    )
    hf.save_pretrained(tmp_path / "tok")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "The fox?"},
        {"role": "assistant", "content": "river"},
    ]
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    tokenizer = HFTokenizer.from_pretrained_folder(tmp_path / "tok")
    example = sft(train, val=train, tokenizer=tokenizer, chat_template="tokenizer").examples["val"][0]
    assert ids_of(example) == hf_ids(hf, messages)
    decoded = [hf.decode(run, skip_special_tokens=False) for run in runs(example.labels.tolist())]
    assert decoded == ["Hello there</s>", "river</s>"]
