"""Write the example fine-tuning data in this folder (seeded: the same files every run).

    python configs/data/make_examples.py [--out DIR]

Every text uses the vocabulary of lmforge's embedded synthetic grammar (lmforge/data/synthetic.py), so a
byte-level GPT pretrained on that corpus (configs/gpt-tiny.yaml) already knows the words:

- sft-train.jsonl (800), sft-val.jsonl (100): prompt/completion. The prompt is ``"Sentence: <a sentence of
  the embedded corpus>\\nSubject:"``, the completion the subject noun with a leading space (``" fox"``).
- chat-train.jsonl (200): the same task as chat ``messages`` with a system message.
- classify-train.csv (600), classify-val.csv (120): columns ``text,label``; grammar-like sentences whose nouns
  are all animals, all people or all places, labelled ``animal``, ``person`` or ``place`` (balanced).
- preference-train.jsonl (400), preference-val.jsonl (100): prompt/chosen/rejected on the SFT prompts. The
  preferred answer names the whole subject as the sentence does (``" The hungry wizard"``), the rejected one
  the bare noun that SFT taught (``" wizard"``): a preference the SFT model does not have yet, so its preference
  accuracy starts low and rises under DPO (configs/finetune-dpo.yaml).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from lmforge.data.synthetic import WORDS, SyntheticGrammar

SEED = 0
SFT_TRAIN, SFT_VAL, CHAT_TRAIN = 800, 100, 200
CLASSIFY_TRAIN, CLASSIFY_VAL = 200, 40  # per class
PREF_TRAIN, PREF_VAL = 400, 100
SYSTEM = "Name the subject."
MAX_BYTES = 120  # a whole example, template included, fits configs/gpt-tiny.yaml's block_size (128)
TOPICS = {
    "animal": ("fox", "whale", "owl", "tiger", "dragon"),
    "person": ("king", "sailor", "teacher", "child", "doctor", "baker", "painter", "farmer", "wizard"),
    "place": ("river", "garden", "mountain", "forest", "castle", "island", "village", "bridge", "harbor", "library"),
}
assert all(noun in WORDS["NOUN"] for nouns in TOPICS.values() for noun in nouns)


def corpus_sentences(n: int) -> list[str]:
    """``n`` distinct sentences drawn from the embedded corpus's grammar (seed 0, as in configs/gpt-tiny.yaml)."""
    grammar = SyntheticGrammar(seed=0)
    seen: dict[str, None] = {}
    seed = SEED
    while len(seen) < n:
        text, _ = grammar.generate(1, seed=1_000_000 + seed)  # one sentence; seeds apart from the corpus's own
        seen.setdefault(text.strip(), None)
        seed += 1
    return list(seen)


def subject(sentence: str) -> str:
    """The first noun of a grammar sentence: determiners and adjectives are never nouns."""
    return next(w for w in sentence.rstrip(".").lower().split() if w in WORDS["NOUN"])


def sft_record(sentence: str) -> dict:
    return {"prompt": f"Sentence: {sentence}\nSubject:", "completion": f" {subject(sentence)}"}


def subject_phrase(sentence: str) -> str:
    """The sentence's words up to and including its subject noun: ``The hungry wizard``."""
    words = sentence.rstrip(".").split()
    end = next(i for i, w in enumerate(words) if w.lower() in WORDS["NOUN"])
    return " ".join(words[: end + 1])


def preference_record(sft: dict) -> dict:
    sentence = sft["prompt"].removeprefix("Sentence: ").removesuffix("\nSubject:")
    return {"prompt": sft["prompt"], "chosen": f" {subject_phrase(sentence)}", "rejected": sft["completion"]}


def chat_record(sentence: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": subject(sentence)},
        ]
    }


def length(record: dict) -> int:
    """Bytes of a record as the model reads it (lmforge's chat template for messages), EOS tokens included."""
    if "messages" in record:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in record["messages"])  # + EOS per answer
        return len(text.encode())
    return len((record["prompt"] + record["completion"]).encode()) + 1


def topic_sentence(rng: random.Random, nouns: tuple[str, ...]) -> str:
    """A grammar-like sentence (determiner, adjective, noun, verb, object, place, adverb) about ``nouns`` only."""

    def phrase(adjective: float) -> list[str]:
        words = [rng.choice(WORDS["DET"])]
        if rng.random() < adjective:
            words.append(rng.choice(WORDS["ADJ"]))
        return [*words, rng.choice(nouns)]

    words = [*phrase(0.4), rng.choice(WORDS["VERB"])]
    if rng.random() < 0.8:
        words += phrase(0.3)
    if rng.random() < 0.4:
        words += [rng.choice(WORDS["PREP"]), *phrase(0.0)]
    if rng.random() < 0.2:
        words.append(rng.choice(WORDS["ADV"]))
    return " ".join(words).capitalize() + "."


def classify_rows(rng: random.Random, per_class: int, seen: set[str]) -> list[tuple[str, str]]:
    rows = []
    for label, nouns in TOPICS.items():
        count = 0
        while count < per_class:
            text = topic_sentence(rng, nouns)
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
                count += 1
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder to write (default: this one)")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)

    sentences = corpus_sentences(2 * (SFT_TRAIN + SFT_VAL + CHAT_TRAIN))
    sft = [r for r in map(sft_record, sentences) if length(r) <= MAX_BYTES][: SFT_TRAIN + SFT_VAL]
    used = {r["prompt"] for r in sft}
    chat = [chat_record(s) for s in sentences if sft_record(s)["prompt"] not in used]
    chat = [r for r in chat if length(r) <= MAX_BYTES][:CHAT_TRAIN]
    assert len(sft) == SFT_TRAIN + SFT_VAL and len(chat) == CHAT_TRAIN
    write_jsonl(out / "sft-train.jsonl", sft[:SFT_TRAIN])
    write_jsonl(out / "sft-val.jsonl", sft[SFT_TRAIN:])
    write_jsonl(out / "chat-train.jsonl", chat)

    rng = random.Random(SEED)
    seen: set[str] = set()
    write_csv(out / "classify-train.csv", classify_rows(rng, CLASSIFY_TRAIN, seen))
    write_csv(out / "classify-val.csv", classify_rows(rng, CLASSIFY_VAL, seen))
    pairs = [preference_record(r) for r in sft]
    write_jsonl(out / "preference-train.jsonl", pairs[:PREF_TRAIN])
    write_jsonl(out / "preference-val.jsonl", pairs[SFT_TRAIN : SFT_TRAIN + PREF_VAL])
    names = ("sft-train.jsonl", "sft-val.jsonl", "chat-train.jsonl", "classify-train.csv", "classify-val.csv",
             "preference-train.jsonl", "preference-val.jsonl")  # fmt: skip
    for name in names:
        print(f"{out / name}: {(out / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
