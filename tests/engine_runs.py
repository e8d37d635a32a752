"""Runs shared by the engine tests (tests/test_engine.py): one optimizer step of each task, in one
process or under ``torchrun`` with 2 gloo processes, and a callback that kills a run with SIGKILL.

    torchrun --standalone --nproc_per_node 2 tests/engine_runs.py one_step pretrain 4 1 OUT.pt [BASE]
    (ENGINE_STRATEGY=fsdp2 for FSDP2 instead of DDP)
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, attention="torch", loss="auto")
SGD = {"name": "sgd", "lr": 0.5, "momentum": 0.0, "nesterov": False}
CONSTANT = {"name": "constant"}
EXAMPLES = 8


class Examples(Dataset):
    """Dict examples (input_ids, labels) with ragged completions: example i has 1 + 2*i target tokens."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (EXAMPLES, 16), generator=gen)
        self.labels = torch.randint(0, 64, (EXAMPLES, 16), generator=gen)
        for i in range(EXAMPLES):
            self.labels[i, : 16 - (1 + 2 * i)] = -100

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def pretrain_data() -> Dataset:
    x = torch.randint(0, 64, (EXAMPLES, 17), generator=torch.Generator().manual_seed(1))
    return TensorDataset(x[:, :-1], x[:, 1:])


def classify_data() -> Dataset:
    class Rows(Dataset):
        def __init__(self) -> None:
            gen = torch.Generator().manual_seed(2)
            self.ids = torch.randint(0, 64, (EXAMPLES, 12), generator=gen)
            self.y = torch.randint(0, 3, (EXAMPLES,), generator=gen)

        def __len__(self) -> int:
            return EXAMPLES

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.y[i]}

    return Rows()


def preference_data() -> Dataset:
    """8 pairs of answers with ragged lengths (chosen i: 1 + i tokens, rejected i: 8 - i), as PairDataset serves them."""
    from lmforge.data.packing import Example
    from lmforge.data.preference import PairDataset

    gen = torch.Generator().manual_seed(3)
    pairs = []
    for i in range(EXAMPLES):
        answers = []
        for n in (1 + i, EXAMPLES - i):
            ids = torch.randint(0, 64, (16,), generator=gen)
            labels = torch.full((16,), -100)
            labels[16 - n :] = torch.randint(0, 64, (n,), generator=gen)
            answers.append(Example(ids, labels))
        pairs.append(tuple(answers))
    return PairDataset(pairs)


def collate(kind: str):
    """The batches' collate function: the pair collator for preference data, else the default."""
    if kind == "preference":
        from lmforge.data.preference import PairCollator

        return PairCollator(0)
    return None


def save_base(path: Path, block_size: int = 16) -> Path:
    """A random tiny lmforge checkpoint with the byte tokenizer (test_finetune.save_base at this shape)."""
    from test_finetune import save_base as save

    return save(path, 0, **{**TINY, "vocab_size": 320, "block_size": block_size})


def module(kind: str, base: str | None = None):
    from lmforge.finetune import ClassifierModule, SFTModule
    from lmforge.model import GPTConfig
    from lmforge.pretrain import PretrainModule

    torch.manual_seed(0)
    if kind == "pretrain":
        return PretrainModule(GPTConfig(**TINY), optimizer=SGD, scheduler=CONSTANT)
    if kind == "sft":
        return SFTModule(base=base, optimizer=SGD, scheduler=CONSTANT)
    if kind == "preference":
        from lmforge.preference import PreferenceModule

        return PreferenceModule(base=base, beta=0.5, optimizer=SGD, scheduler=CONSTANT)
    return ClassifierModule(base=base, labels=["a", "b", "c"], optimizer=SGD, scheduler=CONSTANT)


def data(kind: str) -> Dataset:
    return {"pretrain": pretrain_data, "sft": Examples, "classify": classify_data, "preference": preference_data}[
        kind
    ]()


def one_step(
    kind: str, batch_size: int, accumulate: int, base: str | None = None, **trainer
) -> dict[str, torch.Tensor]:
    """The module's weights after one optimizer step over the 8 examples (in order)."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    model = module(kind, base)
    loader = DataLoader(data(kind), batch_size=batch_size, shuffle=False, collate_fn=collate(kind))
    fit = L.Trainer(
        accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        **trainer,
    )  # fmt: skip
    fit.fit(model, loader)
    state = model.state_dict()
    if trainer.get("strategy") == "fsdp2":  # gather the shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


class KillAt(L.Callback):
    """SIGKILL this process (every rank) once optimizer step ``step`` is done: a crash between checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def fsdp2_init(out: str) -> None:
    """Under torchrun: a tiny GPT built on meta, sharded over the ranks, materialised; saves the gathered weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge import parallel
    from lmforge.model import GPT, GPTConfig

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**TINY, "vocab_size": 320, "n_embd": 64}))
    parallel.apply_fsdp2(model, mesh, "32-true")
    torch.manual_seed(0)
    parallel.materialize(model, "cpu")
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save({**full, "tied": torch.tensor(model.lm_head.weight is model.wte.weight)}, out)
    dist.destroy_process_group()


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/engine_runs.py one_step KIND BATCH ACC OUT [BASE]
    if sys.argv[1] == "fsdp2_init":
        fsdp2_init(sys.argv[2])
        sys.exit(0)
    _, command, kind, batch, acc, out, *rest = sys.argv
    assert command == "one_step"
    strategy = os.environ.get("ENGINE_STRATEGY", "ddp")
    if strategy == "fsdp2":
        from lmforge import parallel

        parallel.register_strategies()
    state = one_step(kind, int(batch), int(acc), rest[0] if rest else None, strategy=strategy, devices=2)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(state, out)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()  # a rank leaving with gloo's threads alive is aborted (SIGABRT)
