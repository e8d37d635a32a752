"""How a model is placed and parallelised, applied from outside the model (torchtitan's way).

A task builds its model on the meta device (no memory) and calls :func:`prepare` from
``configure_model``, which, in this order,

1. turns on activation checkpointing for every block or every n-th one (``Block.checkpoint``);
2. under the ``fsdp2`` strategy, shards each Transformer block and then the root with FSDP2's
   ``fully_shard`` (bf16 parameters and fp32 gradient reduction under ``bf16-mixed``), while the
   weights are still on the meta device;
3. materialises the weights on the run's device (``to_empty``) and initialises them in place
   (``reset_parameters``), or loads nothing for a model that already holds weights;
4. compiles the model's ``forward`` (``nn.Module.compile``: state-dict keys keep their names).

DDP needs nothing here: Lightning's ``ddp`` strategy wraps the LightningModule after this hook.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with every rank in the
data-parallel dimension (no tensor parallelism), registered as ``trainer.strategy: fsdp2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import UserError


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give a meta-device model real storage on ``device`` and initialise it (its ``reset_parameters``)."""
    if not is_meta(model):
        return
    # swap storage into the existing Parameter objects: tied weights (wte / lm_head) stay one tensor and
    # FSDP2's references to its sharded parameters stay valid (a plain to_empty makes new ones)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with torch.no_grad():
        mesh = _unsupported_rng_mesh(model)
        if mesh is None:
            model.reset_parameters()
            return
        # sharded on a mesh whose device DTensor's random ops do not coordinate (the CPU): every rank would
        # draw the same numbers into its own shard, repeating the weights; draw from a per-rank stream instead
        # (the same distributions; the global random state is left as it was)
        rank = mesh.get_rank()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)
            model.reset_parameters()


def _unsupported_rng_mesh(model: nn.Module):
    """The device mesh of a model's sharded parameters when DTensor's random ops cannot coordinate on it."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._random import is_rng_supported_mesh
    except ImportError:
        return None
    for p in model.parameters():
        if isinstance(p, DTensor):
            return None if is_rng_supported_mesh(p.device_mesh) else p.device_mesh
    return None


def checkpoint_every(setting: bool | int | None) -> int:
    """``model.activation_checkpointing`` as "every n-th block" (0: none); a bad value is a one-line error."""
    if setting is False or setting is None or setting == 0:
        return 0
    every = 1 if setting is True else int(setting)
    if every < 1:
        raise UserError(f"model.activation_checkpointing={setting!r}: use false, true or a positive n (every n-th block)")
    return every


def apply_activation_checkpointing(model: nn.Module, setting: bool | int) -> int:
    """Recompute the activations of every block (``True`` or 1) or of every n-th block (``n``) in the
    backward; returns how many blocks recompute."""
    every = checkpoint_every(setting)
    if not every:
        return 0
    blocks = list(getattr(model, "blocks", []))
    for i, block in enumerate(blocks):
        block.checkpoint = i % every == 0
    return sum(b.checkpoint for b in blocks)


def fsdp2_policy(precision: str | None):
    """FSDP2's mixed-precision policy for a Lightning precision setting: bf16 (or fp16) parameters
    with fp32 gradient reduction under ``*-mixed``; none in full precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = str(precision or "32-true")
    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision.startswith("16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp2(model: nn.Module, mesh, precision: str | None) -> None:
    """``fully_shard`` each block (its parameters gathered only while it runs), then the root
    (embeddings, final norm, head), with :func:`fsdp2_policy`."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    policy = fsdp2_policy(precision)
    blocks = list(getattr(model, "blocks", []))
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by the backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def compile_settings(setting: bool | dict[str, Any] | None) -> dict[str, Any] | None:
    """``model.compile``: false, true (torch.compile's defaults) or torch.compile's arguments
    (backend, mode, fullgraph, dynamic, options)."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if not isinstance(setting, dict):
        raise UserError(f"model.compile={setting!r}: use false, true or torch.compile's arguments as a mapping")
    allowed = {"backend", "mode", "fullgraph", "dynamic", "options"}
    unknown = set(setting) - allowed
    if unknown:
        raise UserError(f"model.compile: unknown key {sorted(unknown)[0]!r}; the keys are {', '.join(sorted(allowed))}")
    return dict(setting)


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def prepare(module, model: nn.Module, *, compile: bool | dict | None, activation_checkpointing: bool | int) -> None:
    """Everything ``configure_model`` does to a task's model; idempotent (fit, then test, calls it twice)."""
    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    device = strategy.root_device if strategy is not None else torch.device("cpu")
    apply_activation_checkpointing(model, activation_checkpointing)
    if isinstance(strategy, FSDP2Strategy):
        mesh = strategy.device_mesh["data_parallel"]
        apply_fsdp2(model, mesh, getattr(trainer, "precision", None))
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for child in module.children():  # a task's own layers (a classification head) reduce their gradients too
            if child is not model and not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh, mp_policy=fsdp2_policy(getattr(trainer, "precision", None)))
    materialize(model, device)
    settings = compile_settings(compile)
    if settings is not None and not is_compiled(model):
        model.compile(**settings)


def _model_parallel_base():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2Strategy(_model_parallel_base()):
    """FSDP2 over every process (data parallel only): ``trainer.strategy: fsdp2``.

    Lightning's ``ModelParallelStrategy`` with the data-parallel size set to the world size. Each rank
    saves its shard of the weights and optimizer state into one checkpoint folder
    (``torch.distributed.checkpoint``); ``lmforge export`` and ``--ckpt_path`` read it.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_distributed_checkpoint", True)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        """Every rank writes its shard into a staging folder beside the target; rank 0 then swaps it in,
        so a run killed while saving never leaves a half-written checkpoint under the final name."""
        import os
        import shutil
        import socket
        from pathlib import Path

        path = Path(self.broadcast(str(filepath)))
        staging = Path(self.broadcast(str(path.parent / f".{path.name}.lmtmp-{socket.gethostname()}-{os.getpid()}")))
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)
        self.barrier("lmforge_save_start")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("lmforge_save_written")
        if self.global_rank == 0:
            old = path.parent / f".{path.name}.lmold-{os.getpid()}"
            if path.is_dir():
                path.rename(old)
            elif path.exists():
                path.unlink()
            staging.rename(path)
            if old.exists():
                shutil.rmtree(old)
        self.barrier("lmforge_save_done")


def register_strategies() -> None:
    """Make ``trainer.strategy: fsdp2`` a name Lightning knows."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register(
            "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard per Transformer block), data parallel over all ranks"
        )
