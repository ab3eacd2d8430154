"""Fused attention written out as its operations, for :func:`lrpfunc.rules.attention`.

The tracer runs these decompositions in place of the fused functions, so that each product, scaling, mask and
softmax inside is recorded as an operation of its own and gets its own rule. The order of operations is
HuggingFace's eager attention (``softmax(q @ k^T * scale + mask) @ v``), so that eager, ``sdpa`` and
``nn.MultiheadAttention`` models give the same relevance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["decompose", "scaled_dot_product_attention", "multi_head_attention_forward"]


def _mask_scores(scores: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """:func:`torch.nn.functional.scaled_dot_product_attention` as matmul, scale, mask, softmax, matmul."""
    length, source = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        groups = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    # a query that may attend to nothing (a padding token's row) gets zeros, as torch's own attention gives it: a
    # softmax over -inf alone would be NaN, and NaN times the zero weight of a padded key would reach every query.
    # Decided from the masks (constants, no scores read): such rows are unmasked, and their outputs set to zero
    causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril() if is_causal else None
    empty = _empty_rows(causal, attn_mask)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if causal is not None:
        scores = scores.masked_fill(~causal if empty is None else ~causal & ~empty, float("-inf"))
    if attn_mask is not None and empty is not None:
        attn_mask = attn_mask | empty if attn_mask.dtype == torch.bool else attn_mask.masked_fill(empty, 0.0)
    scores = _mask_scores(scores, attn_mask)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    output = torch.matmul(weights, value)
    return output if empty is None else output.masked_fill(empty, 0.0)


def _empty_rows(causal: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """Where a query may attend to no key (``(..., L, 1)``), from the causal and the given mask; ``None`` without
    masks."""
    allowed = causal
    if attn_mask is not None:
        given = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        allowed = given if allowed is None else allowed & given
    return None if allowed is None else ~allowed.any(-1, keepdim=True)


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`torch.nn.functional.multi_head_attention_forward` (``nn.MultiheadAttention``) as its operations.

    Supports what ``nn.MultiheadAttention`` uses by default: packed or separate projection weights, biases, boolean
    or additive ``attn_mask`` and ``key_padding_mask``, ``is_causal``, dropout, unbatched inputs, attention
    weights returned averaged or per head.

    Raises:
        NotImplementedError: ``bias_k``/``bias_v``, ``add_zero_attn`` or ``static_k``/``static_v``.
    """
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise NotImplementedError(
            "attention: nn.MultiheadAttention with add_bias_kv, add_zero_attn or static keys/values is not decomposed; "
            "give that module a rule of its own, or attribute without rules.attention()"
        )
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    length, batch, embed_dim = query.shape
    source = key.shape[0]
    head_dim = embed_dim // num_heads
    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        assert in_proj_weight is not None
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q)  # type: ignore[arg-type]
    k = F.linear(key, w_k, b_k)  # type: ignore[arg-type]
    v = F.linear(value, w_v, b_v)  # type: ignore[arg-type]

    def heads(x: Tensor, count: int) -> Tensor:  # (L, N, E) -> (N, H, L, D)
        return x.reshape(count, batch, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads(q, length), heads(k, source), heads(v, source)
    mask = _combined_mask(attn_mask, key_padding_mask, batch, num_heads, length, source, query.dtype, is_causal)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    scores = _mask_scores(scores, mask)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0 and training:
        weights = F.dropout(weights, dropout_p)
    attended = torch.matmul(weights, v)  # (N, H, L, D)
    attended = attended.permute(2, 0, 1, 3).reshape(length, batch, embed_dim)
    output = F.linear(attended, out_proj_weight, out_proj_bias)
    returned = weights.mean(dim=1) if average_attn_weights else weights
    if unbatched:
        output, returned = output.squeeze(1), returned.squeeze(0)
    return output, (returned if need_weights else None)


def _combined_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    num_heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
    is_causal: bool,
) -> Tensor | None:
    """One additive mask of shape broadcastable to ``(N, H, L, S)``, as ``nn.MultiheadAttention`` combines them."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    combined: Tensor | None = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        mask = additive(attn_mask)
        combined = mask.reshape(batch, num_heads, length, source) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(batch, 1, 1, source)
        combined = padding if combined is None else combined + padding
    return combined


_DECOMPOSITIONS: Mapping[Any, Callable[..., Any]] = {
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.multi_head_attention_forward: multi_head_attention_forward,
}


def decompose(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Run the decomposition of ``func`` on its arguments (inside the tracer, so that each operation is recorded)."""
    decomposition = _DECOMPOSITIONS.get(func)
    if decomposition is None:
        raise NotImplementedError(
            f"attention: no decomposition of {getattr(func, '__name__', func)}; it knows "
            f"{', '.join(f.__name__ for f in _DECOMPOSITIONS)}"
        )
    return decomposition(*args, **kwargs)
