"""A bidirectional Transformer encoder (BERT, DistilBERT), configured by one validated dataclass.

BERT is word + learned absolute position + token-type embeddings, a LayerNorm over their sum, then
blocks of full (non-causal) self-attention and an exact-erf GELU MLP, each followed by a residual
add and a LayerNorm ("post" norm); DistilBERT is the same without token types and without the pooler.
``norm_position: pre`` gives the pre-norm variant (a norm before each branch, one at the end).

Heads: the pooler (dense + tanh on the [CLS] position), the masked-LM head (dense + GELU + LayerNorm,
then the word embeddings, tied, plus a bias) and the optional next-sentence head on the pooled output.
The masked-LM loss is computed on the selected positions only: their hidden rows are gathered first,
so the head's cost follows the number of masked tokens, not the sequence length. Attention and the
loss go through :mod:`lmforge.ops`, the single dispatch point where the Triton kernels plug in.

Weight names follow lmforge's decoder (``wte``, ``wpe``, ``blocks.{i}.attn.q_proj``, ``mlp.c_fc``, ...), one
module per Hugging Face module, so BERT/DistilBERT checkpoints map onto them name for name:
``embeddings.token_type_embeddings`` -> ``wtt``, ``embeddings.LayerNorm`` -> ``ln_emb``,
``attention.output.LayerNorm`` / ``sa_layer_norm`` -> ``ln_1``, ``output.LayerNorm`` / ``output_layer_norm``
-> ``ln_2``, ``pooler.dense`` -> ``pooler``, ``cls.predictions.transform`` / ``vocab_transform`` +
``vocab_layer_norm`` -> ``mlm_head.dense`` + ``mlm_head.ln``, ``cls.predictions.bias`` /
``vocab_projector.bias`` -> ``mlm_head.bias``, ``cls.seq_relationship`` -> ``nsp_head``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lmforge import ops
from lmforge.errors import UserError
from lmforge.model import check_choices, check_positive_ints, config_error

Backend = Literal["auto", "triton", "torch"]


@dataclass
class EncoderConfig:
    """Shape and options of an :class:`Encoder`; every field is checked on construction."""

    vocab_size: int = 512
    """Rows of the word embedding (and of the tied masked-LM decoder); at least the tokenizer's vocabulary."""
    max_positions: int = 512
    """Learned absolute positions: the longest sequence, [CLS] and [SEP] included."""
    type_vocab_size: int = 2
    """Token types (segments A/B of a pair, as BERT); 0 = no token-type embedding (DistilBERT)."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Attention heads per layer."""
    n_embd: int = 256
    """Width of the residual stream (BERT's hidden_size); a multiple of n_head."""
    mlp_hidden: int | None = None
    """MLP hidden width (BERT's intermediate_size); default 4 * n_embd."""
    norm_position: Literal["post", "pre"] = "post"
    """LayerNorm after each residual add (post: BERT, DistilBERT) or before each branch plus a final one (pre)."""
    norm_eps: float = 1e-12
    """Epsilon of every LayerNorm (BERT's layer_norm_eps)."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """Activation of the MLP and the masked-LM transform: exact erf GELU (BERT) or its tanh approximation."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (BERT pretrains with 0.1)."""
    pooler: bool = True
    """A dense + tanh layer on the [CLS] position (BERT); DistilBERT has none."""
    nsp: bool = False
    """A next-sentence-prediction head (2 classes) on the pooled output; needs the pooler."""
    attention: Backend = "auto"
    """Attention implementation: auto (best available), triton (lmforge kernel) or torch (SDPA)."""
    loss: Backend = "auto"
    """Loss implementation: auto (best available), triton (fused linear + cross-entropy) or torch."""

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return config_error(self, key, why)

        check_positive_ints(self, ("vocab_size", "max_positions", "n_layer", "n_head", "n_embd"))
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise bad("type_vocab_size", "must be a non-negative integer (0: no token types)")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"must be a multiple of n_head={self.n_head}")
        if self.mlp_width < 1:
            raise bad("mlp_hidden", "must be a positive integer")
        if not self.norm_eps > 0:
            raise bad("norm_eps", "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.nsp and not self.pooler:
            raise bad("nsp", "needs pooler: true (the next-sentence head reads the pooled [CLS] output)")
        check_choices(self, (("norm_position", ("post", "pre")), ("activation", ("gelu", "gelu_tanh"))))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """MLP hidden width after defaults."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    @property
    def block_size(self) -> int:
        """The longest sequence the model reads (what a task hands its data module as max_seq_length)."""
        return self.max_positions

    def shape(self) -> dict:
        """The fields that fix the weights' shapes and meaning, defaults resolved."""
        return {
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "type_vocab_size": self.type_vocab_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "mlp_hidden": self.mlp_width,
            "norm_position": self.norm_position,
            "activation": self.activation,
            "pooler": self.pooler,
            "nsp": self.nsp,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _gelu(config: EncoderConfig, x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh" if config.activation == "gelu_tanh" else "none")


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; padding keys are hidden by ``key_padding_mask``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.q_proj = nn.Linear(config.n_embd, config.n_embd)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.config.n_head, self.config.head_dim
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        dropout = self.config.dropout if self.training else 0.0
        y = ops.attention(
            q, k, v, causal=False, dropout_p=dropout, backend=self.config.attention, key_padding_mask=key_padding_mask
        )  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(_gelu(self.config, self.c_fc(x)))  # (B, T, C)


class EncoderBlock(nn.Module):
    """Attention and MLP with residuals: ``ln_1``/``ln_2`` follow each add (post) or precede each branch (pre)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.checkpoint = False
        """Recompute this block's activations in the backward (set by
        :func:`lmforge.parallel.apply_activation_checkpointing`)."""

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, key_padding_mask, use_reentrant=False)
        return self._forward(x, key_padding_mask)

    def _forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln_1(x), key_padding_mask))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, key_padding_mask)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class MaskedLMHead(nn.Module):
    """dense + GELU + LayerNorm, then logits through the (tied) word embeddings plus an output-only bias."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def transform(self, h: Tensor) -> Tensor:
        """(..., C) -> (..., C): what the decoder reads."""
        return self.ln(_gelu(self.config, self.dense(h)))


class EncoderLoss(NamedTuple):
    """The pretraining losses of a batch (``reduction`` "sum" or "mean" applied to each)."""

    mlm: Tensor
    """Masked-LM cross-entropy over the selected positions."""
    mlm_targets: Tensor
    """How many positions were selected (int64 scalar)."""
    mlm_correct: Tensor
    """How many of them the argmax predicts (int64 scalar, no gradient)."""
    nsp: Tensor | None = None
    """Next-sentence cross-entropy over the batch's pairs, when next-sentence labels were given."""
    nsp_correct: Tensor | None = None
    """Pairs whose argmax is right (int64 scalar, no gradient)."""


class Encoder(nn.Module):
    """Bidirectional Transformer encoder with pooler, masked-LM and next-sentence heads."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.max_positions, config.n_embd)
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd) if config.type_vocab_size else None
        self.ln_emb = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.norm_eps) if config.norm_position == "pre" else None
        self.pooler = nn.Linear(config.n_embd, config.n_embd) if config.pooler else None
        self.mlm_head = MaskedLMHead(config)
        self.nsp_head = nn.Linear(config.n_embd, 2) if config.nsp else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, 0.02) for linear and embedding weights, zero biases, unit LayerNorms.

        In place, so a model built on the meta device and materialised with ``to_empty`` (as
        :func:`lmforge.parallel.materialize` does) gets the same initialisation as one built directly.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        nn.init.zeros_(self.mlm_head.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (the decoder is the word embedding, counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def hidden_states(
        self, idx: Tensor, token_type_ids: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """Final hidden states (B, T, C) for token ids idx (B, T).

        token_type_ids (B, T): segment A (0) or B (1) of a pair, default all 0 (ignored without token
        types). key_padding_mask (B, T; True = real token) hides padding keys from every query; padding
        positions still get hidden states, which the heads never read.
        """
        B, T = idx.shape
        if T > self.config.max_positions:
            raise UserError(f"sequence of {T} tokens is longer than max_positions={self.config.max_positions}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        if self.wtt is not None:
            x = x + (self.wtt.weight[0] if token_type_ids is None else self.wtt(token_type_ids))
        x = self.drop(self.ln_emb(x))
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x if self.ln_f is None else self.ln_f(x)

    def pooled(self, h: Tensor) -> Tensor:
        """The pooler's output (B, C): dense + tanh on the first ([CLS]) position of h (B, T, C)."""
        if self.pooler is None:
            raise UserError("model config: pooler=False: this encoder has no pooled output")
        return torch.tanh(self.pooler(h[:, 0]))

    def mlm_logits(self, h: Tensor) -> Tensor:
        """Masked-LM logits (..., V) of hidden states (..., C)."""
        return F.linear(self.mlm_head.transform(h), self.wte.weight, self.mlm_head.bias)

    def forward(
        self,
        idx: Tensor,
        token_type_ids: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        check_targets: bool = True,
        output: Literal["logits", "hidden", "pooled", "nsp_logits"] = "logits",
    ) -> Tensor | EncoderLoss:
        """The one entry point: the losses when ``labels`` are given, else logits (or other outputs).

        - ``labels`` (B, T): the original token at each selected position, ``ignore_index`` elsewhere. The
          selected rows of the hidden states are gathered, transformed and scored against the tied
          embeddings through :func:`lmforge.ops.linear_cross_entropy` (the bias as one more input column),
          so the (tokens, vocab) logits are never built. ``next_sentence_label`` (B,): 0 when segment B
          follows A, 1 when it is random (BERT's convention); needs ``nsp: true``. Returns an
          :class:`EncoderLoss`. Gathering reads the selection's size back (a device sync on CUDA).
        - no labels: masked-LM logits (B, T, V); ``output="hidden"`` the hidden states (B, T, C),
          ``"pooled"`` the pooler's output (B, C), ``"nsp_logits"`` the next-sentence logits (B, 2).
        """
        h = self.hidden_states(idx, token_type_ids, key_padding_mask)  # (B, T, C)
        if labels is None:
            if output == "hidden":
                return h
            if output == "pooled":
                return self.pooled(h)
            if output == "nsp_logits":
                return self._nsp_logits(h)
            return self.mlm_logits(h)
        selected = labels != ignore_index  # (B, T)
        rows = self.mlm_head.transform(h[selected])  # (M, C): only the selected positions
        targets = labels[selected]  # (M,)
        ones = rows.new_ones(rows.size(0), 1)
        weight = torch.cat((self.wte.weight, self.mlm_head.bias[:, None].to(self.wte.weight.dtype)), dim=1)  # (V, C+1)
        mlm = ops.linear_cross_entropy(
            torch.cat((rows, ones), dim=1), weight, targets, ignore_index=ignore_index,
            backend=self.config.loss, reduction=reduction, check_targets=check_targets,
        )  # fmt: skip
        with torch.no_grad():  # (M, V) logits of the selected rows only, for the accuracy
            logits = F.linear(rows.detach(), self.wte.weight, self.mlm_head.bias)
            correct = (logits.argmax(-1) == targets).sum()
        if next_sentence_label is None:
            return EncoderLoss(mlm, targets.new_tensor(targets.numel()), correct)
        nsp_logits = self._nsp_logits(h)  # (B, 2)
        nsp = F.cross_entropy(nsp_logits.float(), next_sentence_label, reduction=reduction)
        nsp_correct = (nsp_logits.detach().argmax(-1) == next_sentence_label).sum()
        return EncoderLoss(mlm, targets.new_tensor(targets.numel()), correct, nsp, nsp_correct)

    def _nsp_logits(self, h: Tensor) -> Tensor:
        if self.nsp_head is None:
            raise UserError("model config: nsp=False: this encoder has no next-sentence head (set nsp: true)")
        return self.nsp_head(self.pooled(h))  # (B, 2)
