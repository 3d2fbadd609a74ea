"""A lean forward pass for Llama-architecture models, used by the decode loop instead of HF's.

Why: at decode time a step is one token per row, so the matmuls are small and the per-op
overhead of the general HF forward (mask building, eager RMSNorm in five ops, repeat_kv copies,
attention-interface dispatch) is a large share of a step on CPU. This forward reads the *same*
modules and weights (so LoRA adapters, training updates and ``disable_adapter`` apply as usual;
projections are called as modules) and only inlines the glue: fused ``rms_norm``, rotary,
one grouped-query SDPA call, and an in-place KV append. In fp32 it must give the logits the HF
forward gives (tests check the recorded logprobs against a plain HF forward within 1e-4).

With ``dtype=torch.bfloat16`` only the projection and output matmuls run in bf16, against bf16
copies of the frozen weights made once (and again whenever a weight is changed in place, e.g. by
a full fine-tune's optimizer step: ``Tensor._version`` tells). The residual stream, norms,
rotary, attention, the KV cache and LoRA adapters stay fp32, so the error is one bf16 rounding of
each matmul's inputs; the logprobs recorded are those of this bf16 forward, i.e. of the
distribution the tokens were really sampled from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .adapters import base_model
from .multi_lora import RowAdapters, add_deltas

SUPPORTED = {"LlamaForCausalLM"}


def supports(model: Any) -> bool:
    """True for plain Llama models (no sliding window, default attention and MLP shapes)."""
    lm = base_model(model)
    config = getattr(lm, "config", None)
    return (
        type(lm).__name__ in SUPPORTED
        and getattr(config, "hidden_act", None) == "silu"
        and not getattr(config, "sliding_window", None)
        and "dynamic" not in str(getattr(lm.model.rotary_emb, "rope_type", "dynamic"))
    )


class FastLlama:
    """``forward(ids, positions, mask, cache) -> last-position logits`` for a Llama model."""

    def __init__(self, model: Any, dtype: torch.dtype = torch.float32):
        lm = base_model(model)
        self.dtype = dtype
        self._low: dict[int, tuple[int, torch.Tensor]] = {}  # id(weight) -> (version, bf16 copy)
        self.embed = lm.model.embed_tokens
        self.layers = lm.model.layers
        self.norm = lm.model.norm
        self.rotary = lm.model.rotary_emb
        self.lm_head = lm.lm_head
        config = lm.config
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self._cos = self._sin = torch.zeros(0)  # (N, D) rotary tables by position, grown on demand
        self._rows: RowAdapters | None = None  # the forward in progress: each row's adapter

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor,
                needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, S, D) for these positions, looked up instead of recomputed per step.

        The table comes from the model's own rotary module, so values are bit-identical to HF's.
        ``needed`` bounds the positions from the host (the mask's width), so no step has to read
        ``positions.max()`` back from an accelerator.
        """
        if needed > self._cos.shape[0]:
            size = max(needed, 2 * self._cos.shape[0], 256)
            table_positions = torch.arange(size, device=positions.device)[None]
            cos, sin = self.rotary(x, table_positions)  # (1, N, D)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def _rms(self, x: torch.Tensor, module: Any) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), module.weight, self.eps)

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in ``self.dtype``, cast once and re-cast only after an in-place change."""
        if weight.dtype == self.dtype:
            return weight
        version = weight._version
        cached = self._low.get(id(weight))
        if cached is None or cached[0] != version:
            cached = (version, weight.detach().to(self.dtype))
            self._low[id(weight)] = cached
        return cached[1]

    def _project(self, module: Any, h: torch.Tensor) -> torch.Tensor:
        """``module(h)`` in fp32, with the (frozen) base matmul in ``self.dtype``.

        A peft LoRA layer adds its active adapters in fp32 as peft does; adapter variants
        (DoRA, ...) and anything else unknown run as the module itself, in fp32.
        """
        if self._rows is not None and _routable(module):  # per-row adapters (``multi_lora``)
            return add_deltas(module, h, self._base_out(module.base_layer, h), self._rows)
        if self.dtype == torch.float32:
            return module(h)
        base = getattr(module, "base_layer", module)
        lora = base is not module
        if not isinstance(base, torch.nn.Linear) or (lora and getattr(module, "lora_variant", None)):
            return module(h)
        out = self._base_out(base, h)
        if lora and not module.disable_adapters and not module.merged:
            for name in module.active_adapters:
                if name in module.lora_A:
                    a, b = module.lora_A[name], module.lora_B[name]
                    out = out + b(a(module.lora_dropout[name](h))) * module.scaling[name]
        return out

    def _base_out(self, base: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
        """The frozen linear's output in fp32, its matmul in ``self.dtype``."""
        if self.dtype == torch.float32:
            return F.linear(h, base.weight, base.bias)
        bias = None if base.bias is None else self._weight(base.bias)
        return F.linear(h.to(self.dtype), self._weight(base.weight), bias).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: DynamicCache,
        adapters: RowAdapters | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: (B, S); mask: (B, T) over cached + new columns, 1 = real token.
        ``adapters``: each row's LoRA adapter (None: the active one for all rows).

        Returns float32 logits of the last position, (B, V).
        """
        self._rows = adapters
        try:
            return self._forward(input_ids, positions, mask, cache)
        finally:
            self._rows = None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        b, s = input_ids.shape
        t = mask.shape[1]
        x = self.embed(input_ids)  # (B, S, C)
        cos, sin = self._rotary(x, positions, t)  # (B, 1, S, D), broadcast over heads
        allowed = mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        if s > 1:  # prefill: causal within the new block; padded queries see themselves (no NaN rows)
            query_at = torch.arange(t - s, t, device=mask.device)[:, None]  # (S, 1)
            key_at = torch.arange(t, device=mask.device)[None, :]  # (1, T)
            allowed = (allowed & (key_at <= query_at)) | (key_at == query_at)  # (B, 1, S, T)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._rms(x, layer.input_layernorm)
            q = self._project(attn.q_proj, h).view(b, s, self.n_heads, self.head_dim)
            k = self._project(attn.k_proj, h).view(b, s, self.n_kv, self.head_dim)
            v = self._project(attn.v_proj, h).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
            qk = _rotate(torch.cat([q, k], dim=2).transpose(1, 2), cos, sin)  # (B, H+Hkv, S, D)
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
            keys, values = cache.update(k, v, i)  # (B, Hkv, T, D)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=allowed, scale=attn.scaling, enable_gqa=True
            )  # (B, H, S, D)
            x = x + self._project(attn.o_proj, out.transpose(1, 2).reshape(b, s, -1))
            h = self._rms(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            gate, up = self._project(mlp.gate_proj, h), self._project(mlp.up_proj, h)
            x = x + self._project(mlp.down_proj, F.silu(gate) * up)
        x = self._rms(x[:, -1], self.norm)  # (B, C): only the last position is ever sampled from
        return self._project(self.lm_head, x).float()  # (B, V)


def _routable(module: Any) -> bool:
    """A plain, active peft LoRA linear: its adapters can be applied row by row."""
    base = getattr(module, "base_layer", None)
    if base is None or module.disable_adapters or module.merged:
        return False
    if getattr(module, "lora_variant", None):
        raise ValueError("per-row adapters support plain LoRA only, not DoRA or other variants")
    return isinstance(base, torch.nn.Linear)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the HF (rotate-half) layout. x: (B, H, S, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
