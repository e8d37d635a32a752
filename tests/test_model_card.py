"""The model cards (README.md) of ``lmforge export --format hf``, as Hub and transformers users read them.

Every kind of export is made once (module fixture) from a tiny checkpoint built without training:
pretrained LMs, SFT fine-tunes, classifiers, LoRA merged and LoRA adapters (causal LM and classifier), for
the GPT-2 and the Llama family, plus LMs and classifiers without a tokenizer. Each card's "How to use"
snippet is then run as it is written, the export's folder (and an adapter's base) put in for the ids, in a
subprocess with ``HF_HUB_OFFLINE=1``. The checkpoints record their base models and data by absolute paths,
as a run on this machine would, so that a path leaking into any exported file shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_hf_export import GPT2_LIKE, LLAMA_LIKE, TEXTS, random_adapters, random_gpt, save_ckpt, tiny_config  # noqa: E402

from lmforge.export import export  # noqa: E402
from lmforge.tokenizers import ByteTokenizer, HFTokenizer  # noqa: E402

FAMILIES = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE}
LABELS = ["negative", "positive"]
HUB_BASE = "owner/base-model"
LM_DATA = {
    "dataset": {"name": "embedded", "size_bytes": 4096, "seed": 0},
    "description": "A small English corpus shipped inside lmforge, for smoke tests.",
}
SFT_DATA = {"files": {"train": "sft-train.jsonl", "val": "sft-val.jsonl"}}
CLS_DATA = {"files": {"train": "reviews.csv"}}


def checkpoint(
    folder: Path, family: str, task: str, tokenizer, *, lora: bool = False, meta=None, vocab_size: int = 320
) -> Path:
    """A checkpoint of ``task`` as lmforge fit writes one, its base and data recorded by absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    model = random_gpt(tiny_config(**FAMILIES[family], block_size=64, vocab_size=vocab_size))
    extra, drop, info = {}, (), {"task": task, "metrics": {"val/loss": 2.5, "train/lr": 3e-4}}
    if task != "lm":
        info["base"] = {"source": str(folder / "base.ckpt"), "kind": "lmforge", "family": family}
    info["data"] = {"lm": LM_DATA, "sft": SFT_DATA, "classify": CLS_DATA}[task]
    if task == "classify":
        extra["score.weight"] = torch.randn(len(LABELS), 32, generator=torch.Generator().manual_seed(4))
        drop = () if model.config.tie_embeddings else ("lm_head.weight",)
        info.update(labels=LABELS, metrics={"val/acc": 0.75, "val/f1_macro": 0.7, "train/acc": 0.9})
    if lora:
        extra.update(random_adapters(model, ("attn.q_proj", "attn.v_proj")))
        info.update(lora={"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}, lora_base_saved=True)
    info.update(meta or {})
    return save_ckpt(folder / f"{task}.ckpt", model, tokenizer, meta=info, extra=extra, drop=drop, step=12)


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return HFTokenizer.train_bpe(TEXTS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, bpe) -> dict[str, dict]:
    """kind -> {"out": the export folder, "base": an adapter's base folder}, one of every kind of card."""
    root = tmp_path_factory.mktemp("cards")
    found: dict[str, dict] = {}
    for family in FAMILIES:
        tokenizer = ByteTokenizer() if family == "gpt2" else bpe
        where = root / family
        base_hf = export(checkpoint(where / "base", family, "lm", tokenizer), where / "base-hf", "hf")
        for kind, task, lora, kwargs in [
            ("lm", "lm", False, {}),
            ("sft", "sft", False, {}),
            ("classify", "classify", False, {}),
            ("lora-merged", "sft", True, {}),
            ("lora-adapter", "sft", True, {"adapter_only": True, "base_model": str(base_hf)}),
            ("lora-classifier-adapter", "classify", True, {"adapter_only": True, "base_model": str(base_hf)}),
        ]:
            ckpt = checkpoint(where / kind, family, task, tokenizer, lora=lora)
            out = export(ckpt, where / "exports" / f"{family}-{kind}", "hf", **kwargs)
            found[f"{family}-{kind}"] = {"out": out, "base": base_hf}
    # a classifier adapter whose padding token needs a new embedding row (300 rows, 300 tokens): the snippet
    # adds it to the base
    where = root / "new-row"
    base_hf = export(checkpoint(where / "base", "llama", "lm", bpe, vocab_size=300), where / "base-hf", "hf")
    ckpt = checkpoint(where / "cls", "llama", "classify", bpe, lora=True, vocab_size=300)
    out = export(ckpt, where / "llama-new-row", "hf", adapter_only=True, base_model=str(base_hf))
    found["llama-lora-classifier-adapter-new-row"] = {"out": out, "base": base_hf}
    for task in ("lm", "classify"):  # no tokenizer saved: the snippets feed token ids
        ckpt = checkpoint(root / f"untokenized-{task}", "gpt2", task, None)
        found[f"gpt2-{task}-no-tokenizer"] = {"out": export(ckpt, root / "exports" / f"{task}-ids", "hf")}
    return found


def card_text(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def front_matter(folder: Path) -> dict:
    import yaml

    match = re.match(r"---\n(.*?)\n---\n", card_text(folder), re.S)
    assert match
    return yaml.safe_load(match.group(1))


def snippet(folder: Path) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card_text(folder), re.S)
    return code


def first_sentence(folder: Path) -> str:
    body = card_text(folder).split("\n---\n", 1)[1]
    return body.strip().split("\n\n")[1]  # after the "# name" title


# -- the snippets run ------------------------------------------------------------------------------------


RUNNER = textwrap.dedent(
    """
    import runpy, sys, traceback

    failed = []
    for path in sys.argv[1:]:
        try:
            runpy.run_path(path, run_name="__main__")
        except BaseException:
            failed.append(path)
            print(f"FAILED {path}", traceback.format_exc(), sep="\\n", file=sys.stderr)
    sys.exit(1 if failed else 0)
    """
)


def test_every_snippet_runs(exports, tmp_path):
    """Each card's Python block, with the local folders put in for the ids it names, exits 0 offline."""
    scripts = []
    for kind, found in exports.items():
        code = snippet(found["out"])
        compile(code, f"{kind}.py", "exec")  # a syntax error (a comment swallowing a parenthesis) fails here
        ids = dict(re.findall(r'^(model_id|adapter_id|base_id) = ("[^"\n]*")', code, re.M))
        assert set(ids) in ({"model_id"}, {"adapter_id", "base_id"}), (kind, code)
        assert json.loads(ids.get("model_id", ids.get("adapter_id"))) == found["out"].name
        local = {"model_id": found["out"], "adapter_id": found["out"], "base_id": found.get("base")}
        for name, literal in ids.items():
            code = code.replace(f"{name} = {literal}", f"{name} = {json.dumps(str(local[name]))}", 1)
        script = tmp_path / f"{kind}.py"
        script.write_text(code, encoding="utf-8")
        scripts.append(str(script))
    (tmp_path / "run_all.py").write_text(RUNNER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()  # not beside the exports: the snippets find them by the ids put in, not by luck
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run_all.py"), *scripts],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert len(scripts) == 15


def test_snippets_name_the_export_and_its_base(exports):
    code = snippet(exports["llama-lora-adapter"]["out"])
    assert 'base_id = "base-hf"' in code and 'adapter_id = "llama-lora-adapter"' in code
    assert "PeftModel.from_pretrained(base, adapter_id)" in code
    code = snippet(exports["gpt2-lora-classifier-adapter"]["out"])
    assert "labels = {0: 'negative', 1: 'positive'}" in code and "pad_token_id=tokenizer.pad_token_id" in code
    code = snippet(exports["gpt2-classify"]["out"])
    assert 'pipeline("text-classification", model=model_id)' in code
    assert "max_new_tokens=48" in snippet(exports["gpt2-lm"]["out"])  # 64 positions, a 16-byte prompt
    assert "resize_token_embeddings" not in snippet(exports["llama-lora-classifier-adapter"]["out"])  # a spare row
    assert "base.resize_token_embeddings(len(tokenizer))" in snippet(
        exports["llama-lora-classifier-adapter-new-row"]["out"]
    )


# -- what the card says -----------------------------------------------------------------------------------


def test_first_sentence_reads_once_for_every_task(exports):
    version = __import__("lmforge").__version__
    for kind, found in exports.items():
        sentence = first_sentence(found["out"])
        assert sentence.startswith("A ") and sentence.endswith(".") and "\n" not in sentence, (kind, sentence)
        assert len(re.findall(r"fine-tun", sentence)) <= 1, (kind, sentence)
        assert sentence.count("lmforge") == 1 and sentence.count("exported") == 1, (kind, sentence)
    expected = {
        "gpt2-lm": "language model, pretrained from scratch with lmforge {v} and exported to transformers format "
        "(`GPT2LMHeadModel`, float32 weights) from `lm.ckpt` at step 12.",
        "llama-sft": "language model: `base.ckpt` after supervised fine-tuning (SFT, all weights) with lmforge {v}, "
        "exported to transformers format (`LlamaForCausalLM`, float32 weights) from `sft.ckpt` at step 12.",
        "gpt2-lora-merged": "language model: `base.ckpt` after supervised fine-tuning (SFT, LoRA) with lmforge {v}, "
        "exported",
        "llama-classify": "text classifier with 2 labels: `base.ckpt` fine-tuned for classification (all weights) "
        "with lmforge {v}, exported to transformers format (`LlamaForSequenceClassification`",
        "gpt2-lora-adapter": "A LoRA adapter (PEFT format) for `base-hf`, a ",
        "llama-lora-classifier-adapter": "A LoRA adapter (PEFT format) with a 2-label classification head for "
        "`base-hf`, a ",
    }
    for kind, words in expected.items():
        assert words.format(v=version) in first_sentence(exports[kind]["out"]), kind
    assert "language model, trained for text classification with lmforge" in first_sentence(
        exports["llama-lora-classifier-adapter"]["out"]
    )


def test_no_local_path_in_any_exported_file(exports, tmp_path_factory):
    """The base models and data are recorded by absolute paths; no exported text names one, nor the home folder."""
    root = str(tmp_path_factory.getbasetemp())
    home = str(Path.home()).rstrip("/") + "/"
    checked = 0
    for kind, found in exports.items():
        for file in found["out"].rglob("*"):
            if file.suffix == ".safetensors":
                continue
            text = file.read_text(encoding="utf-8")
            assert root not in text and (len(home) < 3 or home not in text), (kind, file.name)
            checked += 1
    assert checked > 50
    for family in FAMILIES:
        for kind in ("lora-adapter", "lora-classifier-adapter"):
            out = exports[f"{family}-{kind}"]["out"]
            assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base-hf"
            text = card_text(out)
            assert "local folder `base-hf`" in text and "--arg base_model=ORG/NAME" in text
            assert "base_model" not in front_matter(out)  # not a Hub id
    text = card_text(exports["gpt2-sft"]["out"])
    assert "lmforge checkpoint `base.ckpt`, not a model on the Hub" in text


def test_evaluation_lists_only_evaluation_metrics(tmp_path):
    from huggingface_hub import ModelCard

    metrics = {
        "train/loss": 2.4, "train/ppl": 11.0, "train/lr": 3e-4, "train/tokens_per_sec": 12345.0,
        "val/loss": 2.5, "val/ppl": 12.18, "test/loss": 2.6, "val/tokens_per_s": 999.0, "epoch": 3.0,
        "val/gap_to_entropy": 0.4, "test/acc": 0.8, "lr-AdamW": 1e-3,
    }  # fmt: skip
    ckpt = checkpoint(tmp_path, "llama", "lm", ByteTokenizer(), meta={"metrics": metrics})
    out = export(ckpt, tmp_path / "out", "hf", datasets="owner/corpus")
    card = ModelCard.load(out / "README.md")
    table = re.findall(r"^\| (validation|test|train|-) \| (\S+) \| (\S+) \|$", card.text, re.M)
    assert table == [
        ("validation", "loss", "2.5000"), ("validation", "ppl", "12.1800"), ("test", "loss", "2.6000"),
        ("validation", "gap_to_entropy", "0.4000"), ("test", "acc", "0.8000"),
    ]  # fmt: skip
    results = {(r.dataset_split, r.metric_name) for r in card.data.eval_results}
    assert results == {("validation", "val/loss"), ("validation", "val/ppl"), ("test", "test/loss")} | {
        ("validation", "val/gap_to_entropy"),
        ("test", "test/acc"),
    }
    assert {r.dataset_name for r in card.data.eval_results} == {"owner/corpus"}
    for absent in ("lr", "tokens_per", "epoch", "| train |"):
        assert absent not in card.text.split("## Evaluation")[1], absent


def test_training_data_is_described(exports, tmp_path):
    text = card_text(exports["gpt2-lm"]["out"])
    data = text.split("## Training data\n")[1].split("\n## ")[0]
    assert "- dataset plugin: `embedded` (size_bytes=4096, seed=0)" in data
    assert LM_DATA["description"] in data
    assert "datasets" not in front_matter(exports["gpt2-lm"]["out"])  # no Hub dataset: no Hub metadata
    data = card_text(exports["llama-sft"]["out"]).split("## Training data\n")[1].split("\n## ")[0]
    assert "The fine-tuning data" in data and "- files: training `sft-train.jsonl`, validation `sft-val.jsonl`" in data
    assert "- files: training `reviews.csv`" in card_text(exports["gpt2-classify"]["out"])

    # Hub datasets go to the metadata; the datasets argument replaces what the run recorded
    hub = {"dataset": {"name": "hub", "path": "owner/corpus", "split": "train"}, "hub_datasets": ["owner/corpus"]}
    ckpt = checkpoint(tmp_path / "hub", "gpt2", "lm", ByteTokenizer(), meta={"data": hub})
    out = export(ckpt, tmp_path / "hub-out", "hf")
    assert front_matter(out)["datasets"] == ["owner/corpus"]
    assert "[owner/corpus](https://huggingface.co/datasets/owner/corpus)" in card_text(out)
    assert "`hub` (path=owner/corpus, split=train)" in card_text(out)
    out = export(ckpt, tmp_path / "named-out", "hf", datasets=["owner/other", "owner/corpus"])
    assert front_matter(out)["datasets"] == ["owner/other", "owner/corpus"]

    # an old checkpoint: the card says that nothing was recorded
    old = checkpoint(tmp_path / "old", "gpt2", "lm", ByteTokenizer(), meta={"data": {}})
    text = card_text(export(old, tmp_path / "old-out", "hf"))
    assert "The checkpoint does not record what the model was trained on" in text


# -- the licence -------------------------------------------------------------------------------------------


def test_no_licence_is_claimed_that_nobody_chose(exports, tmp_path):
    out = exports["gpt2-lm"]["out"]
    assert "license" not in front_matter(out)
    text = card_text(out).split("## License\n")[1]
    assert "No licence was given" in text and "`--arg license=mit`" in text
    assert "apache" not in card_text(out)
    ckpt = checkpoint(tmp_path, "gpt2", "lm", ByteTokenizer())
    out = export(ckpt, tmp_path / "mit", "hf", license="mit")
    assert front_matter(out)["license"] == "mit" and "`mit`, as chosen at export." in card_text(out)


def test_licence_of_a_local_base_folder(tmp_path):
    base = tmp_path / "my-base"
    export(checkpoint(tmp_path / "b", "gpt2", "lm", ByteTokenizer()), base, "hf")
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny\nlicense_link: LICENSE.md\n---\n# b\n")
    meta = {"base": {"source": str(base), "kind": "hf", "family": "gpt2"}}
    out = export(checkpoint(tmp_path / "ft", "gpt2", "sft", ByteTokenizer(), meta=meta), tmp_path / "out", "hf")
    values = front_matter(out)
    assert (values["license"], values["license_name"], values["license_link"]) == ("other", "tiny", "LICENSE.md")
    assert "the licence the model card of the base model `my-base` names" in card_text(out)
    assert "base_model" not in values and str(tmp_path) not in card_text(out)
    out = export(out.parent / "ft" / "sft.ckpt", tmp_path / "chosen", "hf", license="cc-by-4.0")
    assert front_matter(out)["license"] == "cc-by-4.0"  # the argument wins


def test_licence_and_id_of_a_hub_base_from_the_cache(tmp_path, monkeypatch):
    """A Hub base: its card in the local Hugging Face cache gives the licence (nothing is downloaded), and a
    base given as a folder of that cache is named by its Hub id."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--owner--base-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--owner--base-model" / "refs").mkdir()
    (cache / "models--owner--base-model" / "refs" / "main").write_text("a" * 40)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    meta = {"base": {"source": HUB_BASE, "kind": "hf", "family": "gpt2", "revision": None}}
    ckpt = checkpoint(tmp_path / "ft", "gpt2", "sft", ByteTokenizer(), lora=True, meta=meta)
    out = export(ckpt, tmp_path / "merged", "hf")
    values = front_matter(out)
    assert values["license"] == "apache-2.0" and values["base_model"] == HUB_BASE
    assert f"`{HUB_BASE}` after supervised fine-tuning (SFT, LoRA)" in first_sentence(out)
    out = export(ckpt, tmp_path / "adapter", "hf", adapter_only=True)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    assert f'base_id = "{HUB_BASE}"' in snippet(out) and f"https://huggingface.co/{HUB_BASE}" in card_text(out)

    export(checkpoint(tmp_path / "b", "gpt2", "lm", ByteTokenizer()), snapshot / "weights", "hf")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (snapshot / "weights" / name).rename(snapshot / name)
    out = export(ckpt, tmp_path / "from-snapshot", "hf", adapter_only=True, base_model=str(snapshot))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    assert front_matter(out)["license"] == "apache-2.0" and str(tmp_path) not in card_text(out)
