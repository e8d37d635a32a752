"""Preference tuning: DPO and IPO equal TRL's DPOTrainer (loss, rewards and gradients, fp32) on a tiny GPT-2; the
reference-free losses against their formulas in float64; the pair data (answer-only labels, one batch of both
answers, multi-turn prompts); the LoRA reference is the base; accumulation gives the one-batch update; a fit
raises the preference accuracy, checkpoints the method and exports like any fine-tune."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import quiet_trainer, save_base, write_jsonl  # noqa: E402

from lmforge.data.preference import PreferenceDataModule  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.preference import PreferenceModule, preference_losses, sequence_logps  # noqa: E402
from lmforge.tokenizers import ByteTokenizer  # noqa: E402

PAIRS = [
    {"prompt": f"Q{i}: name it?\nA:", "chosen": f" the thing {i}", "rejected": f" {i}"} for i in range(24)
]  # fmt: skip


# -- the losses ----------------------------------------------------------------------------------------------


def _logps(seed: int, B: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_and_simpo_formulas_in_float64(smoothing):
    pc, pr, rc, rr = _logps(0)
    nc, nr = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([2, 2, 9, 1, 4])
    out = preference_losses("dpo", (pc, pr), (rc, rr), (nc, nr), beta=0.3, label_smoothing=smoothing)
    d = 0.3 * ((pc - rc) - (pr - rr))
    expect = -(1 - smoothing) * torch.log(torch.sigmoid(d)) - smoothing * torch.log(torch.sigmoid(-d))
    torch.testing.assert_close(out["loss"], expect)
    torch.testing.assert_close(out["chosen"] - out["rejected"], d)
    simpo = preference_losses("simpo", (pc, pr), None, (nc, nr), beta=2.0, label_smoothing=smoothing, simpo_gamma=0.5)
    z = 2.0 * (pc / nc - pr / nr) - 0.5
    torch.testing.assert_close(simpo["loss"], -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z))


def test_orpo_formula_in_float64():
    pc, pr, _, _ = _logps(1)
    nc, nr = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([2, 2, 9, 1, 4])
    out = preference_losses("orpo", (pc, pr), None, (nc, nr), beta=0.1, orpo_lambda=0.25)
    mc, mr = pc / nc, pr / nr
    odds = lambda m: torch.log(torch.exp(m) / (1 - torch.exp(m)))  # noqa: E731
    expect = -mc - 0.25 * torch.log(torch.sigmoid(odds(mc) - odds(mr)))
    torch.testing.assert_close(out["loss"], expect)


def test_bad_settings_are_one_line(tmp_path):
    base = save_base(tmp_path / "base.ckpt")
    for kwargs, needle in (({"loss": "kto"}, "model.loss='kto'"), ({"beta": 0}, "model.beta=0"),
                           ({"label_smoothing": 0.5}, "model.label_smoothing=0.5"),
                           ({"loss": "ipo", "label_smoothing": 0.1}, "applies to dpo and simpo")):  # fmt: skip
        with pytest.raises(UserError, match=needle.replace("(", "\\(")):
            PreferenceModule(base=str(base), **kwargs)


# -- parity with TRL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    from lmforge.tokenizers import HFTokenizer

    d = tmp_path_factory.mktemp("trl")
    texts = ["the cat sat on the mat", "a dog ran far away", "the thing is here"] * 20
    tok = HFTokenizer.train_bpe(texts, vocab_size=300)
    tok._tok.save(str(d / "tokenizer.json"))
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    ptok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), **special)
    config = transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(config).eval()
    policy = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # the policy: the reference moved a little, so the log-ratios are not zero
        for p, q in zip(policy.parameters(), ref.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    folders = {}
    for name, model in (("policy", policy), ("ref", ref)):
        folders[name] = d / name
        model.save_pretrained(folders[name])
        ptok.save_pretrained(folders[name])
    return transformers, ptok, folders


@pytest.mark.parametrize("loss_type, ours", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trl(trl_setup, loss_type, ours, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmforge import hf

    transformers, ptok, folders = trl_setup
    policy = transformers.GPT2LMHeadModel.from_pretrained(folders["policy"]).eval()
    ref = transformers.GPT2LMHeadModel.from_pretrained(folders["ref"]).eval()
    data = [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran far"},
            {"prompt": "a dog", "chosen": " ran far away", "rejected": " sat"},
            {"prompt": "the thing", "chosen": " is here", "rejected": " is the cat on the mat"}]  # fmt: skip
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=[loss_type], per_device_train_batch_size=3,
                     report_to=[], use_cpu=True, max_length=64)  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(data),
                         processing_class=ptok)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    gpt, _, _ = hf.load_model(folders["policy"])
    reference, _, _ = hf.load_model(folders["ref"])
    ids = batch["input_ids"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
    x, y = ids[:, :-1], labels[:, 1:]
    logps, counts = sequence_logps(gpt, x, y)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, x, y)
        # the reference log-probabilities are transformers' own (a clean forward of the reference model) ...
        fresh = transformers.GPT2LMHeadModel.from_pretrained(folders["ref"]).eval()  # not the one TRL patched
        clean = fresh(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1)
        clean = (clean.gather(-1, ids[:, 1:, None])[..., 0] * batch["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(ref_logps, clean, atol=1e-5, rtol=1e-6)
    B = ids.size(0) // 2
    # ... and TRL is handed them as precomputed (the reference model TRL holds computes ~1e-4 apart from a fresh copy
    # of itself once the trainer is built), so what is compared is TRL's policy log-probabilities, loss and gradients
    trainer.precompute_ref_logps = True
    batch = {**batch, "ref_chosen_logps": clean[:B], "ref_rejected_logps": clean[B:]}
    policy.train()  # dropout is 0: train mode only as TRL runs it
    theirs = trainer.compute_loss(policy, batch)
    theirs.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    out = preference_losses(ours, (logps[:B], logps[B:]), (ref_logps[:B], ref_logps[B:]), (counts[:B], counts[B:]),
                            beta=0.2)  # fmt: skip
    loss = out["loss"].mean()
    loss.backward()
    torch.testing.assert_close(loss, theirs.detach(), atol=1e-6, rtol=1e-5)
    if metrics:  # TRL logs its rewards where this version of it records metrics from compute_loss
        torch.testing.assert_close(float(out["chosen"].mean()), metrics["rewards/chosen"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(float(out["rejected"].mean()), metrics["rewards/rejected"], atol=1e-5, rtol=1e-4)
    grads = hf.state_dict_to_hf({k: p.grad for k, p in gpt.named_parameters() if p.grad is not None}, gpt.config)
    their_grads = {k: p.grad for k, p in policy.named_parameters() if p.grad is not None}
    assert set(grads) == set(their_grads)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[key], atol=1e-6, rtol=1e-4, msg=key)


# -- the data ------------------------------------------------------------------------------------------------


def test_pairs_label_the_answers_only_and_batch_both(tmp_path):
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "p.jsonl", PAIRS)), val_fraction=0.25,
                              tokenizer=ByteTokenizer(), max_length=64, batch_size=4)  # fmt: skip
    dm.setup("fit")
    assert dm.num_examples == 18 and dm.stats["val_pairs"] == 6
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["index"].tolist() == [0, 1, 2, 3]
    tok = ByteTokenizer()
    for row in range(8):
        trained = [int(t) for t in batch["labels"][row] if t != -100]
        pair = dm.pairs["val"][row % 4]
        expected = pair[0] if row < 4 else pair[1]
        assert torch.equal(batch["labels"][row, : len(expected.labels)], expected.labels)
        text = bytes(trained[:-1]).decode()
        assert trained[-1] == tok.eos_id and text in {p["chosen"] for p in PAIRS} | {p["rejected"] for p in PAIRS}
        assert (text.startswith(" the thing")) is (row < 4)


def test_message_pairs_train_only_this_answer(tmp_path):
    record = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "name it"}],
              "chosen": [{"role": "assistant", "content": "the thing"}], "rejected": "it"}  # fmt: skip
    path = write_jsonl(tmp_path / "m.jsonl", [record] * 4)
    dm = PreferenceDataModule(train=str(path), val=str(path), tokenizer=ByteTokenizer(), max_length=100)
    dm.setup("fit")
    chosen, rejected = dm.pairs["train"][0]
    trained = bytes(int(t) for t in chosen.labels if t != -100 and t < 256).decode()
    assert trained == "the thing"  # not the earlier "hello"
    assert bytes(int(t) for t in rejected.labels if t != -100 and t < 256).decode() == "it"
    assert bytes(int(t) for t in chosen.input_ids if t < 256).decode().count("hello") == 1


def test_a_record_without_rejected_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b"}])
    dm = PreferenceDataModule(train=str(path), val=str(path), tokenizer=ByteTokenizer(), max_length=64)
    with pytest.raises(UserError, match=r"bad.jsonl line 1: no field 'rejected'"):
        dm.setup("fit")


# -- the module ----------------------------------------------------------------------------------------------


def _module(tmp_path, **kwargs):
    base = save_base(tmp_path / "base.ckpt", block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=32,
                     attention="torch", loss="torch")  # fmt: skip
    return PreferenceModule(base=str(base), **kwargs)


def test_lora_reference_is_the_base_with_adapters_off(tmp_path):
    from lmforge.lora import adapters_disabled, lora_modules

    module = _module(tmp_path, lora={"r": 4, "targets": ["q_proj", "v_proj", "c_fc"]})
    assert module.__dict__["_reference"] is None  # no second copy
    with torch.no_grad():
        for layer in lora_modules(module.model).values():
            layer.lora_B.normal_()
    ids = torch.randint(0, 256, (2, 10))
    base = PreferenceModule(base=str(tmp_path / "base.ckpt")).model
    with torch.no_grad(), adapters_disabled(module.model):
        torch.testing.assert_close(module.model(ids), base(ids))
    assert not torch.allclose(module.model(ids), base(ids))  # the adapters are back on


def test_accumulated_micro_batches_give_the_one_batch_gradient(tmp_path):
    module = _module(tmp_path, beta=0.5)
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "p.jsonl", PAIRS)), val_fraction=0.25,
                              tokenizer=ByteTokenizer(), max_length=64, batch_size=6)  # fmt: skip
    dm.setup("fit")
    whole = dm.collate([dm.datasets["train"][i] for i in range(6)])
    halves = [dm.collate([dm.datasets["train"][i] for i in part]) for part in ((0, 1), (2, 3, 4, 5))]

    def grads(batches):
        module.zero_grad()
        total = 0
        for b in batches:
            loss_sum, count, _ = module._train_loss(b)
            loss_sum.backward()
            total += int(count)
        return {k: p.grad / total for k, p in module.model.named_parameters() if p.grad is not None}

    one, two = grads([whole]), grads(halves)
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_fit_raises_preference_accuracy_and_exports(tmp_path, loss):
    """A few steps of preference tuning raise the held-out preference accuracy; the checkpoint records the method
    and exports to transformers as a causal LM (and, with LoRA, as a PEFT adapter)."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.export import export

    pairs = [{"prompt": f"Q{i % 7}:", "chosen": " yes", "rejected": " no"} for i in range(64)]
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "p.jsonl", pairs)), val_fraction=0.25,
                              max_length=32, batch_size=8)  # fmt: skip
    module = _module(tmp_path, loss=loss, beta=0.5, lora={"r": 4, "targets": ["q_proj", "v_proj", "c_fc"]},
                     optimizer={"name": "adamw", "lr": 3e-3})  # fmt: skip
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=2, inference_mode=False)
    first = trainer.validate(module, datamodule=dm, verbose=False)[0]
    before, margin = first["val/accuracy"], first["val/rewards/margin"]
    trainer = quiet_trainer(tmp_path, max_steps=30, enable_checkpointing=True, limit_val_batches=2,
                            val_check_interval=30, check_val_every_n_epoch=None)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    after = float(trainer.callback_metrics["val/accuracy"])
    grown = float(trainer.callback_metrics["val/rewards/margin"])
    assert after == 1.0 and (after > before or grown > margin + 0.1), (before, after, margin, grown)
    ckpt_path = next(p for p in Path(tmp_path).rglob("*.ckpt") if p.name != "base.ckpt")
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.task == "preference"
    meta = torch.load(ckpt_path, weights_only=True)["lmforge"]["preference"]
    assert meta["loss"] == loss and meta["reference"] == ("lora-disabled" if loss == "dpo" else "none")
    out = export(ckpt_path, tmp_path / "hf", "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    card = (out / "README.md").read_text()
    assert f"preference tuning ({loss.upper() if loss != 'simpo' else 'SimPO'}" in card
    adapter = export(ckpt_path, tmp_path / "adapter", "hf", adapter_only=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


@pytest.mark.slow
def test_the_example_config_runs(run_cli, tmp_path):
    """`lmforge fit -c configs/finetune-dpo.yaml` on the shipped pairs (here from a random tiny base, a few steps)."""
    base = save_base(tmp_path / "base.ckpt")
    root = Path(__file__).resolve().parents[1]
    data = root / "configs/data"
    proc = run_cli("fit", "-c", str(root / "configs/finetune-dpo.yaml"), "--model.base", str(base),
                   "--data.train", str(data / "preference-train.jsonl"), "--data.val", str(data / "preference-val.jsonl"),
                   "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                   "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
                   "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preference loss dpo (beta 0.1); reference: a frozen copy of the base" in proc.stdout
    metrics = (next((tmp_path / "run").rglob("metrics.csv"))).read_text()
    assert "val/rewards/accuracy" in metrics and "train/kl" in metrics
