"""data.pipeline and the lmforge.filters plugins: each built-in step on hand-made documents, near-duplicate
recall and precision, PII positives and negatives, spec errors, the cache key, a data module end to end and a
third-party filter found through its entry point."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_plugins import make_dist

from lmforge import plugins
from lmforge.data.filters import PII, Dedup, Normalize, Quality, iban_ok, luhn_ok, phone_ok
from lmforge.data.pipeline import FilteredCorpus, check_pipeline
from lmforge.data.pretrain import PretrainDataModule
from lmforge.data.sources import CorpusError
from lmforge.errors import UserError
from lmforge.testing import SampleCorpus, check_plugin

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ["dedup", "normalize", "pii", "quality"]

PROSE = (
    "The history of the town is told in the old church records, and the oldest of them date back to the time "
    "when the river was still the main road to the coast. Farmers brought their grain to the market with carts, "
    "and the merchants that bought it had to pay a toll to the lord of the castle. In winter the roads were "
    "closed by snow, so the people of the valley stored food for months and spent the long evenings with music "
    "and stories. Many of those stories have survived, because a teacher wrote them down a century ago."
)
"""About 100 words of ordinary prose: what the quality filter keeps."""


def run(step, docs):
    return [step.process(d) for d in docs]


# -- normalize -----------------------------------------------------------------------------------------------


def test_normalize_nfkc_mojibake_and_whitespace():
    step = Normalize()
    assert step.process("ﬁne ＡＢＣ１２３ café") == "fine ABC123 café"
    assert step.process("cafÃ© au lait") == "café au lait"
    assert step.process("line one   \nline two\t\n\n\n\n\n\nline three\n\n") == "line one\nline two\n\n\nline three"
    assert step.process(" \n\t\n") is None
    assert Normalize(form="NFC", fix_mojibake=False).process("ﬁne cafÃ©") == "ﬁne cafÃ©"
    assert Normalize(lowercase=True, max_blank_lines=0).process("A\n\nB") == "a\nb"
    stats = step.stats()
    assert stats["docs_in"] == 4 and stats["docs_out"] == 3 and stats["dropped"] == {"empty": 1}
    assert stats["bytes_in"] > stats["bytes_out"] > 0


# -- quality -------------------------------------------------------------------------------------------------


def test_quality_keeps_prose_and_drops_each_kind_of_junk():
    step = Quality()
    bad = {
        "too_few_words": "The cat and the dog.",
        "mean_word_length": " ".join(["a b c d e of the to and"] * 10),
        "symbol_ratio": PROSE + " #tag" * 12,
        "bullet_lines": "\n".join(f"- item {i} of the list and the rest with more words here" for i in range(12)),
        "ellipsis_lines": "\n".join(f"and then the story of the town went on {i}..." for i in range(12)),
        "alpha_words": PROSE + " 12 34 56" * 10,
        "stop_words": " ".join(f"word{i}x quick brown fox" for i in range(20)),
        "duplicate_lines": "\n".join([PROSE[:80]] * 4 + [PROSE]),
        "top_2gram": PROSE + " big river" * 40,
        "duplicate_5gram": PROSE + " " + PROSE,
    }
    assert step.process(PROSE) == PROSE
    for reason, doc in bad.items():
        assert step.check(doc) == reason, (reason, step.check(doc))
    run(step, bad.values())
    stats = step.stats()
    assert stats["docs_in"] == len(bad) + 1 and stats["docs_out"] == 1
    assert stats["dropped"] == {reason: 1 for reason in sorted(bad)}
    # thresholds are options; null turns a check off
    assert Quality(min_words=3).check("The cat and the dog sat.") is None
    assert Quality(max_duplicate_ngram_char_fraction=None).check(PROSE + " " + PROSE) is None


# -- dedup ---------------------------------------------------------------------------------------------------


def test_exact_dedup_ignores_case_and_whitespace_and_counts_clusters():
    step = Dedup()
    docs = [PROSE, "Another document.", PROSE.upper(), "  ".join(PROSE.split()), "Another   document.", PROSE]
    out = run(step, docs)
    assert out == [PROSE, "Another document.", None, None, None, None]
    stats = step.stats()
    assert stats["dropped"] == {"exact": 4} and stats["docs_out"] == 2
    assert stats["clusters"] == 2 and stats["largest_cluster"] == 4 and stats["cluster_sizes"] == {"2": 1, "4": 1}
    assert Dedup.stateful and not Normalize.stateful


def _near_duplicate_corpus(seed: int = 0):
    """20 base documents of 100 words, 20 light edits of them (3 words changed) and 20 unrelated documents,
    shuffled with each edit after its base; returns (documents, indices of the edits)."""
    rng = random.Random(seed)
    vocab = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                    for _ in range(3000)})  # fmt: skip
    bases = [[rng.choice(vocab) for _ in range(100)] for _ in range(20)]
    edits = []
    for words in bases:
        edited = list(words)
        for i in rng.sample(range(100), 3):
            edited[i] = rng.choice(vocab)
        edits.append(edited)
    unrelated = [[rng.choice(vocab) for _ in range(100)] for _ in range(20)]
    order = [("base", i) for i in range(20)] + [("unrelated", i) for i in range(20)]
    rng.shuffle(order)
    for i in range(20):  # each edit somewhere after its base
        at = order.index(("base", i))
        order.insert(rng.randint(at + 1, len(order)), ("edit", i))
    table = {"base": bases, "edit": edits, "unrelated": unrelated}
    docs = [" ".join(table[kind][i]) for kind, i in order]
    return docs, {n for n, (kind, _) in enumerate(order) if kind == "edit"}


@pytest.mark.parametrize("backend", ["datasketch", "rensa"])
def test_near_dedup_recall_and_precision(backend):
    if backend == "rensa":
        pytest.importorskip("rensa")
    docs, edits = _near_duplicate_corpus()
    step = plugins.build("filter", {"name": "dedup", "exact": False,
                                    "near": {"threshold": 0.7, "ngram": 3, "backend": backend}})  # fmt: skip
    out = run(step, docs)
    removed = {i for i, d in enumerate(out) if d is None}
    recall = len(removed & edits) / len(edits)
    precision = len(removed & edits) / max(1, len(removed))
    print(f"near dedup ({backend}): recall {recall:.2f}, precision {precision:.2f}")
    assert recall >= 0.9 and precision >= 0.9
    stats = step.stats()
    assert stats["dropped"] == {"near": len(removed)} and stats["clusters"] == len(removed)
    assert stats["largest_cluster"] == 2


# -- pii -----------------------------------------------------------------------------------------------------

POSITIVES = [
    ("write to jane.doe+news@example.co.uk today", "write to <EMAIL> today", "EMAIL"),
    ("card 4111 1111 1111 1111 expires", "card <CREDIT_CARD> expires", "CREDIT_CARD"),
    ("card 5500-0000-0000-0004.", "card <CREDIT_CARD>.", "CREDIT_CARD"),
    ("pay DE89 3704 0044 0532 0130 00 now", "pay <IBAN> now", "IBAN"),
    ("IBAN: GB82WEST12345698765432", "IBAN: <IBAN>", "IBAN"),
    ("call +44 20 7946 0958 now", "call <PHONE> now", "PHONE"),
    ("call (415) 555-2671 now", "call <PHONE> now", "PHONE"),
    ("call 415-555-2671.", "call <PHONE>.", "PHONE"),
    ("call +14155552671 or 020 7946 0958", "call <PHONE> or <PHONE>", "PHONE"),
    ("host 192.168.1.254 is up", "host <IP_ADDRESS> is up", "IP_ADDRESS"),
    ("host 2001:db8::8a2e:370:7334 is up", "host <IP_ADDRESS> is up", "IP_ADDRESS"),
    ("mapped ::ffff:192.0.2.1 too", "mapped <IP_ADDRESS> too", "IP_ADDRESS"),
]
NEGATIVES = [
    "card 4111 1111 1111 1112 has a wrong check digit",
    "pay DE89 3704 0044 0532 0130 01 (a broken IBAN)",
    "ISBN 978-3-16-148410-0 and 9783161484100",
    "on 2023-10-05, 05/10/2023 and 12:30:45",
    "for $1,299.99 or €1.299,00 or 1 299 euros",
    "a population of 1234567890 and pi 3.14159265358979",
    "the address 256.1.1.1 is not one, nor is 00:1A:2B:3C:4D:5E",
    "version 1.2.3 of the 10 000 000 downloads",
    "write to me at home",
]


def test_pii_redacts_what_it_should_and_nothing_else():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112") and not luhn_ok("9783161484100")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert not iban_ok("DE8937040044053201300")  # one character short for Germany
    assert phone_ok("415-555-2671") and not phone_ok("2023-10-05") and not phone_ok("978-3-16-148410-0")
    step = PII()
    for text, expected, _ in POSITIVES:
        assert step.process(text) == expected, text
    for text in NEGATIVES:
        assert step.process(text) == text, text
    stats = step.stats()
    expected_counts = {t: 0 for t in ("EMAIL", "IBAN", "CREDIT_CARD", "IP_ADDRESS", "PHONE")}
    for _, expected, _ in POSITIVES:
        for kind in expected_counts:
            expected_counts[kind] += expected.count(f"<{kind}>")
    assert stats["redactions"] == expected_counts
    assert stats["documents_redacted"] == len(POSITIVES) and stats["docs_out"] == len(POSITIVES) + len(NEGATIVES)


def test_pii_types_and_placeholder_are_options():
    step = PII(types=["email", "PHONE"], placeholder="[{type}]")
    assert step.process("a@b.org, 415-555-2671, 10.0.0.1") == "[EMAIL], [PHONE], 10.0.0.1"
    assert step.stats()["redactions"] == {"EMAIL": 1, "PHONE": 1}


def test_per_document_steps_pickle_and_pass_the_protocol_checks():
    for step in (Normalize(), Quality(), PII()):
        copy = pickle.loads(pickle.dumps(step))
        assert copy.process(PROSE + " a@b.org") == step.process(PROSE + " a@b.org")
    for name in BUILTINS:
        results = check_plugin("filter", name)
        assert all(r.ok for r in results), [r.line() for r in results if not r.ok]


# -- specs and the cache key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline,message",
    [
        (
            [{"name": "normalise"}],
            "data.pipeline[0]: no filter named 'normalise'; installed: dedup, normalize, pii, "
            "quality (did you mean 'normalize'?)",
        ),
        (
            [{"name": "normalize"}, {"name": "quality"}, {"name": "dedup", "near": {"threshold": 1.5}}],
            "data.pipeline[2].near.threshold=1.5 must be in (0, 1]",
        ),
        ([{"name": "dedup", "near": {"treshold": 0.5}}], "data.pipeline[0].near.treshold=0.5 is not an option"),
        (
            [{"name": "quality", "min_wrds": 3}],
            "data.pipeline[0]: filter 'quality' has no argument 'min_wrds'; did you mean 'min_words'?",
        ),
        ([{"name": "quality", "min_words": "many"}], "data.pipeline[0]: filter 'quality': min_words='many' is not"),
        (
            [{"name": "quality", "max_symbol_word_ratio": 2}],
            "data.pipeline[0].max_symbol_word_ratio=2 must be in [0, 1]",
        ),
        ([{"name": "normalize", "form": "NFX"}], "data.pipeline[0]: filter 'normalize': form='NFX' is not one of"),
        ([{"name": "pii", "types": ["EMAIL", "SSN"]}], "data.pipeline[0].types=['EMAIL', 'SSN'] has 'SSN'"),
        ([{"name": "pii", "placeholder": "<PII>"}], "data.pipeline[0].placeholder='<PII>' must contain {type}"),
        ([{"form": "NFC"}], "data.pipeline[0]: expected {name: <filter>, <options>}"),
        ({"name": "pii"}, "data.pipeline must be a list of steps"),
    ],
)
def test_bad_specs_are_one_line_naming_the_key(pipeline, message, tmp_path, monkeypatch):
    monkeypatch.setattr(plugins, "autoload_override", False)  # lmforge's own filters only, whatever is installed
    with pytest.raises(UserError) as err:
        PretrainDataModule(pipeline=pipeline, cache_dir=str(tmp_path / "cache"))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()  # checked before any work


def test_the_corpus_key_follows_the_pipeline(monkeypatch):
    inner = SampleCorpus()

    def key(steps):
        return FilteredCorpus(inner, steps).key()

    base = key([{"name": "normalize"}, {"name": "dedup"}])
    assert plugins.corpus_key_problem(base) is None and base != inner.key()
    assert key([{"name": "normalize", "form": "NFKC"}, "dedup"]) == base  # defaults spelt out: the same
    assert key([{"name": "normalize", "form": "NFC"}, {"name": "dedup"}]) != base
    assert key([{"name": "dedup"}, {"name": "normalize"}]) != base  # the order matters
    assert key([{"name": "normalize"}, {"name": "dedup"}, {"name": "pii"}]) != base
    assert key([{"name": "normalize"}, {"name": "dedup", "near": {"threshold": 0.8}}]) != base
    assert FilteredCorpus(SampleCorpus(key="other"), [{"name": "normalize"}, {"name": "dedup"}]).key() != base
    monkeypatch.setattr(Normalize, "version", "2")
    assert key([{"name": "normalize"}, {"name": "dedup"}]) != base
    assert check_pipeline(None) == [] and check_pipeline(["pii"]) == [{"name": "pii"}]


def test_filtered_corpus_reports_logs_and_refuses_an_empty_result(caplog):
    docs = [PROSE, PROSE, "too short", "mail jane.doe@example.org. " + PROSE]
    corpus = FilteredCorpus(SampleCorpus(docs), [{"name": "quality"}, {"name": "dedup"}, {"name": "pii"}])
    assert corpus.report() == []
    with caplog.at_level(logging.INFO, logger="lmforge.data.pipeline"):
        out = list(corpus.documents())
    assert out == [PROSE, "mail <EMAIL>. " + PROSE]
    quality, dedup, pii = corpus.report()
    assert (quality["docs_in"], quality["docs_out"], quality["dropped"]) == (4, 3, {"too_few_words": 1})
    assert (dedup["docs_in"], dedup["docs_out"], dedup["dropped"]) == (3, 2, {"exact": 1})
    assert pii["redactions"]["EMAIL"] == 1 and pii["bytes_out"] < pii["bytes_in"]
    lines = [r.getMessage() for r in caplog.records if r.name == "lmforge.data.pipeline"]
    assert len(lines) == 3 and lines[0].startswith("pipeline quality: 4 -> 3 documents")
    assert list(corpus.documents()) == out  # read again: the steps start afresh (dedup forgets)
    assert corpus.num_bytes() == sum(len(d.encode()) for d in out)
    with pytest.raises(CorpusError, match="data.pipeline dropped every document: pipeline quality: 1 -> 0"):
        list(FilteredCorpus(SampleCorpus(["short"]), [{"name": "quality"}]).documents())


# -- a data module end to end --------------------------------------------------------------------------------

E2E_PIPELINE = [
    {"name": "normalize", "form": "NFKC"},
    {"name": "quality", "max_top_ngram_char_fraction": None, "max_duplicate_ngram_char_fraction": None},
    {"name": "dedup", "near": {"threshold": 0.8}},
    {"name": "pii"},
]


def test_pretrain_data_module_with_a_pipeline(tmp_path):
    def module(**kwargs):
        return PretrainDataModule(dataset={"name": "embedded", "size_bytes": 200_000}, tokenizer={"name": "bytes"},
                                  seq_len=64, num_workers=0, cache_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip

    dm = module(pipeline=E2E_PIPELINE)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    report = dm.filtered.report()
    assert [s["name"] for s in report] == ["normalize", "quality", "dedup", "pii"]
    assert all(s["docs_in"] == 1 and s["docs_out"] == 1 for s in report)
    facts = dm.describe_data()
    assert facts["pipeline"] == E2E_PIPELINE and facts["pipeline_report"] == report
    json.dumps(facts)
    plain = module()
    plain.prepare_data()
    assert plain.token_file.path != dm.token_file.path  # its own cache entry
    assert "pipeline" not in plain.describe_data()


def test_the_masked_lm_data_module_takes_a_pipeline(tmp_path):
    from lmforge.data.mlm import MLMDataModule

    dm = MLMDataModule(pipeline=[{"name": "pii", "types": ["EMAIL"]}], cache_dir=str(tmp_path / "cache"))
    assert dm.pipeline == [{"name": "pii", "types": ["EMAIL"]}]
    with pytest.raises(UserError, match=r"^data.pipeline\[0\].types=\['SSN'\] has 'SSN'"):
        MLMDataModule(pipeline=[{"name": "pii", "types": ["SSN"]}], cache_dir=str(tmp_path / "cache"))


def test_canaries_go_in_after_the_pipeline(tmp_path):
    docs = [PROSE + f" Chapter {i} of the story of the town and the river." for i in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs))
    dm = PretrainDataModule(dataset={"name": "files", "paths": [str(tmp_path / "docs.jsonl")]},
                            tokenizer={"name": "bytes"}, seq_len=32, num_workers=0, cache_dir=str(tmp_path / "cache"),
                            canaries={"count": 2, "repeats": [1, 3]}, pipeline=[{"name": "dedup"}, {"name": "pii"}])  # fmt: skip
    dm.prepare_data()
    text = bytes(dm.token_file.open()[:].astype("uint8")).decode("utf-8", errors="replace")
    for canary in dm.corpus.canaries:  # every copy survived dedup, and within the training part
        assert text.count(canary.text) == canary.repeats
    assert dm.filtered.report()[0]["dropped"] == {"exact": 30}


# -- a third-party filter ------------------------------------------------------------------------------------

SHOUT = """
class Shout:
    name = "shout"
    version = "1"

    def __init__(self, marks):
        self.marks, self.seen = marks, 0

    def process(self, doc):
        self.seen += 1
        return None if "drop me" in doc else doc.upper() + "!" * self.marks

    def stats(self):
        return {"seen": self.seen}


def shout(marks: int = 1):
    return Shout(marks)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    make_dist(site, "lmforge-shout", "0.2", {"lmforge.filters": {"shout": "shout_filter:shout"}},
              {"shout_filter": SHOUT})  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(plugins, "autoload_override", None)
    yield site
    sys.modules.pop("shout_filter", None)


def test_third_party_filter_from_an_entry_point(site):
    assert "shout" in plugins.names("filter")
    corpus = FilteredCorpus(SampleCorpus(["hello", "drop me", "bye"]), [{"name": "shout", "marks": 2}])
    assert list(corpus.documents()) == ["HELLO!!", "BYE!!"]
    (entry,) = corpus.report()
    assert entry["seen"] == 3 and entry["docs_in"] == 3 and entry["docs_out"] == 2
    with pytest.raises(UserError, match=r"data.pipeline\[0\]: filter 'shout': marks='x' is not an int"):
        check_pipeline([{"name": "shout", "marks": "x"}])
    assert all(r.ok for r in check_plugin("filter", "shout"))


def test_plugins_command_lists_the_filters_group(site):
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop(plugins.AUTOLOAD_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "lmforge", "plugins", "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {(r["group"], r["name"]): r for r in json.loads(proc.stdout)["plugins"]}
    for name in BUILTINS:
        assert rows[("lmforge.filters", name)]["builtin"] and rows[("lmforge.filters", name)]["status"] == "ok"
    assert rows[("lmforge.filters", "shout")]["distribution"] == "lmforge-shout"
