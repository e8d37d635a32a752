"""Fine-tuning end to end: SFT masking and packing, classification, LoRA, Hugging Face bases, the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge import lora as lora_lib
from lmforge.checkpoint import load_checkpoint
from lmforge.data.classify import ClassificationDataModule
from lmforge.data.packing import IGNORE_INDEX
from lmforge.data.sft import SFTDataModule
from lmforge.finetune import ClassifierModule, SFTModule
from lmforge.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data"
GPT2_LIKE = dict(vocab_size=320, block_size=128, n_layer=2, n_head=4, n_embd=64, attention="torch", loss="auto")
LLAMA_LIKE = dict(
    GPT2_LIKE, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False
)


def save_base(path: Path, seed: int = 0, **config) -> Path:
    """A randomly initialised lmforge checkpoint with the byte tokenizer, as ``lmforge fit`` writes one."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**(config or GPT2_LIKE))
    model = GPT(cfg)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "lmforge": {"version": lmforge.__version__, "model_config": cfg.to_dict(), "tokenizer": {"type": "bytes"}},
        "global_step": 0,
    }
    torch.save(ckpt, path)
    return path


def quiet_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


SFT_RECORDS = [{"prompt": f"Q{i}: add {i} and {i}?\nA:", "completion": f" {2 * i}"} for i in range(24)]


# -- SFT -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_sft_loss_covers_completion_tokens_only(tmp_path, family):
    module = SFTModule(base=str(save_base(tmp_path / "base.ckpt", **family)))
    data = SFTDataModule(train=str(write_jsonl(tmp_path / "t.jsonl", SFT_RECORDS)), batch_size=6)
    data.set_tokenizer(module.tokenizer, max_length=64)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    ids, labels = batch["input_ids"], batch["labels"]
    logits = module.model(ids)
    # The module's loss is the mean cross-entropy over exactly the completion (+EOS) targets ...
    keep = labels != IGNORE_INDEX
    manual = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(module._loss(batch), manual, rtol=1e-5, atol=1e-5)
    # ... so changing what a prompt position would predict moves nothing, while a completion target does.
    prompt_pos = (~keep & batch["attention_mask"]).nonzero()[0]
    other = dict(batch, labels=labels.clone())
    other["labels"][tuple(prompt_pos)] = IGNORE_INDEX  # already ignored: the loss is identical
    assert module._loss(other).item() == module._loss(batch).item()
    completion_pos = keep.nonzero()[0]
    other["labels"][tuple(completion_pos)] = (labels[tuple(completion_pos)] + 1) % 256
    assert module._loss(other).item() != module._loss(batch).item()
    # And the gradient reaches no prompt logit.
    logits = module.model(ids).detach().requires_grad_(True)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert logits.grad[~keep].abs().max() == 0 and logits.grad[keep].abs().max() > 0


@pytest.mark.parametrize("family", [GPT2_LIKE, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_packed_rows_give_the_same_loss_as_padded_batches(tmp_path, family):
    """Document masks and restarted positions make packing exact: the summed loss is unchanged."""
    module = SFTModule(base=str(save_base(tmp_path / "base.ckpt", **family)))
    path = str(write_jsonl(tmp_path / "t.jsonl", SFT_RECORDS))
    totals = []
    for packing in (False, True):
        data = SFTDataModule(train=path, val=path, batch_size=64, packing=packing)
        data.set_tokenizer(module.tokenizer, max_length=96)
        data.setup("fit")
        batches = list(data.val_dataloader())
        if packing:
            assert batches[0]["input_ids"].shape[1] == 96 and batches[0]["segment_ids"].max() > 1
        with torch.no_grad():
            totals.append(sum(module._loss(b, reduction="sum") for b in batches))
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-5, atol=1e-4)


def test_sft_learns_and_checkpoint_round_trips(tmp_path):
    module = SFTModule(
        base=str(save_base(tmp_path / "base.ckpt")),
        optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        scheduler={"name": "constant", "warmup_steps": 0},
    )
    path = str(write_jsonl(tmp_path / "t.jsonl", SFT_RECORDS * 4))
    data = SFTDataModule(train=path, val=path, batch_size=16)
    trainer = quiet_trainer(tmp_path, max_steps=40, enable_checkpointing=True)
    data.set_tokenizer(module.tokenizer, max_length=128)
    data.setup("fit")
    with torch.no_grad():
        before = module._loss(next(iter(data.val_dataloader()))).item()
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    assert after < before - 1.0, (before, after)
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    ckpt = load_checkpoint(tmp_path / "sft.ckpt")
    assert ckpt.task == "sft" and ckpt.base["kind"] == "lmforge" and "val/loss" in ckpt.metrics
    state = module.model.state_dict()
    assert all(torch.equal(ckpt.state[k], state[k]) for k in state)


# -- classification ----------------------------------------------------------------------------


def test_classifier_learns_a_separable_dataset(tmp_path):
    rows = ["text,label"]
    words = {"red": "warm", "orange": "warm", "blue": "cold", "green": "cold", "gray": "dull", "beige": "dull"}
    g = torch.Generator().manual_seed(0)
    for i in range(240):
        word = list(words)[int(torch.randint(0, len(words), (1,), generator=g))]
        rows.append(f"the {word} thing number {i % 17},{words[word]}")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    module = ClassifierModule(
        base=str(save_base(tmp_path / "base.ckpt")),
        optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        scheduler={"name": "constant", "warmup_steps": 0},
    )
    data = ClassificationDataModule(train=str(tmp_path / "c.csv"), val_fraction=0.2, batch_size=16)
    trainer = quiet_trainer(tmp_path, max_steps=150)
    trainer.fit(module, data)
    result = trainer.test(module, data, verbose=False)[0]
    assert module.labels == ["cold", "dull", "warm"]
    assert result["test/acc"] >= 0.9 and result["test/f1_macro"] >= 0.9, result
    report = json.loads((tmp_path / "test_results.json").read_text())["report"]
    assert sum(map(sum, report["confusion_matrix"])) == sum(r["support"] for r in report["per_class"].values())


# -- LoRA ------------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_checkpoints_them_alone(tmp_path):
    base = save_base(tmp_path / "base.ckpt", **LLAMA_LIKE)
    settings = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "o_proj", "lm_head"]}
    module = SFTModule(
        base=str(base), lora=settings, optimizer={"name": "adamw", "lr": 1e-2}, scheduler={"name": "constant"}
    )
    frozen = {k: v.clone() for k, v in module.model.state_dict().items() if "lora_" not in k}
    path = str(write_jsonl(tmp_path / "t.jsonl", SFT_RECORDS))
    trainer = quiet_trainer(tmp_path, max_steps=5)
    trainer.fit(module, SFTDataModule(train=path, val=path, batch_size=8))
    now = module.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items()), "a base weight changed"
    assert all(now[k].abs().sum() > 0 for k in now if k.endswith("lora_B")), "an adapter did not train"
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    raw = torch.load(tmp_path / "lora.ckpt", weights_only=True)
    assert raw["state_dict"] and all("lora_" in k for k in raw["state_dict"])
    # The merged export equals the LoRA model, and so does a module restored from the adapters.
    ckpt = load_checkpoint(tmp_path / "lora.ckpt")
    merged = GPT(ckpt.config)
    merged.load_state_dict(ckpt.state)
    x = torch.randint(0, 256, (2, 20))
    module.model.eval()
    torch.testing.assert_close(merged.eval()(x), module.model(x), rtol=1e-5, atol=1e-5)
    restored = SFTModule.load_from_checkpoint(tmp_path / "lora.ckpt")
    torch.testing.assert_close(restored.model.eval()(x), module.model(x), rtol=1e-5, atol=1e-5)
    trainable, total = lora_lib.count_parameters(module)
    assert trainable == sum(v.numel() for k, v in now.items() if "lora_" in k) and trainable < total / 5


def test_lora_targets_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="match"):
        SFTModule(base=str(save_base(tmp_path / "b.ckpt")), lora={"targets": ["query_key_value"]})
    with pytest.raises(ValueError, match="unknown key 'rank'"):
        SFTModule(base=str(save_base(tmp_path / "b.ckpt")), lora={"rank": 4})


# -- Hugging Face bases -----------------------------------------------------------------------------


def tiny_hf_folder(path: Path, kind: str) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([r["prompt"] + r["completion"] for r in SFT_RECORDS] * 3, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=320)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            vocab_size=320,
        )
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sft_starts_from_a_hugging_face_folder(tmp_path, kind):
    folder = tiny_hf_folder(tmp_path / "hf", kind)
    module = SFTModule(base=str(folder), optimizer={"name": "adamw", "lr": 1e-3}, scheduler={"name": "constant"})
    assert module.base_info["kind"] == "hf" and module.base_info["family"] == kind
    path = str(write_jsonl(tmp_path / "t.jsonl", SFT_RECORDS))
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(module, SFTDataModule(train=path, val=path, batch_size=8))
    assert trainer.global_step == 3


def test_a_base_without_tokenizer_or_of_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no such folder|not a Hugging Face"):
        SFTModule(base=str(tmp_path / "missing-folder"))


# -- the CLI -------------------------------------------------------------------------------------------

FAST = [
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.default_root_dir",
    "run",
]


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: "), proc.stderr
    return last


def test_cli_fine_tunes_classifies_and_refuses_another_architecture(run_cli, tmp_path):
    save_base(tmp_path / "base.ckpt")
    sft = str(ROOT / "configs" / "finetune-sft.yaml")
    data = ["--data.train", str(DATA / "sft-train.jsonl"), "--data.val", str(DATA / "sft-val.jsonl")]
    out = run_cli("fit", "-c", sft, *FAST, "--model.base", "base.ckpt", *data, check=True)
    assert "trainable parameters 128,768 of 128,768 (100.00%)" in out.stdout
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_cli("validate", "-c", sft, "--model.base", "base.ckpt", *data, "--ckpt_path", str(ckpt), check=True)
    # The config names the base (the checkpoint never overrides it); another architecture there: one line.
    save_base(tmp_path / "base.ckpt", **LLAMA_LIKE)
    msg = one_line_error(run_cli("validate", "-c", sft, "--model.base", "base.ckpt", *data, "--ckpt_path", str(ckpt)))
    assert "another architecture" in msg
    # Classification through the CLI, then test: a per-class table and a results file.
    cls = str(ROOT / "configs" / "finetune-classify.yaml")
    cdata = ["--data.train", str(DATA / "classify-train.csv"), "--data.val", str(DATA / "classify-val.csv")]
    run_cli(
        "fit", "-c", cls, *FAST, "--model.base", "base.ckpt", *cdata, "--trainer.default_root_dir", "cls", check=True
    )
    out = run_cli(
        "test", "-c", cls, "--model.base", "base.ckpt", *cdata, "--trainer.default_root_dir", "cls",
        "--ckpt_path", str(tmp_path / "cls" / "checkpoints" / "last.ckpt"), check=True,
    )  # fmt: skip
    assert "confusion matrix" in out.stdout and "precision" in out.stdout
    results = json.loads((tmp_path / "cls" / "test_results.json").read_text())
    assert set(results["report"]["labels"]) == {"animal", "person", "place"}


def test_cli_bad_fine_tuning_input_is_one_line(run_cli, tmp_path):
    save_base(tmp_path / "base.ckpt")
    lora = str(ROOT / "configs" / "finetune-lora.yaml")
    msg = one_line_error(
        run_cli("fit", "-c", lora, *FAST, "--model.base", "base.ckpt", "--model.lora.targets", "[qkv]")
    )
    assert "qkv" in msg
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    msg = one_line_error(
        run_cli(
            "fit",
            "-c",
            lora,
            *FAST,
            "--model.base",
            "base.ckpt",
            "--data.train",
            "bad.jsonl",
            "--data.val",
            "bad.jsonl",
        )
    )
    assert "bad.jsonl line 2" in msg
    msg = one_line_error(run_cli("fit", "-c", lora, *FAST, "--model.base", "nowhere/model.ckpt"))
    assert "nowhere/model.ckpt" in msg


def test_classifier_lora_exports_merged_and_as_a_peft_adapter(tmp_path):
    """A LoRA classifier run end to end: adapters + head checkpointed, then exported both ways and
    loaded by transformers (merged) and by peft (adapter on the exported base) with equal logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.export import export

    base = save_base(tmp_path / "base.ckpt", **LLAMA_LIKE)
    (tmp_path / "c.csv").write_text(
        "text,label\n" + "".join(f"item {i} is {'hot' if i % 2 else 'cold'},{i % 2}\n" for i in range(40))
    )
    module = ClassifierModule(
        base=str(base),
        lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
        optimizer={"name": "adamw", "lr": 1e-2},
        scheduler={"name": "constant"},
    )
    trainer = quiet_trainer(tmp_path, max_steps=4)
    trainer.fit(module, ClassificationDataModule(train=str(tmp_path / "c.csv"), val_fraction=0.25, batch_size=8))
    trainer.save_checkpoint(tmp_path / "cls.ckpt")
    raw = torch.load(tmp_path / "cls.ckpt", weights_only=True)
    assert set(raw["state_dict"]) == {k for k, p in module.named_parameters() if p.requires_grad}
    assert "score.weight" in raw["state_dict"]

    ids = torch.tensor([list(b"item 7 is hot")])
    module.eval()
    with torch.no_grad():
        want = module(ids)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(
        export(tmp_path / "cls.ckpt", tmp_path / "merged", "hf")
    )
    assert merged.config.id2label == {0: "0", 1: "1"}
    torch.testing.assert_close(merged.eval()(ids).logits, want, rtol=1e-4, atol=1e-4)
    base_dir = export(base, tmp_path / "base-hf", "hf")
    adapter = export(tmp_path / "cls.ckpt", tmp_path / "adapter", "hf", adapter_only=True, base_model=str(base_dir))
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    ref = peft.PeftModel.from_pretrained(ref, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_lora_train_also_unfreezes_named_base_weights(tmp_path):
    from lmforge.export import export
    from lmforge.hf_export import ExportError

    base = save_base(tmp_path / "base.ckpt")
    settings = {"r": 2, "alpha": 4, "targets": ["q_proj"], "train_also": ["wte", "ln_f"]}
    module = SFTModule(
        base=str(base), lora=settings, optimizer={"name": "adamw", "lr": 1e-2}, scheduler={"name": "constant"}
    )
    trainable = {k for k, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"wte.weight", "ln_f.weight", "ln_f.bias"} | {k for k in trainable if "lora_" in k}
    before = module.model.wte.weight.detach().clone()
    path = str(write_jsonl(tmp_path / "t.jsonl", SFT_RECORDS))
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(module, SFTDataModule(train=path, val=path, batch_size=8))
    assert not torch.equal(module.model.wte.weight, before)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    ckpt = load_checkpoint(tmp_path / "lora.ckpt")
    torch.testing.assert_close(ckpt.state["wte.weight"], module.model.wte.weight.detach())
    with pytest.raises(ExportError, match="train_also"):
        export(tmp_path / "lora.ckpt", tmp_path / "adapter", "hf", adapter_only=True)
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(ValueError, match="matches no parameter"):
        SFTModule(base=str(base), lora={"targets": ["q_proj"], "train_also": ["embeddings"]})
