"""Attributions of HuggingFace transformers from token ids: :func:`attribute_tokens`.

Needs only torch at import; the model is any HuggingFace ``PreTrainedModel`` (``pip install lrpfunc[transformers]``)
that accepts ``inputs_embeds`` and returns ``logits``: causal language models (GPT-2, Llama, Qwen2, Mistral, Gemma)
and sequence classifiers (BERT). The relevance of a token is the relevance of its input embedding summed over the
hidden dimension; a model with learned position embeddings (BERT, GPT-2) adds them to the token embeddings inside,
and the relevance they take is reported separately.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._attribute import attribute, attribute_with_params
from ._composite import Composite
from ._functionalize import evaluate
from ._model import ModelInfo
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = ["TokenAttribution", "attribute_tokens", "FromEmbeddings"]


@dataclass(frozen=True)
class TokenAttribution:
    """The attribution of one or several target logits to the input tokens.

    Shapes: ``B`` sequences of ``L`` tokens with hidden size ``H``; a leading ``K`` when ``K`` targets were asked for.

    Attributes:
        tokens: ``(K, B, L)`` or ``(B, L)``: the relevance of each token, its embedding's relevance summed over ``H``.
        embeddings: ``(K, B, L, H)`` or ``(B, L, H)``: the relevance of the input embeddings.
        positions: ``(K, B, L)`` or ``(B, L)``: the relevance taken by learned position embeddings at each position;
            ``None`` for a model without them (rotary positions) or when not asked for.
        logits: The model's logits, ``(B, L, V)`` for a language model, ``(B, C)`` for a classifier.
        target: ``(K, B)`` or ``(B,)``: the target logits; each attribution starts from its logit's value (the LRP
            convention), so ``tokens`` sums to about ``target`` where the rules conserve (a negative logit flips the
            sign of every relevance: positive relevance always means "towards this logit's value").
    """

    tokens: Tensor
    embeddings: Tensor
    positions: Tensor | None
    logits: Tensor
    target: Tensor


class FromEmbeddings(nn.Module):
    """``model(inputs_embeds=..., attention_mask=...).logits`` as a module of the embeddings (what is attributed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        signature = inspect.signature(model.forward)
        self.no_cache = "use_cache" in signature.parameters

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.no_cache:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def _position_modules(model: nn.Module) -> list[str]:
    """Names of the learned position embeddings (``nn.Embedding`` named ``*position*`` or ``wpe``)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        and ("position" in name.rsplit(".", 1)[-1] or name.rsplit(".", 1)[-1] == "wpe")
    ]


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"attribute_tokens: model must be a torch.nn.Module (a HuggingFace model), got {type(model).__name__}"
        )
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Module):
        raise TypeError(
            f"attribute_tokens: {type(model).__name__} has no get_input_embeddings(); give a HuggingFace model that "
            f"takes inputs_embeds, or use lrpfunc.attribute on the embeddings directly"
        )
    return embedding


def attribute_tokens(
    model: nn.Module,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] | Canonizer = (),
    *,
    positions: bool = True,
) -> Callable[..., TokenAttribution]:
    """Attribute a transformer's logits to its input tokens.

    Definition:
        The model runs on the embeddings of ``input_ids``; the attribution (:func:`lrpfunc.attribute` with
        ``composite``, e.g. :func:`lrpfunc.composites.attnlrp`) starts at the target logit with its value and is
        propagated to the embeddings. Learned position embeddings ``p`` enter as ``e + p``; with the epsilon rule there
        they take ``p * R / s(e + p)``, reported in ``positions`` (computed as the relevance of that constant operand,
        :func:`lrpfunc.attribute_with_params`).

    Args:
        model: A HuggingFace model with ``get_input_embeddings()`` that accepts ``inputs_embeds`` and returns logits.
        composite: The rules; ``None`` gives the plain gradient w.r.t. the embeddings (times the target logit, like
            every attribution here).
        canonizers: Canonizers, as for :func:`lrpfunc.attribute`.
        positions: Report the relevance of learned position embeddings (costs the parameter relevance of every
            rule; ``False`` skips it).

    Returns:
        ``explain(input_ids, target=None, *, position=-1, attention_mask=None, params=None) -> TokenAttribution``.
        ``target``: class indices for a classifier, token ids for a language model: ``None`` (the argmax), an int, a
        ``(B,)`` tensor (one per sequence), or ``(K,)``/``(K, B)`` for ``K`` targets at once, computed from one
        forward pass (``vmap`` over the seeds). ``position``: for a language model, the position whose next-token
        logits are explained, an int or a ``(K,)`` tensor (one per target: every generated position at once).
        ``params``: the model's parameters by name (default: its own), so that the result is differentiable w.r.t.
        them like any attribution.

    Example:
        >>> explain = attribute_tokens(model, lrpfunc.composites.attnlrp())
        >>> result = explain(tokenizer("The capital of France is", return_tensors="pt").input_ids)
        >>> lrpfunc.text.save_token_heatmap(tokenizer.convert_ids_to_tokens(ids[0]), result.tokens[0], "map.png")
    """
    embedding = _check_model(model)
    wrapper = FromEmbeddings(model)
    embedding_names = {id(t): name for name, t in model.named_parameters()}
    embedding_weight = embedding_names.get(id(getattr(embedding, "weight", None)))
    embedding_info = ModelInfo(embedding)
    position_names = [f"model.{name}" for name in _position_modules(model)] if positions else []
    with_params = attribute_with_params(wrapper, composite, canonizers)
    plain = attribute(wrapper, composite, canonizers)

    def explain(
        input_ids: Tensor,
        target: int | Tensor | None = None,
        *,
        targets: Tensor | None = None,
        position: int | Tensor = -1,
        attention_mask: Tensor | None = None,
        params: Mapping[str, Tensor] | None = None,
    ) -> TokenAttribution:
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"attribute_tokens: input_ids must be an integer tensor (B, L), got {got}")
        if target is not None and targets is not None:
            raise ValueError("attribute_tokens: give target (one attribution) or targets (several), not both")
        given: dict[str, Tensor] = dict(model.named_parameters()) if params is None else dict(params)
        local = (
            {"weight": given[embedding_weight]} if embedding_weight is not None and embedding_weight in given else {}
        )
        embeds = evaluate(embedding, local, input_ids, embedding_info)
        wrapped = {f"model.{name}": value for name, value in given.items()}
        x = (embeds,) if attention_mask is None else (embeds, attention_mask)
        with torch.no_grad():
            logits = evaluate(wrapper, wrapped, x)
        several = targets is not None or (isinstance(position, Tensor) and position.ndim == 1)
        seeds = _seeds(logits, targets if several else target, position, several)
        use_params = bool(position_names)

        def one(seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            if use_params:
                output, relevance, by_param = with_params(wrapped, x, seed)
            else:
                output, relevance = plain(wrapped, x, seed)
                by_param = {}
            value = (output * seed).flatten(1).sum(1)  # the target logit of each sequence
            embedded = relevance[0] * value.reshape(-1, 1, 1)  # start from the logit's value: relevance is linear in it
            taken = torch.zeros(embedded.shape[:-1], dtype=embedded.dtype, device=embedded.device)
            for name in position_names:
                if name in by_param:
                    taken = taken + by_param[name].sum(-1) * value.reshape(-1, 1)
            return embedded, taken, value

        if several:
            embedded, taken, value = torch.func.vmap(one)(seeds)
        else:
            embedded, taken, value = one(seeds[0])
        return TokenAttribution(
            tokens=embedded.sum(-1),
            embeddings=embedded,
            positions=taken if position_names else None,
            logits=logits,
            target=value,
        )

    return explain


def _seeds(logits: Tensor, target: int | Tensor | None, position: int | Tensor, several: bool) -> Tensor:
    """One-hot seeds ``(K, *logits.shape)``: ``K = 1`` for one target (``None``: the argmax; an int; a ``(B,)`` tensor),
    else one per row of ``target`` (``(K,)`` for every sequence alike, or ``(K, B)``) or per entry of ``position``."""
    batch = logits.shape[0]
    language = logits.ndim == 3
    positions = torch.as_tensor(position, device=logits.device).reshape(-1)
    if not language and (isinstance(position, Tensor) or position != -1):
        raise ValueError(
            "attribute_tokens: position is for language models (logits (B, L, V)); this model gives (B, C)"
        )
    if target is None:
        count = positions.numel()
        # the argmax at each position, as tensors (no position read into Python: the function traces)
        chosen = logits[:, positions].argmax(-1).T if language else logits.argmax(-1)[None]
    else:
        chosen = torch.as_tensor(target, device=logits.device)
        expected = "(K,) or (K, B)" if several else "an int or (B,)"
        if several:
            chosen = chosen[:, None].expand(-1, batch) if chosen.ndim == 1 else chosen
        else:
            chosen = chosen.expand(batch)[None] if chosen.ndim == 0 else chosen[None]
        if chosen.ndim != 2 or chosen.shape[1] != batch:
            raise ValueError(
                f"attribute_tokens: target{'s' if several else ''} must be {expected} with B = {batch}, got shape "
                f"{tuple(torch.as_tensor(target).shape)}"
            )
        count = chosen.shape[0]
    if language and positions.numel() not in (1, count):
        raise ValueError(
            f"attribute_tokens: position must be an int or one per target ({count}), got {positions.numel()}"
        )
    positions = positions.expand(count) if positions.numel() == 1 else positions
    seeds = torch.zeros((count, *logits.shape), dtype=logits.dtype, device=logits.device)
    # one index_put with index tensors (a 0-d tensor index would be read into Python)
    ks = torch.arange(count, device=logits.device)[:, None].expand(count, batch)
    rows = torch.arange(batch, device=logits.device)[None].expand(count, batch)
    index = (ks, rows, positions[:, None].expand(count, batch), chosen) if language else (ks, rows, chosen)
    return seeds.index_put(index, torch.ones((), dtype=logits.dtype, device=logits.device))
