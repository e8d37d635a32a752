"""LoRA: low-rank adapters on the GPT's Linear layers, merged back or exported for PEFT.

:func:`apply_lora` freezes the model and wraps the chosen Linear modules in :class:`LoRALinear`,
which keeps the base ``weight``/``bias`` Parameters (so the base state-dict keys do not change)
and adds ``lora_A`` (r, in) and ``lora_B`` (out, r)::

    y = x W^T + b + dropout(x) A^T B^T * (alpha / r)

:func:`merge_lora` (modules) and :func:`merge_state` (state dicts) fold ``(alpha / r) B A`` into
``W``. :func:`save_peft_adapter` writes the adapters as a new PEFT LoRA adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) for the matching transformers model,
loadable with ``peft.PeftModel.from_pretrained`` (:func:`write_peft_adapter` writes the same files into
an existing folder, as the ``hf`` exporter does); GPT-2's fused ``c_attn`` gets one LoRA of rank
``r * parts`` with a block-diagonal ``B``, which is exactly the per-part LoRAs.

Targets use PEFT's list semantics: a target matches a module whose qualified name equals it or
ends with ``"." + target``. Hugging Face names are accepted as aliases (:func:`aliases`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import families
from lmforge.atomic import staged_folder
from lmforge.errors import ExistingPathError, UserError
from lmforge.families import ModelConfig

DEFAULT_TARGETS = ("q_proj", "v_proj")
_SUFFIXES = (".lora_A", ".lora_B")
_PEFT_PREFIX = "base_model.model."


def _check_settings(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"lora: r={r!r} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise UserError(f"lora: alpha={alpha!r} must be a positive number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"lora: dropout={dropout!r} must be in [0, 1)")


class LoRALinear(nn.Linear):
    """An nn.Linear plus a trainable low-rank update ``(alpha / r) B A`` on a dropout of its input.

    Build it with :meth:`from_linear`, which reuses the Linear's ``weight`` and ``bias`` Parameters.
    """

    r: int
    alpha: float
    scaling: float

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(r, alpha, dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> LoRALinear:
        """A LoRALinear sharing ``linear``'s weight and bias Parameters (same objects), with B = 0."""
        _check_settings(r, alpha, dropout)
        if not isinstance(linear, nn.Linear) or isinstance(linear, LoRALinear):
            raise ValueError(f"lora: from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)  # the same Parameter, or None as nn.Linear registers it
        self.train(linear.training)
        self._init_lora(r, alpha, dropout)
        return self

    def _init_lora(self, r: int, alpha: float, dropout: float) -> None:
        _check_settings(r, alpha, dropout)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kwargs = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kwargs))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default (kaiming uniform, a=sqrt(5), like PEFT), B = 0: the update starts at zero."""
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    disabled = False
    """Compute the base layer alone (:func:`adapters_disabled`: a preference loss's reference model)."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return out + update * self.scaling

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` in fp32 (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_weight(self) -> Tensor:
        """``W + scaling * B @ A``, computed in fp32 and returned in the weight's dtype.

        Differentiable (for code that needs the full weight, e.g. a fused linear + loss on a LoRA
        lm_head); call it under ``torch.no_grad()`` to merge.
        """
        if self.disabled:
            return self.weight
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        dropout = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={dropout:g}"
        )


# -- applying and merging -------------------------------------------------------------------------


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block, every LoRA layer of ``model`` computes its base layer alone: the model before fine-tuning,
    with no second copy in memory (what PEFT's ``disable_adapter()`` does)."""
    layers = list(lora_modules(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _kind(name: str) -> str:
    """A module name without its layer index: ``blocks.3.attn.q_proj`` -> ``attn.q_proj``."""
    return re.sub(r"^(.*\.)?\d+\.", "", name)


def _as_targets(targets: str | Iterable[str]) -> list[str]:
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items or not all(isinstance(t, str) and t.strip() for t in items):
        raise UserError(f"lora: targets={targets!r} must be a non-empty list of module names")
    return [t.strip() for t in items]


def aliases() -> dict[str, tuple[str, ...]]:
    """Hugging Face module names -> the lmforge targets they stand for, from every family's weight template
    (``c_attn`` -> q, k and v; names both share, such as GPT-2's ``c_proj``, need none)."""
    out: dict[str, tuple[str, ...]] = {}
    for fam in families.FAMILIES.values():
        for theirs, ours in fam.lora_aliases().items():
            out[theirs] = tuple(dict.fromkeys((*out.get(theirs, ()), *ours)))
    return out


def __getattr__(name: str) -> Any:
    """``ALIASES``, the name :func:`aliases` had as a constant: computed on access, so it follows the registry."""
    if name == "ALIASES":
        return aliases()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _aliases_text(table: dict[str, tuple[str, ...]]) -> str:
    return ", ".join(f"{k} ({' '.join(v)})" for k, v in table.items())


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Freeze every parameter of ``model`` and put LoRA on the Linear modules matching ``targets``.

    Returns the qualified names of the modules now wrapped (in model order). Errors are one-line
    ValueErrors: unknown targets, a tied lm_head, bad settings, LoRA already applied.
    """
    _check_settings(r, alpha, dropout)
    wanted = _as_targets(targets)
    if lora_modules(model):
        raise ValueError("lora: the model already has LoRA modules; apply_lora once (merge_lora first to stack)")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: set[str] = set()
    unmatched = []
    table = aliases()
    for target in wanted:
        patterns = table.get(target, ()) + (target,)
        hits = {name for name in linears if any(_matches(name, p) for p in patterns)}
        if not hits:
            unmatched.append(target)
        chosen |= hits
    if unmatched:
        kinds = list(dict.fromkeys(_kind(n) for n in linears))
        raise UserError(
            f"lora: targets {unmatched} match no Linear module of the model; its Linear modules are "
            f"{', '.join(kinds) or '(none)'}; Hugging Face aliases accepted: {_aliases_text(table)}"
        )
    # A weight shared with another parameter (a tied lm_head) cannot carry a LoRA of its own.
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in sorted(chosen):
        shared = [n for n in owners.get(id(linears[name].weight), []) if n != (f"{name}.weight" if name else "weight")]
        if shared:
            raise UserError(
                f"lora: {name} shares its weight with {shared[0]} (tied embeddings); untie them "
                f"(model.tie_embeddings: false) or drop {name.rsplit('.', 1)[-1]} from the LoRA targets"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name in linears if name in chosen]
    for name in names:
        _set_module(model, name, LoRALinear.from_linear(linears[name], r=r, alpha=alpha, dropout=dropout))
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """In place: every LoRALinear becomes a plain nn.Linear with ``W + scaling * B @ A`` (fp32 math,
    cast back), keeping the same weight/bias Parameter objects, now with requires_grad=True."""
    modules = lora_modules(model)
    if "" in modules:
        raise ValueError("lora: merge_lora needs a model containing LoRALinear modules, not a LoRALinear itself")
    for name, module in modules.items():
        module.weight.copy_(module.merged_weight())
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = module.weight
        if module.bias is not None:
            linear.bias = module.bias
        for p in linear.parameters():
            p.requires_grad_(True)
        linear.train(module.training)
        _set_module(model, name, linear)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters: ``{"blocks.0.attn.q_proj.lora_A": ..., "blocks.0.attn.q_proj.lora_B": ...}``."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(_SUFFIXES)}


def _pairs(adapters: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """module name -> (A, B); every key must end with .lora_A / .lora_B and come in pairs."""
    out: dict[str, list] = {}
    for key, tensor in adapters.items():
        if not key.endswith(_SUFFIXES):
            raise UserError(f"lora: adapter key {key!r} does not end with .lora_A or .lora_B")
        name, kind = key.rsplit(".", 1)
        out.setdefault(name, [None, None])[kind == "lora_B"] = tensor
    for name, (a, b) in out.items():
        if a is None or b is None:
            raise UserError(f"lora: adapters for {name} lack {'lora_A' if a is None else 'lora_B'}")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise UserError(
                f"lora: adapters for {name} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                "need A (r, in) and B (out, r)"
            )
    return {name: (a, b) for name, (a, b) in out.items()}


def _settings(lora: dict) -> tuple[int, float]:
    if not isinstance(lora, dict) or "r" not in lora or "alpha" not in lora:
        raise UserError(f"lora: settings {lora!r} must be a dict with r and alpha")
    r, alpha = lora["r"], lora["alpha"]
    _check_settings(r, alpha, lora.get("dropout", 0.0) or 0.0)
    return r, alpha


def _where(tensor: Tensor) -> tuple[int, int]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


@torch.no_grad()
def merge_state(state: dict[str, Tensor], adapters: dict[str, Tensor], lora: dict) -> dict[str, Tensor]:
    """A new state dict with ``scaling * B @ A`` added to each adapted ``<module>.weight`` (fp32 math).

    ``lora`` is the settings dict saved with the checkpoint (``r``, ``alpha``, ...); the inputs are
    not modified.
    """
    out = dict(state)
    if not adapters:
        return out
    r, alpha = _settings(lora)
    scaling = alpha / r
    storages: dict[tuple[int, int], list[str]] = {}
    for key, tensor in state.items():
        if isinstance(tensor, Tensor) and tensor.device.type != "meta":
            storages.setdefault(_where(tensor), []).append(key)
    for name, (a, b) in _pairs(adapters).items():
        key = f"{name}.weight"
        if key not in state:
            raise UserError(f"lora: adapters for {name} but the state dict has no {key}")
        weight = state[key]
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise UserError(
                f"lora: adapters for {name} give a ({b.shape[0]}, {a.shape[1]}) update; {key} is {tuple(weight.shape)}"
            )
        if weight.device.type != "meta":
            tied = [k for k in storages.get(_where(weight), []) if k != key]
            if tied:
                raise UserError(f"lora: {key} is tied to {tied[0]}; a LoRA on a tied weight cannot be merged")
        delta = (b.float() @ a.float()) * scaling
        out[key] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied (shared) parameters are counted once."""
    params = list(model.parameters())  # deduplicated by nn.Module
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: nn.Module) -> str:
    """``trainable params: 12,288 of 1,234,567 (1.00%) in 8 LoRA modules (r=8, alpha=16)``."""
    trainable, total = count_parameters(model)
    text = f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
    modules = list(lora_modules(model).values())
    if modules:
        rs = "/".join(str(v) for v in dict.fromkeys(m.r for m in modules))
        alphas = "/".join(f"{v:g}" for v in dict.fromkeys(m.alpha for m in modules))
        noun = "module" if len(modules) == 1 else "modules"
        text += f" in {len(modules)} LoRA {noun} (r={rs}, alpha={alphas})"
    return text


# -- PEFT export -------------------------------------------------------------------------------------


def _shortest_suffixes(selected: dict[str, object], universe: Iterable[str]) -> list[str]:
    """Module-name suffixes (PEFT target semantics) covering ``selected`` and matching no module of
    ``universe`` outside it, nor one of ``selected`` with a different value; shortest first."""
    universe = list(dict.fromkeys([*universe, *selected]))
    out: list[str] = []
    for name, value in selected.items():
        if any(_matches(name, s) for s in out):
            continue
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            hits = [m for m in universe if _matches(m, suffix)]
            if all(m in selected and selected[m] == value for m in hits):
                out.append(suffix)
                break
    return out


def _fmt_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def peft_adapter_tensors(
    adapters: dict[str, Tensor], config: ModelConfig, r: int
) -> tuple[dict[str, tuple[Tensor, Tensor]], str]:
    """(HF module name -> (A, B)) and the family, the parts of a fused module (GPT-2's q/k/v in ``c_attn``)
    joined into one LoRA."""
    family = families.family_of(config)
    mapping = families.family(family).linear_modules(config.n_layer)
    shapes = families.shapes(config)
    grouped: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    members: dict[str, list[str]] = {}  # HF module -> the lmforge modules it holds, by part
    for name, (hf_name, part, parts) in mapping.items():
        members.setdefault(hf_name, [""] * parts)[part] = name
    for name, (a, b) in _pairs(adapters).items():
        if name not in mapping:
            raise families.HFError(f"lora: adapters for {name!r}, which has no {family} transformers counterpart")
        if name == "lm_head" and getattr(config, "tie_embeddings", False):
            raise families.HFError(
                "lora: adapters for lm_head, which is tied to wte (tie_embeddings); untie or drop lm_head"
            )
        hf_name, part, _ = mapping[name]
        grouped.setdefault(hf_name, {})[part] = (a, b)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for hf_name, pieces in grouped.items():
        if len(members[hf_name]) == 1:
            out[hf_name] = pieces[0]
            continue
        sizes = [shapes[f"{name}.weight"][0] for name in members[hf_name]]  # out features of each part
        present = sorted(pieces)
        a = torch.cat([pieces[p][0] for p in present], dim=0)  # (sum of ranks, in)
        b_ref = pieces[present[0]][1]
        b = torch.zeros(sum(sizes), a.shape[0], dtype=b_ref.dtype, device=b_ref.device)  # block-diagonal
        col = 0
        for p in present:
            piece = pieces[p][1]
            row = sum(sizes[:p])
            if piece.shape[0] != sizes[p]:
                raise families.HFError(
                    f"lora: lora_B for part {p} of {hf_name} has {piece.shape[0]} rows, expected {sizes[p]}"
                )
            b[row : row + sizes[p], col : col + piece.shape[1]] = piece
            col += piece.shape[1]
        out[hf_name] = (a, b)
    return out, family


def save_peft_adapter(
    adapters: dict[str, Tensor],
    config: ModelConfig,
    lora: dict,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
    modules_to_save: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``adapters`` (lmforge names) as a new PEFT LoRA adapter folder ``out_dir`` (which must not exist).

    What :func:`write_peft_adapter` writes, into a temporary folder renamed to ``out_dir`` at the end, so
    that a failure leaves nothing; the files get the usual permissions (0644 under umask 022).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExistingPathError(f"adapter folder {out_dir} already exists; remove it or choose another")
    settings, tensors = _peft_adapter(adapters, config, lora, base_model_name_or_path, task_type, modules_to_save)
    with staged_folder(out_dir) as tmp:
        _write_peft_files(tmp, settings, tensors)
    return out_dir


def write_peft_adapter(
    adapters: dict[str, Tensor],
    config: ModelConfig,
    lora: dict,
    folder: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
    modules_to_save: dict[str, Tensor] | None = None,
) -> list[str]:
    """Write ``adapters`` (lmforge names) as a PEFT LoRA adapter into the existing ``folder`` (an exporter's
    folder, made atomic by lmforge); returns the names of the files written.

    ``folder`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
    ``base_model.model.<HF module>.lora_A.weight``). Everything is checked before either is written.
    ``modules_to_save`` (e.g. ``{"score.weight": tensor}``) are saved whole, as PEFT does for a classifier
    head. GPT-2's q/k/v adapters become one ``c_attn`` LoRA of rank ``r * parts`` with ``rank_pattern`` /
    ``alpha_pattern`` keeping the scaling ``alpha / r``. ``base_model_name_or_path`` is written as given: pass
    a Hub id or a folder name, never a machine's absolute path (the file is shared with the adapter).
    """
    settings, tensors = _peft_adapter(adapters, config, lora, base_model_name_or_path, task_type, modules_to_save)
    return _write_peft_files(Path(folder), settings, tensors)


def _write_peft_files(folder: Path, settings: dict, tensors: dict[str, Tensor]) -> list[str]:
    from safetensors.torch import save_file

    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ["adapter_config.json", "adapter_model.safetensors"]


def _peft_adapter(
    adapters: dict[str, Tensor],
    config: ModelConfig,
    lora: dict,
    base_model_name_or_path: str | None,
    task_type: str,
    modules_to_save: dict[str, Tensor] | None,
) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json values, adapter_model.safetensors tensors) of a PEFT LoRA adapter."""
    r, alpha = _settings(lora)
    if not adapters:
        raise UserError("lora: no adapters to save")
    fused, family = peft_adapter_tensors(adapters, config, r)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for hf_name, (a, b) in fused.items():
        tensors[f"{_PEFT_PREFIX}{hf_name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{hf_name}.lora_B.weight"] = b.detach().cpu().contiguous()
        rank = int(a.shape[0])
        ranks[hf_name] = (rank, alpha * rank / r)
    module_names: list[str] = []
    for key, tensor in (modules_to_save or {}).items():
        if "." not in key:
            raise UserError(f"lora: modules_to_save key {key!r} must be a tensor name such as score.weight")
        module_names.append(key.rsplit(".", 1)[0])
        tensors[f"{_PEFT_PREFIX}{key}"] = tensor.detach().cpu().contiguous()
    module_names = list(dict.fromkeys(module_names))

    fam = families.family(family)
    heads = [prefix.rstrip(".") for prefix in fam.head_tensors]  # score, or classifier and pre_classifier
    universe = [hf for hf, _, _ in fam.linear_modules(config.n_layer).values()] + heads
    targets = _shortest_suffixes({name: True for name in fused}, universe)
    patterned = {name: value for name, value in ranks.items() if value[0] != r}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, int | float] = {}
    if patterned:
        # keys must not catch a targeted module with another rank; untargeted ones do not matter
        for key in _shortest_suffixes(patterned, ranks):
            rank, alpha_p = next(v for name, v in patterned.items() if _matches(name, key))
            rank_pattern[key], alpha_pattern[key] = rank, _fmt_number(alpha_p)
    settings = {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": fam.conv1d,  # e.g. GPT-2's Conv1D stores weights (in, out)
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _fmt_number(alpha),
        "lora_dropout": float(lora.get("dropout", 0.0) or 0.0),
        "modules_to_save": module_names or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": sorted(targets),
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": False,
    }
    return settings, tensors
