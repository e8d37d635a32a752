"""A decoder-only Transformer, configured by one validated dataclass.

One module covers the GPT-2 family (learned positions, LayerNorm, GELU, biases, tied
embeddings) and the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases),
with Qwen2's biases on q, k and v alone and Mistral's sliding-window attention.
Attention and the loss go through :mod:`lmforge.ops`, the single dispatch point where the
Triton kernels plug in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lmforge import ops
from lmforge.errors import UserError

Backend = Literal["auto", "triton", "torch"]
BACKEND_CHOICES = (("attention", ("auto", "triton", "torch")), ("loss", ("auto", "triton", "torch")))


def config_error(config: object, key: str, why: str) -> UserError:
    """The error of a model config's (a :class:`GPTConfig`'s, an encoder's) field: its key, its value, why."""
    return UserError(f"model config: {key}={getattr(config, key)!r} {why}")


def check_positive_ints(config: object, keys: tuple[str, ...]) -> None:
    """Each of the config's fields ``keys`` is an integer of at least 1."""
    for key in keys:
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
            raise config_error(config, key, "must be a positive integer")


def check_choices(config: object, choices: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """Each field of ``choices`` holds one of its allowed values, then the attention and loss backends (one of
    theirs, and available here: :func:`lmforge.ops.check_backend`)."""
    for key, allowed in (*choices, *BACKEND_CHOICES):
        if getattr(config, key) not in allowed:
            raise config_error(config, key, f"is not one of {', '.join(allowed)}")
    ops.check_backend("attention", config.attention)
    ops.check_backend("loss", config.loss)


@dataclass
class GPTConfig:
    """Shape and options of a :class:`GPT`; every field is checked on construction."""

    vocab_size: int = 384
    """Rows of the embedding table; at least the tokenizer's vocabulary (pad up to a multiple of 64 for speed)."""
    block_size: int = 256
    """Context length in tokens."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads: equal to n_head for MHA (the default), a divisor of it for GQA, 1 for MQA."""
    n_embd: int = 256
    """Width of the residual stream; a multiple of n_head."""
    mlp_hidden: int | None = None
    """MLP hidden width; default 4 * n_embd (GELU) or 8/3 * n_embd rounded up to 64 (SwiGLU, as Llama)."""
    pos_encoding: Literal["learned", "rope"] = "learned"
    """Learned absolute position embeddings (GPT-2) or rotary embeddings (Llama)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation before attention, before the MLP and at the end."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP type: GELU (tanh approximation, as GPT-2) or SwiGLU (as Llama)."""
    bias: bool = True
    """Biases in linear layers and LayerNorm."""
    qkv_bias: bool | None = None
    """Biases in the q, k and v projections; None: as ``bias`` (Qwen2 has them where nothing else does)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    sliding_window: int | None = None
    """Sliding-window attention (Mistral): each query sees at most this many keys, itself included; None: all
    earlier keys."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""
    attention: Backend = "auto"
    """Attention implementation: auto (best available), triton (lmforge kernel) or torch (SDPA)."""
    loss: Backend = "auto"
    """Loss implementation: auto (best available), triton (fused linear + cross-entropy) or torch."""

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> UserError:
            return config_error(self, key, why)

        check_positive_ints(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            raise bad("n_kv_head", f"must divide n_head={self.n_head} (n_head for MHA, 1 for MQA)")
        if self.n_embd % self.n_head:
            raise bad("n_embd", f"must be a multiple of n_head={self.n_head}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise bad("n_embd", f"gives an odd head dim {self.head_dim}; RoPE needs an even one")
        if self.mlp_width < 1:
            raise bad("mlp_hidden", "must be a positive integer")
        if self.qkv_bias not in (None, True, False):
            raise bad("qkv_bias", "must be true, false or null (as bias)")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window < 1
        ):
            raise bad("sliding_window", "must be a positive integer or null (no window)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        check_choices(self, (("pos_encoding", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                             ("mlp", ("gelu", "swiglu"))))  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads after defaults: n_kv_head, or n_head when unset."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def has_qkv_bias(self) -> bool:
        """Whether the q, k and v projections have biases, after defaults: qkv_bias, or bias when unset."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def mlp_width(self) -> int:
        """MLP hidden width after defaults."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def shape(self) -> dict:
        """The fields that fix the weights' shapes and meaning, defaults resolved."""
        return {
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_kv_head": self.kv_heads,
            "n_embd": self.n_embd,
            "mlp_hidden": self.mlp_width,
            "pos_encoding": self.pos_encoding,
            "norm": self.norm,
            "mlp": self.mlp,
            "bias": self.bias,
            "qkv_bias": self.has_qkv_bias,  # resolved: a saved config without the key reads as before
            "tie_embeddings": self.tie_embeddings,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (the 'rotate half' layout used by Llama)."""

    def __init__(self, head_dim: int, block_size: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.block_size, self.theta = head_dim, block_size, theta
        self.register_buffer("cos", torch.empty(block_size, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(block_size, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the tables in place, on the buffers' device (after a meta-device build too)."""
        if self.cos.is_meta:
            return
        device = self.cos.device
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        )
        angles = torch.outer(torch.arange(self.block_size, dtype=torch.float32, device=device), inv_freq)  # (T, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())

    def forward(self, x: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Rotate x of shape (B, nh, T, hs); positions 0..T-1, or position_ids (B, T)."""
        if position_ids is None:
            T = x.size(-2)
            cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        else:
            cos, sin = self.cos[position_ids].unsqueeze(1).to(x.dtype), self.sin[position_ids].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated.

    ``k`` and ``v`` are (n_layer, B, n_kv_head, max_len, head_dim) in the model's dtype; ``mask``
    (B, max_len) marks the slots that hold real tokens (False for left padding); ``length`` is how
    many slots are filled. Build one with :meth:`GPT.new_kv_cache` and pass it to
    ``GPT.forward(idx, kv_cache=cache)``, which writes the new keys/values and advances ``length``.
    ``max_len`` may exceed ``block_size`` (left padding takes slots), but no token's position may.
    With a ``sliding_window`` (``window``), a token sees only the last ``window`` slots, itself included, as
    the forward without a cache does.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        max_len = config.block_size if max_len is None else max_len
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache: batch_size={batch_size} and max_len={max_len} must be positive")
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self.batch_size = batch_size
        self.window = config.sliding_window
        self._start = 0  # slots [_start, _end) are being written by the current forward
        self._end = 0
        self._attn_mask: Tensor | None = None

    def reset(self) -> None:
        """Empty the cache (the buffers are reused)."""
        self.mask.zero_()
        self.length = 0

    def _begin(self, key_padding_mask: Tensor | None, T: int) -> Tensor:
        """Reserve T slots for a forward; return the positions' real-token mask (B, end)."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {T} new tokens exceed its max_len={self.max_len}"
            )
        self.mask[:, start:end] = True if key_padding_mask is None else key_padding_mask.bool()
        real = self.mask[:, :end]
        slots = torch.arange(end, device=self.mask.device)
        causal = slots[None, :] <= slots[start:end, None]  # (T, end): query at slot start+i sees slots <= it
        if self.window is not None:  # ... and only the last `window` of them, itself included
            causal &= slots[None, :] > slots[start:end, None] - self.window
        attn_mask = real[:, None, None, :] & causal  # (B, 1, T, end)
        self._start, self._end, self._attn_mask = start, end, attn_mask
        return real

    def _update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a layer's new keys/values (B, nkv, T, hs); return all of its keys/values so far."""
        self.k[layer, :, :, self._start : self._end] = k
        self.v[layer, :, :, self._start : self._end] = v
        return self.k[layer, :, :, : self._end], self.v[layer, :, :, : self._end]

    def _finish(self) -> None:
        self.length = self._end
        self._attn_mask = None


class _LayerCache:
    """One layer's view of a :class:`KVCache`, handed to its attention."""

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of q (B, nh, T, hs) over the cached prefix and the new k, v (B, nkv, T, hs)."""
        k_all, v_all = self.cache._update(self.layer, k, v)
        mask = self.cache._attn_mask
        has_key = mask.any(dim=-1, keepdim=True)  # a padding query may see nothing: let it see all, then zero it
        y = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask | ~has_key, enable_gqa=k_all.size(1) != q.size(1)
        )
        return y * has_key.to(y.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        hs, nh, nkv = config.head_dim, config.n_head, config.kv_heads
        self.q_proj = nn.Linear(config.n_embd, nh * hs, bias=config.has_qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, nkv * hs, bias=config.has_qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, nkv * hs, bias=config.has_qkv_bias)
        self.c_proj = nn.Linear(nh * hs, config.n_embd, bias=config.bias)
        self.rope = RotaryEmbedding(hs, config.block_size, config.rope_theta) if config.pos_encoding == "rope" else None

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: _LayerCache | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        hs, nh, nkv = self.config.head_dim, self.config.n_head, self.config.kv_heads
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rope is not None:
            q, k = self.rope(q, position_ids), self.rope(k, position_ids)
        if kv_cache is not None:  # decoding: SDPA with an explicit mask over the cached keys, any device
            y = kv_cache.attend(q, k, v)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, nh * hs))
        dropout = self.config.dropout if self.training else 0.0
        y = ops.attention(
            q, k, v, causal=True, dropout_p=dropout, backend=self.config.attention,
            key_padding_mask=key_padding_mask, segment_ids=segment_ids, window=self.config.sliding_window,
        )  # (B, nh, T, hs)  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.gate = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias) if self.swiglu else None
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)
        self.checkpoint = False
        """Recompute this block's activations in the backward instead of keeping them (set by
        :func:`lmforge.parallel.apply_activation_checkpointing`); the weights and their names do not change."""

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: _LayerCache | None = None,
    ) -> Tensor:
        if self.checkpoint and self.training and kv_cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, key_padding_mask, segment_ids, position_ids, None, use_reentrant=False
            )
        return self._forward(x, key_padding_mask, segment_ids, position_ids, kv_cache)

    def _forward(self, x, key_padding_mask, segment_ids, position_ids, kv_cache) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), key_padding_mask, segment_ids, position_ids, kv_cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Decoder-only Transformer language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer).

        In place, so a model built on the meta device and materialised with ``to_empty`` (as
        :func:`lmforge.parallel.materialize` does, sharded or not) gets the same initialisation as one
        built directly; the rotary tables are recomputed too.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count, shared (tied) tensors counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model (its device and dtype); max_len defaults to block_size."""
        return KVCache(self.config, batch_size, max_len, device=self.wte.weight.device, dtype=self.wte.weight.dtype)

    def hidden_states(
        self,
        idx: Tensor,
        key_padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Final normalised hidden states (B, T, C) for token ids idx (B, T).

        key_padding_mask (B, T; True = real token) hides padding from attention; segment_ids (B, T)
        keeps packed documents from attending to each other; position_ids (B, T) restart the
        positions of each packed document (default 0..T-1).

        With a kv_cache (decoding), idx holds the tokens after the cached ones: their keys/values are
        stored and they attend to the cached prefix and, causally, to each other. key_padding_mask
        then marks the new tokens that are real (False for left padding); position_ids default to
        each token's index among its row's real tokens, so left-padded rows get the positions they
        would have alone.
        """
        if kv_cache is not None:
            return self._cached_hidden_states(idx, kv_cache, key_padding_mask, segment_ids, position_ids)
        B, T = idx.shape
        if T > self.config.block_size:
            raise UserError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device) if position_ids is None else position_ids)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, key_padding_mask, segment_ids, position_ids)
        return self.ln_f(x)

    def _cached_hidden_states(
        self,
        idx: Tensor,
        kv_cache: KVCache,
        key_padding_mask: Tensor | None,
        segment_ids: Tensor | None,
        position_ids: Tensor | None,
    ) -> Tensor:
        B, T = idx.shape
        if segment_ids is not None:
            raise ValueError("segment_ids (packed documents) cannot be used with a kv_cache")
        if B != kv_cache.batch_size:
            raise ValueError(f"batch of {B} rows given to a KV cache built for {kv_cache.batch_size}")
        start = kv_cache.length
        real = kv_cache._begin(key_padding_mask, T)  # (B, start + T)
        if position_ids is None:
            position_ids = (real.long().cumsum(dim=-1) - 1).clamp(min=0)[:, start:]
        if T and int(position_ids.max()) >= self.config.block_size:
            raise UserError(
                f"position {int(position_ids.max())} is beyond block_size={self.config.block_size}: "
                f"the model has no position for more than {self.config.block_size} tokens"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None, None, position_ids, _LayerCache(kv_cache, i))
        kv_cache._finish()
        return self.ln_f(x)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        key_padding_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        output: Literal["logits", "hidden"] = "logits",
        check_targets: bool = True,
    ) -> Tensor:
        """The one entry point: the loss when ``targets`` are given, else logits (or hidden states).

        - ``targets`` (B, T): next-token cross-entropy over the targets that are not ``ignore_index``,
          ``reduction`` "mean" or "sum", through the loss dispatch (which may never build the logits).
          A target outside [0, vocab_size) raises ``ValueError``; ``check_targets=False`` skips that
          check (one read back of the targets, a device sync on CUDA) for callers that checked them.
        - no targets: logits (B, T, vocab_size), or with ``output="hidden"`` the final normalised hidden
          states (B, T, n_embd) that task heads (classification) read.

        Everything a training step computes goes through here, so ``torch.compile``, DDP and FSDP2 (whose
        hooks wrap ``forward``) see the whole step. Masks, positions and ``kv_cache`` are described in
        :meth:`hidden_states`.
        """
        h = self.hidden_states(idx, key_padding_mask, segment_ids, position_ids, kv_cache)
        if targets is not None:
            merged = getattr(self.lm_head, "merged_weight", None)  # a LoRA head: W + scaling * B @ A
            weight = merged() if merged is not None else self.lm_head.weight
            return ops.linear_cross_entropy(
                h.flatten(0, 1),
                weight,
                targets.flatten(),
                ignore_index=ignore_index,
                backend=self.config.loss,
                reduction=reduction,
                check_targets=check_targets,
            )
        if output == "hidden":
            return h
        return self.lm_head(h)

    def loss(self, idx: Tensor, targets: Tensor, ignore_index: int = -100, **kwargs) -> Tensor:
        """``self(idx, targets, ...)``: kept for callers of earlier versions; goes through ``forward``."""
        return self(idx, targets, ignore_index=ignore_index, **kwargs)
