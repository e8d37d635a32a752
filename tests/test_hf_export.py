"""The ``hf`` exporter: lmforge checkpoints (made without training) loaded back by transformers."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
from lmforge import hf, plugins  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.export import export  # noqa: E402
from lmforge.hf import HFError  # noqa: E402
from lmforge.hf_export import ExportError, bytes_to_unicode, export_hf, parse_size  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizers import ByteTokenizer, HFTokenizer  # noqa: E402

GPT2_LIKE = dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
LLAMA_LIKE = dict(
    pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2, rope_theta=500.0
)
TEXTS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? 🙂 naïve café",
] * 4
SAMPLES = ["Hello world", "  two  spaces\tand a tab\n", "accents: héllo wörld ça", "emoji 🙂🚀 日本語", "x . , ! ?", ""]


def tiny_config(**kw) -> GPTConfig:
    values = dict(vocab_size=320, block_size=32, n_layer=2, n_head=4, n_embd=32, norm_eps=1e-5)
    values.update(kw)
    return GPTConfig(**values)


def random_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms and biases away from 1 and 0, so a mapping slip shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def save_ckpt(path, model: GPT, tokenizer=None, *, meta=None, extra=None, drop=(), hparams=None, step=7):
    """A checkpoint as ``lmforge fit`` writes it: state_dict keyed model.<name> plus the lmforge entry."""
    state = {f"model.{k}": v for k, v in model.state_dict().items() if k not in drop}
    state.update(extra or {})
    lm = {
        "version": lmforge.__version__,
        "model_config": model.config.to_dict(),
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        **(meta or {}),
    }
    torch.save({"state_dict": state, "lmforge": lm, "global_step": step, "hyper_parameters": hparams or {}}, path)
    return path


@pytest.fixture(scope="module")
def bpe():
    return HFTokenizer.train_bpe(TEXTS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def llama_bpe():
    """A Llama-style tokenizer: <s> added by the post-processor, </s> as end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return HFTokenizer(tok, "</s>", "<s>")


def ids(T: int = 16, vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (3, T), generator=torch.Generator().manual_seed(3))


def greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


def check_causal_lm(out, model: GPT):
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x), atol=1e-4, rtol=0)
        prompt = x[:1, :6]
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
        ours = greedy(model, prompt, 10)
    assert theirs.shape[1] > prompt.shape[1]
    assert theirs[0].tolist() == ours[0, : theirs.shape[1]].tolist()
    if theirs.shape[1] < ours.shape[1]:  # stopped early: at the end-of-text token
        assert theirs[0, -1].item() == ref.generation_config.eos_token_id
    return ref


# -- causal LMs -------------------------------------------------------------------------------------


def test_gpt2_like_with_byte_tokenizer(tmp_path):
    model = random_gpt(tiny_config(**GPT2_LIKE))
    ckpt = save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer())
    out = export(ckpt, tmp_path / "out", "hf")
    assert out == tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "README.md",
    }  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (256, 256, 256)
    assert config["dtype"] == "float32" and config["transformers_version"] == transformers.__version__
    assert "lmforge_version" not in config  # that key marks lmforge's own export format
    generation = json.loads((out / "generation_config.json").read_text())
    assert "max_length" not in generation and generation["eos_token_id"] == 256  # see test_generate_does_not_warn
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys()  # tied: transformers re-ties it
    ref = check_causal_lm(out, model)
    assert type(ref).__name__ == "GPT2LMHeadModel"


def test_byte_tokenizer_is_exact(tmp_path):
    model = random_gpt(tiny_config(**GPT2_LIKE))
    out = export(save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer()), tmp_path / "out", "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = ByteTokenizer()
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|endoftext|>", 256, 256)
    assert tokenizer.model_max_length == 32 and len(tokenizer) == 257
    assert tokenizer.convert_ids_to_tokens(list(range(256))) == [bytes_to_unicode()[i] for i in range(256)]
    texts = [*SAMPLES, "\x00\x01\x7f control", "Ġ ĉ look-alikes", "literal <|endoftext|> stays bytes", "a" * 40]
    for text in texts:
        encoded = tokenizer(text)["input_ids"]
        assert encoded == ours.encode(text), text
        assert tokenizer.decode(encoded) == text
        assert tokenizer.decode([*encoded, 256], skip_special_tokens=True) == ours.decode([*encoded, 256])
    # lmforge reads the exported folder back to the same ids
    back = HFTokenizer.from_pretrained_folder(out)
    assert back.eos_id == 256 and back.bos_id is None
    assert all(back.encode(t) == ours.encode(t) for t in SAMPLES)


def test_llama_like_with_bpe_tokenizer(tmp_path, bpe):
    model = random_gpt(tiny_config(**LLAMA_LIKE))
    out = export(save_ckpt(tmp_path / "last.ckpt", model, bpe), tmp_path / "out", "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    eos = bpe.eos_id
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (eos, eos, eos)
    ref = check_causal_lm(out, model)
    assert type(ref).__name__ == "LlamaForCausalLM"
    # and lmforge reads it back (e.g. as a fine-tuning base)
    assert hf.is_hf_folder(out)
    back, tokenizer, info = hf.load_model(out)
    assert info["family"] == "llama" and back.config.shape() == model.config.shape()
    torch.testing.assert_close(back(ids()), model(ids()), atol=1e-6, rtol=0)
    assert tokenizer.encode(SAMPLES[2]) == bpe.encode(SAMPLES[2]) and tokenizer.eos_id == bpe.eos_id
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == eos
    for text in SAMPLES:
        assert tokenizer(text)["input_ids"] == bpe.encode(text)
        assert tokenizer.decode(bpe.encode(text)) == bpe.decode(bpe.encode(text))


def test_llama_tokenizer_with_bos(tmp_path, llama_bpe):
    model = random_gpt(tiny_config(**{**LLAMA_LIKE, "tie_embeddings": True, "bias": True, "n_kv_head": 1}))
    out = export(save_ckpt(tmp_path / "last.ckpt", model, llama_bpe), tmp_path / "out", "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["attention_bias"] and config["mlp_bias"] and config["tie_word_embeddings"]
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == ("<s>", "</s>", "</s>")
    assert json.loads((out / "special_tokens_map.json").read_text())["bos_token"] == "<s>"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        assert tokenizer(text)["input_ids"] == [1, *llama_bpe.encode(text)]
    check_causal_lm(out, model)


def test_sharded(tmp_path):
    model = random_gpt(tiny_config(**LLAMA_LIKE))
    out = export(
        save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer()), tmp_path / "out", "hf", max_shard_size="30KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for k, v in model.state_dict().items())
    for shard in shards:  # within the limit (plus the header), unless one tensor alone is bigger
        keys = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(keys) == 1 or (out / shard).stat().st_size < 30_000 + 4096
    check_causal_lm(out, model)


def test_bfloat16(tmp_path):
    model = random_gpt(tiny_config(**GPT2_LIKE))
    out = export(save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer()), tmp_path / "out", "hf", dtype="bfloat16")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert ref.transformer.wte.weight.dtype == torch.float32
    torch.testing.assert_close(ref.transformer.wte.weight, model.wte.weight.to(torch.bfloat16).float())


def test_without_tokenizer(tmp_path):
    model = random_gpt(tiny_config(**LLAMA_LIKE))
    out = export(save_ckpt(tmp_path / "last.ckpt", model), tmp_path / "out", "hf")
    assert not (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "eos_token_id" not in config and "pad_token_id" not in config
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids()).logits, model(ids()), atol=1e-4, rtol=0)


def test_parse_size():
    assert parse_size(1000) == 1000
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("64kb") == 64_000
    with pytest.raises(ExportError, match="max_shard_size='lots'"):
        parse_size("lots")


# -- the model card ---------------------------------------------------------------------------------


def test_model_card(tmp_path):
    from huggingface_hub import ModelCard

    model = random_gpt(tiny_config(**LLAMA_LIKE))
    hparams = {
        "config": model.config.to_dict(),
        "optimizer": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1},
        "scheduler": {"name": "cosine", "warmup_steps": 10},
        "data": {"batch_size": 8, "seq_len": 32},
    }
    metrics = {"val/loss": 2.5, "val/ppl": 12.18, "train/loss": 2.4}
    ckpt = save_ckpt(
        tmp_path / "last.ckpt", model, ByteTokenizer(), meta={"metrics": metrics}, hparams=hparams, step=100
    )
    out = export(ckpt, tmp_path / "tiny-llama", "hf", datasets="owner/corpus", tags=["tiny"], license="mit")
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.license == "mit"
    assert data.pipeline_tag == "text-generation" and data.datasets == ["owner/corpus"]
    assert {"lmforge", "llama", "tiny"} <= set(data.tags)
    assert data.base_model is None  # pretrained, not fine-tuned
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("validation", "loss"): 2.5, ("validation", "perplexity"): 12.18}
    assert data.eval_results[0].dataset_name == "owner/corpus"
    text = card.text
    num_params = sum(p.numel() for p in model.parameters())
    for needle in (
        "# tiny-llama", "| layers | 2 |", "| width (n_embd) | 32 |", "| key/value heads | 2 (grouped-query) |",
        "| context length | 32 |", "| vocabulary | 320 |", f"| parameters | {num_params:,} |", "| steps | 100 |",
        "adamw (lr=0.0003, weight_decay=0.1)", "cosine (warmup_steps=10)", "| batch size | 8 |",
        "| sequence length | 32 |", "estimate", f"{6 * num_params * 100 * 8 * 32:.2e} FLOPs",
        "AutoModelForCausalLM.from_pretrained", "| validation | loss | 2.5000 |", "byte tokenizer",
        "`mit`, as chosen at export.",
    ):  # fmt: skip
        assert needle in text, needle
    assert "| train |" not in text  # training metrics are not evaluations (test_model_card.py checks more)


def test_model_card_fine_tune_names_base(tmp_path, bpe):
    model = random_gpt(tiny_config(**GPT2_LIKE))
    meta = {"task": "sft", "base": {"source": "owner/base-model", "kind": "hf", "family": "gpt2"}}
    out = export(save_ckpt(tmp_path / "last.ckpt", model, bpe, meta=meta), tmp_path / "out", "hf")
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "owner/base-model"
    assert "language model: `owner/base-model` after supervised fine-tuning (SFT, all weights)" in card.text
    assert "Not estimated" in card.text and "not recorded" in card.text


def test_model_card_reads_the_run_config(tmp_path):
    """lmforge fit keeps <root>/checkpoints/last.ckpt, LightningCLI <root>/csv/version_0/config.yaml."""
    from huggingface_hub import ModelCard

    model = random_gpt(tiny_config(**GPT2_LIKE))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "run" / "csv" / "version_0" / "config.yaml").write_text(
        "trainer:\n  accelerator: gpu\n  devices: 2\n  precision: bf16-mixed\n  accumulate_grad_batches: 4\n"
        "data:\n  class_path: lmforge.data.pretrain.PretrainDataModule\n  init_args:\n    batch_size: 16\n"
        "    seq_len: 32\n"
    )
    hparams = {"optimizer": {"name": "muon", "lr": 0.02}, "scheduler": {"name": "constant"}}
    ckpt = save_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt", model, ByteTokenizer(), hparams=hparams, step=10)
    text = ModelCard.load(export(ckpt, tmp_path / "out", "hf") / "README.md").text
    n = sum(p.numel() for p in model.parameters())
    for needle in (
        "| batch size | 16 |", "| sequence length | 32 |", "| gradient accumulation | 4 |", "| precision | bf16-mixed |",
        "Hardware: gpu x 2.", "muon (lr=0.02)", "| scheduler | constant |", f"{6 * n * 10 * 16 * 32 * 4 * 2:.2e} FLOPs",
    ):  # fmt: skip
        assert needle in text, needle


# -- classifiers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_classifier(tmp_path, arch):
    model = random_gpt(tiny_config(**arch))
    score = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    drop = () if model.config.tie_embeddings else ("lm_head.weight",)  # lmforge's classifier drops an untied head
    meta = {"task": "classify", "labels": ["neg", "pos"], "metrics": {"val/acc": 0.75, "val/f1_macro": 0.7}}
    ckpt = save_ckpt(
        tmp_path / "last.ckpt", model, ByteTokenizer(), meta=meta, extra={"score.weight": score}, drop=drop
    )
    out = export(ckpt, tmp_path / "out", "hf")
    config = json.loads((out / "config.json").read_text())
    family = "GPT2" if arch is GPT2_LIKE else "Llama"
    assert config["architectures"] == [f"{family}ForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["num_labels"] == 2 and config["pad_token_id"] == 257  # a padding token of its own
    assert not (out / "generation_config.json").exists()
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    x = ids(vocab=257)  # end-of-text tokens too: they are not padding (test_classifier_pads_with_its_own_token)
    with torch.no_grad():
        expected = model.hidden_states(x)[:, -1] @ score.T
        torch.testing.assert_close(ref(x).logits, expected, atol=1e-4, rtol=0)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {("accuracy", 0.75), ("f1", 0.7)}
    assert "`neg`" in card.text and 'pipeline("text-classification"' in card.text


@pytest.mark.parametrize(
    "arch, vocab_size", [(GPT2_LIKE, 320), (LLAMA_LIKE, 300)], ids=["gpt2-spare-row", "llama-new-row"]
)
def test_classifier_pads_with_its_own_token(tmp_path, bpe, arch, vocab_size):
    """A text that ends in the end-of-text token gets the same class logits from transformers as from lmforge's
    ClassifierModule, alone and in a padded batch: the export pads with a token of its own, in the first unused
    embedding row (320 rows, 300 tokens) or in a row added for it (300 rows, 300 tokens)."""
    from lmforge.finetune import ClassifierModule

    base = save_ckpt(tmp_path / "base.ckpt", random_gpt(tiny_config(**{**arch, "vocab_size": vocab_size})), bpe)
    module = ClassifierModule(base=str(base), labels=["neg", "pos", "mixed"]).eval()
    with torch.no_grad():
        module.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(6))
    meta = {"task": "classify", "labels": module.labels}
    ckpt = save_ckpt(tmp_path / "cls.ckpt", module.model, bpe, meta=meta, extra={"score.weight": module.score.weight})
    out = export(ckpt, tmp_path / "out", "hf")

    pad_id = 300  # the tokenizer's 300 tokens are ids 0..299
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == pad_id != config["eos_token_id"] == bpe.eos_id
    assert config["vocab_size"] == max(vocab_size, pad_id + 1)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((out / name).read_text())["pad_token"] == "<|pad|>", name
    added = {t["content"]: t for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<|pad|>"]["id"] == pad_id and added["<|pad|>"]["special"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == ("<|pad|>", pad_id, pad_id + 1)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()

    texts = ["a quick test<|endoftext|>", "The quick brown fox jumps over the lazy dog.<|endoftext|>", "héllo wörld"]
    with torch.no_grad():
        for text in texts:
            single = tokenizer(text, return_tensors="pt")
            assert single["input_ids"][0].tolist() == bpe.encode(text)
            torch.testing.assert_close(ref(**single).logits, module(single["input_ids"]), atol=1e-4, rtol=0)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        assert batch["input_ids"][0, -1] == pad_id  # right-padded with the new token
        ours = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, bpe.eos_id)  # lmforge pads with EOS
        want = module(ours, batch["attention_mask"].bool())
        torch.testing.assert_close(ref(**batch).logits, want, atol=1e-4, rtol=0)
        # what the old export (pad = eos) computed: pooled one token early on a text ending in EOS
        ref.config.pad_token_id = bpe.eos_id
        assert (ref(**tokenizer(texts[0], return_tensors="pt")).logits - want[0]).abs().max() > 1e-3
    if vocab_size > pad_id + 1:  # a classifier fine-tuned from this export keeps its padding token, once
        again = HFTokenizer.from_pretrained_folder(out)
        ckpt = save_ckpt(
            tmp_path / "again.ckpt", module.model, again, meta=meta, extra={"score.weight": module.score.weight}
        )
        tokens = json.loads((export(ckpt, tmp_path / "again", "hf") / "tokenizer.json").read_text())["added_tokens"]
        assert [t["id"] for t in tokens if t["content"] == "<|pad|>"] == [pad_id]


def test_generate_does_not_warn(tmp_path):
    """generation_config.json has no max_length, so generate(max_new_tokens=...) warns about nothing of it."""
    import logging

    model = random_gpt(tiny_config(**LLAMA_LIKE))
    out = export(save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer()), tmp_path / "out", "hf")
    assert "max_length" not in json.loads((out / "generation_config.json").read_text())
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            tokenizer = transformers.AutoTokenizer.from_pretrained(out)
            inputs = tokenizer("Once upon a time", return_tensors="pt")
            generated = ref.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        transformers_logger.removeHandler(handler)
    assert generated.shape[1] <= inputs["input_ids"].shape[1] + 5
    messages = [str(w.message) for w in caught] + logged
    assert not [m for m in messages if "max_length" in m], messages


def test_exported_files_have_the_usual_permissions(tmp_path):
    """hf, safetensors and adapter exports: 0644 files in a 0755 folder under umask 022 (not mkstemp's 0600
    nor mkdtemp's 0700), so that a shared model folder is readable by others."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    base, _, lora = lora_ckpt(tmp_path, GPT2_LIKE, ["attn.q_proj", "attn.v_proj"])
    ckpt = save_ckpt(tmp_path / "plain.ckpt", base, ByteTokenizer())
    folders = [
        export(ckpt, tmp_path / "hf", "hf"),
        export(ckpt, tmp_path / "st", "safetensors"),
        export(lora, tmp_path / "adapter", "hf", adapter_only=True),
    ]
    assert {"model.safetensors", "adapter_model.safetensors"} <= {p.name for f in folders for p in f.iterdir()}
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask, folder
        for file in folder.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file
    if mask == 0o022:
        assert stat.S_IMODE((tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode) == 0o644


# -- LoRA ------------------------------------------------------------------------------------------------


def random_adapters(model: GPT, targets, r: int = 4) -> dict[str, torch.Tensor]:
    """Non-zero LoRA tensors for ``targets`` of every block, keyed as lmforge fit saves them."""
    gen = torch.Generator().manual_seed(5)
    adapters = {}
    for i in range(model.config.n_layer):
        for target in targets:
            linear = model.get_submodule(f"blocks.{i}.{target}")
            adapters[f"model.blocks.{i}.{target}.lora_A"] = torch.randn(r, linear.in_features, generator=gen) * 0.1
            adapters[f"model.blocks.{i}.{target}.lora_B"] = torch.randn(linear.out_features, r, generator=gen) * 0.1
    return adapters


def lora_ckpt(tmp_path, arch, targets):
    """A LoRA fine-tune whose checkpoint holds the base weights too, with non-zero adapters."""
    model = random_gpt(tiny_config(**arch))
    r = 4
    adapters = random_adapters(model, targets, r)
    lora = {"r": r, "alpha": 8.0, "dropout": 0.0, "targets": [t.rsplit(".", 1)[-1] for t in targets]}
    meta = {"task": "sft", "lora": lora, "lora_base_saved": True, "base": {"source": "base.ckpt", "kind": "lmforge"}}
    ckpt = save_ckpt(tmp_path / "lora.ckpt", model, ByteTokenizer(), meta=meta, extra=adapters)
    merged = random_gpt(model.config)
    with torch.no_grad():
        for i in range(model.config.n_layer):
            for target in targets:
                a = adapters[f"model.blocks.{i}.{target}.lora_A"]
                b = adapters[f"model.blocks.{i}.{target}.lora_B"]
                merged.get_submodule(f"blocks.{i}.{target}").weight.add_(b @ a * (8.0 / r))
    return model, merged, ckpt


@pytest.mark.parametrize(
    "arch, targets",
    [(GPT2_LIKE, ["attn.q_proj", "attn.v_proj", "mlp.c_fc"]), (LLAMA_LIKE, ["attn.q_proj", "attn.k_proj", "mlp.gate"])],
    ids=["gpt2", "llama"],
)
def test_lora_merged_and_adapter_only(tmp_path, arch, targets):
    base, merged, ckpt = lora_ckpt(tmp_path, arch, targets)
    out = export(ckpt, tmp_path / "merged", "hf")
    check_causal_lm(out, merged)

    base_out = export(save_ckpt(tmp_path / "base.ckpt", base, ByteTokenizer()), tmp_path / "base", "hf")
    adapter = export(ckpt, tmp_path / "adapter", "hf", adapter_only=True, base_model=str(base_out))
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == "base" and settings["task_type"] == "CAUSAL_LM"  # no local path
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    peft = pytest.importorskip("peft")
    ref = transformers.AutoModelForCausalLM.from_pretrained(base_out).eval()
    ref = peft.PeftModel.from_pretrained(ref, adapter).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, merged(x), atol=1e-4, rtol=0)


# -- errors and the plugin ------------------------------------------------------------------------------


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".ckpt")


def test_unexpressible_model_is_one_line_error(tmp_path):
    model = random_gpt(tiny_config(pos_encoding="rope", norm="layernorm", mlp="gelu"))
    ckpt = save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer())
    with pytest.raises(HFError) as err:
        export(ckpt, tmp_path / "out", "hf")
    assert "\n" not in str(err.value) and "pos_encoding=rope, norm=layernorm" in str(err.value)
    model = random_gpt(tiny_config(**{**GPT2_LIKE, "n_kv_head": 2}))
    with pytest.raises(HFError, match="grouped-query"):
        export(save_ckpt(tmp_path / "gqa.ckpt", model, ByteTokenizer()), tmp_path / "out", "hf")
    assert leftovers(tmp_path) == []


def test_errors(tmp_path, monkeypatch):
    model = random_gpt(tiny_config(**GPT2_LIKE))
    ckpt = save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer())
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        export(ckpt, tmp_path / "exists", "hf")
    with pytest.raises(ExportError, match="dtype='float8'"):
        export(ckpt, tmp_path / "out", "hf", dtype="float8")
    with pytest.raises(ExportError, match="adapter_only=true but .* has no LoRA adapters"):
        export(ckpt, tmp_path / "out", "hf", adapter_only=True)
    with pytest.raises(UserError, match="tags=3"):  # lmforge's argument check, or the exporter's own
        export(ckpt, tmp_path / "out", "hf", tags=3)
    with pytest.raises(ExportError, match="tags=3"):
        export_hf(ckpt, tmp_path / "exists", tags=3)
    with pytest.raises(ExportError, match="datasets='data/train.jsonl' is not a Hub dataset id"):
        export(ckpt, tmp_path / "out", "hf", datasets="data/train.jsonl")
    with pytest.raises(ExportError, match="license='MIT licence' is not a Hub licence id"):
        export(ckpt, tmp_path / "out", "hf", license="MIT licence")
    with pytest.raises(ExportError, match="base_model='/no/such/base' is neither a Hub id"):
        export(ckpt, tmp_path / "out", "hf", base_model="/no/such/base")
    classifier = save_ckpt(tmp_path / "cls.ckpt", model, ByteTokenizer(), meta={"task": "classify", "labels": ["a"]})
    with pytest.raises(ExportError, match="without score.weight"):
        export(classifier, tmp_path / "out", "hf")
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "missing.ckpt", tmp_path / "out", "hf")
    assert leftovers(tmp_path) == ["exists"]

    # a failure half-way through leaves no folder, temporary or final
    import lmforge.hf_export as hf_export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, tmp_path / "out", "hf")
    assert leftovers(tmp_path) == ["exists"]


def test_entry_point_and_cli(tmp_path, capsys):
    (info,) = plugins.discover("exporter")["hf"]
    assert info.builtin and info.value == "lmforge.hf_export:export_hf"
    model = random_gpt(tiny_config(**GPT2_LIKE))
    ckpt = save_ckpt(tmp_path / "last.ckpt", model, ByteTokenizer())
    with pytest.raises(ExportError, match="is not an empty folder; run the exporter through lmforge export"):
        plugins.build("exporter", {"name": "hf"}, str(ckpt), str(tmp_path / "a"))
    (tmp_path / "a").mkdir()  # the protocol: the exporter fills the empty folder lmforge made
    out = plugins.build("exporter", {"name": "hf", "dtype": "float32"}, str(ckpt), tmp_path / "a")
    assert (out / "model.safetensors").is_file()
    from lmforge.cli import main

    main(["export", str(ckpt), "--to", str(tmp_path / "b"), "--format", "hf", "--arg", "max_shard_size=20KB"])
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    check_causal_lm(tmp_path / "b", model)


def test_chat_template_travels_with_the_export(tmp_path, bpe):
    """A tokenizer's chat template is exported where transformers reads it, and apply_chat_template works."""
    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
    tokenizer = HFTokenizer(bpe._tok, bpe.eos_token, chat_template=template)
    ckpt = save_ckpt(tmp_path / "c.ckpt", random_gpt(tiny_config(**GPT2_LIKE)), tokenizer)
    out = export(ckpt, tmp_path / "out", "hf")
    assert (out / "chat_template.jinja").read_text() == template
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<<user>>hi\n"
