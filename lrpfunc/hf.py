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
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from . import composites as _composites
from ._attribute import attribute, attribute_with_params, source_relevance
from ._composite import Composite, sources_of
from ._functionalize import evaluate
from ._model import ModelInfo
from .canonizers import Canonizer

Tensor = torch.Tensor

__all__ = ["TokenAttribution", "GenerationAttribution", "attribute_tokens", "attribute_generation", "FromEmbeddings",
           "recompute_layers"]


@dataclass(frozen=True)
class TokenAttribution:
    """The attribution of one or several target logits to the input tokens.

    Shapes: ``B`` sequences of ``L`` tokens with hidden size ``H``; a leading ``K`` when ``K`` targets were asked for.

    Attributes:
        tokens: ``(K, B, L)`` or ``(B, L)``: the relevance of each token, its embedding's relevance summed over ``H``.
        embeddings: ``(K, B, L, H)`` or ``(B, L, H)``: the relevance of the input embeddings.
        positions: ``(K, B, L)`` or ``(B, L)``: the relevance taken by learned position embeddings at each position,
            or by the ``cos`` and ``sin`` tables of rotary position embeddings when the composite makes them inputs
            (``attnlrp(rotary_positions=True)``, PA-LRP); ``None`` for a model with neither or when not asked for.
        logits: The model's logits, ``(B, L, V)`` for a language model, ``(B, C)`` for a classifier.
        target: ``(K, B)`` or ``(B,)``: the target logits (minus the contrast's logits where a contrast was given);
            each attribution starts from its logit's value (:func:`lrpfunc.from_logit`'s convention), so ``tokens``
            plus ``positions`` plus ``additive`` sums to about ``target`` where the rules conserve (a negative logit
            flips the sign of every relevance: positive relevance always means "towards this logit's value").
        additive: The relevance taken by the model's other embedding tables, by module name: token-type (segment)
            embeddings added to the token embeddings (BERT, RoBERTa), ``(K, B, L)`` or ``(B, L)``; a table whose
            output is not one vector per token (a relative position bias added to attention scores) per sequence,
            ``(K, B)`` or ``(B,)``. Empty when there are none or when not asked for.
        decoder_tokens, decoder_embeddings, decoder_positions: For an encoder-decoder model (T5, BART, Whisper), the
            relevance of the decoder's input tokens (``decoder_input_ids``, length ``M``: ``(K, B, M)`` or
            ``(B, M)``), of their embeddings and of the decoder's learned position embeddings; ``tokens``,
            ``embeddings`` and ``positions`` are then the encoder's. ``None`` for other models. For a speech model
            (Whisper: the first argument is ``input_features`` ``(B, n_mels, T)``), ``embeddings`` is the relevance of
            each feature, ``(B, n_mels, T)``, ``tokens`` that of each frame ``(B, T)`` (summed over the mel bins), and
            ``positions`` that of the encoder's ``S`` positions after its convolutions, ``(B, S)``.
    """

    tokens: Tensor
    embeddings: Tensor
    positions: Tensor | None
    logits: Tensor
    target: Tensor
    additive: dict[str, Tensor] = field(default_factory=dict)
    decoder_tokens: Tensor | None = None
    decoder_embeddings: Tensor | None = None
    decoder_positions: Tensor | None = None


class FromEmbeddings(nn.Module):
    """``model(inputs_embeds=..., attention_mask=...).logits`` as a module of the embeddings (what is attributed); for
    an encoder-decoder, ``model(inputs_embeds=..., attention_mask=..., decoder_inputs_embeds=...).logits``; for a
    speech encoder-decoder (Whisper), ``input_features`` in place of ``inputs_embeds``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.no_cache = _takes_use_cache(model)
        self.encoder_input = "input_features" if _is_speech(model) else "inputs_embeds"

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                decoder_inputs_embeds: Tensor | None = None) -> Tensor:
        kwargs: dict[str, Any] = {self.encoder_input: inputs_embeds}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if decoder_inputs_embeds is not None:  # an encoder-decoder: the decoder's input embeddings too
            kwargs["decoder_inputs_embeds"] = decoder_inputs_embeds
        if self.no_cache:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def _is_encoder_decoder(model: nn.Module) -> bool:
    """Whether the model has an encoder and a decoder (T5, BART, Whisper): it needs decoder inputs."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _is_speech(model: nn.Module) -> bool:
    """Whether the model is an encoder-decoder whose encoder reads features, not tokens (Whisper's log-mel
    spectrogram, ``input_features`` of shape ``(B, n_mels, frames)``)."""
    return _is_encoder_decoder(model) and getattr(model, "main_input_name", "input_ids") == "input_features"


def _check_features(where: str, features: Any) -> None:
    if not isinstance(features, Tensor) or features.ndim != 3 or not features.is_floating_point():
        got = (f"{tuple(features.shape)} {features.dtype}" if isinstance(features, Tensor)
               else type(features).__name__)
        raise ValueError(
            f"{where}: this model's encoder reads input_features: give a float tensor (B, n_mels, frames) as the "
            f"first argument, got {got}"
        )


def _check_decoder_ids(where: str, model: nn.Module, decoder_input_ids: Any, batch: int) -> None:
    name = type(model).__name__
    if _is_encoder_decoder(model):
        if decoder_input_ids is None:
            start = getattr(model.config, "decoder_start_token_id", None)
            raise ValueError(
                f"{where}: {name} is an encoder-decoder: give decoder_input_ids, the decoder's tokens so far "
                f"(B, M), starting with its decoder_start_token_id ({start}); the target is the next token at "
                f"`position` of the decoder"
            )
        _check_input_ids(where, decoder_input_ids, "decoder_input_ids")
        if decoder_input_ids.shape[0] != batch:
            raise ValueError(
                f"{where}: decoder_input_ids must have one row per sequence ({batch}), got "
                f"{tuple(decoder_input_ids.shape)}"
            )
    elif decoder_input_ids is not None:
        raise ValueError(f"{where}: decoder_input_ids is for encoder-decoder models; {name} has no decoder inputs")


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` has a ``use_cache`` argument (a language model's key-value cache, turned off here)."""
    return "use_cache" in inspect.signature(model.forward).parameters


def _check_input_ids(where: str, input_ids: Any, label: str = "input_ids") -> None:
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"{where}: {label} must be an integer tensor (B, L), got {got}")


def _is_position_table(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return "position" in last or last == "wpe"


def _position_modules(model: nn.Module) -> list[str]:
    """Names of the learned position embeddings (``nn.Embedding`` named ``*position*`` or ``wpe``)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Embedding)
            and _is_position_table(name)]


def _additive_modules(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Names of the other embedding tables (token types, relative position biases): neither the input embedding nor a
    learned position table, nor one that shares its weight with the input embedding."""
    tied = getattr(embedding, "weight", None)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Embedding)
            and module is not embedding and getattr(module, "weight", None) is not tied
            and not _is_position_table(name)]


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
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "inputs_embeds" not in parameters and not takes_any:
        raise TypeError(
            f"attribute_tokens: {type(model).__name__}.forward takes no inputs_embeds, which the attribution starts "
            f"from; wrap the model so that it does, or use lrpfunc.attribute on its input directly"
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
        model: A HuggingFace model with ``get_input_embeddings()`` that accepts ``inputs_embeds`` and returns logits;
            an encoder-decoder also takes ``decoder_inputs_embeds`` (through the same, shared embedding). A speech
            encoder-decoder (Whisper, ``main_input_name == "input_features"``) takes its features in place of
            ``input_ids``, and they are attributed as they are.
        composite: The rules; ``None`` gives the plain gradient w.r.t. the embeddings (times the target logit, like
            every attribution here).
        canonizers: Canonizers, as for :func:`lrpfunc.attribute`.
        positions: Report the relevance of learned position embeddings, and of rotary position embeddings where the
            composite makes their tables inputs (costs the parameter relevance of every rule, and a batch of
            ``B > 1`` sequences is attributed one sequence at a time, since the batch shares one position embedding
            tensor; ``False`` skips it).

    Returns:
        ``explain(input_ids, target=None, *, targets=None, position=-1, attention_mask=None, contrast=None,
        chunk_size=None, params=None, decoder_input_ids=None) -> TokenAttribution``. ``target``: class indices for a
        classifier, token ids for a language model: ``None`` (the argmax), an int, or a ``(B,)`` tensor (one per
        sequence). ``targets``: ``(K,)`` (the same for every sequence)
        or ``(K, B)`` for ``K`` targets at once, computed from one forward pass (``vmap`` over the seeds); give
        ``target`` or ``targets``, not both. ``position``: for a language model, the position whose next-token
        logits are explained, an int or a ``(K,)`` tensor (one per target: every generated position at once).
        ``contrast``: token (or class) ids of the same forms as the targets: each attribution explains the difference
        of the target's logit and the contrast's (contrastive explanations). ``chunk_size``: with several targets, how
        many are propagated at once (as for ``torch.func.vmap``; bounds memory). ``params``: the model's parameters by
        name (default: its own, detached), so that the result is differentiable w.r.t. them like any attribution.
        ``decoder_input_ids``: for an encoder-decoder (T5, BART), the decoder's tokens so far ``(B, M)``, starting
        with its ``decoder_start_token_id`` (required there, refused elsewhere); ``position`` then counts in the
        decoder, and the result has the relevance of both the encoder's and the decoder's tokens.

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
    sources = sources_of(composite)
    # the tables of rotary position embeddings, made inputs by the composite (attnlrp(rotary_positions=True))
    rotary_names = ([f"model.{name}" for name, module in model.named_modules() if name and isinstance(module, sources)]
                    if positions and sources else [])
    additive_names = [f"model.{name}" for name in _additive_modules(model, embedding)] if positions else []
    # an encoder-decoder's tables inside its decoder go with the decoder's tokens
    decoder_tables = ({name for name in position_names + additive_names if ".decoder." in f".{name}."}
                      if _is_encoder_decoder(model) else set())
    with_params = attribute_with_params(wrapper, composite, canonizers)
    plain = attribute(wrapper, composite, canonizers)
    speech = _is_speech(model)

    def explain(
        input_ids: Tensor,
        target: int | Tensor | None = None,
        *,
        targets: Tensor | None = None,
        position: int | Tensor = -1,
        attention_mask: Tensor | None = None,
        contrast: int | Tensor | None = None,
        chunk_size: int | None = None,
        params: Mapping[str, Tensor] | None = None,
        decoder_input_ids: Tensor | None = None,
    ) -> TokenAttribution:
        if speech:
            _check_features("attribute_tokens", input_ids)
        else:
            _check_input_ids("attribute_tokens", input_ids)
        _check_decoder_ids("attribute_tokens", model, decoder_input_ids, input_ids.shape[0])
        if target is not None and targets is not None:
            raise ValueError("attribute_tokens: give target (one attribution) or targets (several), not both")
        # the model's own parameters detached by default: a heatmap needs no tape for them (ParamsRequireGradWarning)
        given: dict[str, Tensor] = (
            {name: p.detach() for name, p in model.named_parameters()} if params is None else dict(params)
        )
        local = (
            {"weight": given[embedding_weight]} if embedding_weight is not None and embedding_weight in given else {}
        )
        # a speech encoder's features are attributed as they are (its first layers are convolutions)
        embeds = input_ids if speech else evaluate(embedding, local, input_ids, embedding_info)
        wrapped = {f"model.{name}": value for name, value in given.items()}
        x: tuple[Tensor, ...] = (embeds,) if attention_mask is None else (embeds, attention_mask)
        if decoder_input_ids is not None:  # the decoder's tokens through the same (shared) embedding
            ones = torch.ones(input_ids.shape[0], input_ids.shape[-1], dtype=torch.long, device=input_ids.device)
            mask = ones if attention_mask is None else attention_mask
            x = (embeds, mask, evaluate(embedding, local, decoder_input_ids, embedding_info))
        with torch.no_grad():
            logits = evaluate(wrapper, wrapped, x)
        several = targets is not None or (isinstance(position, Tensor) and position.ndim == 1)
        seeds = _seeds(logits, targets if several else target, position, several, contrast)
        use_params = bool(position_names or additive_names or rotary_names)

        def attribute_rows(rows: slice) -> tuple[Any, ...]:
            part = tuple(t[rows] for t in x)

            def one(seed: Tensor) -> tuple[Any, ...]:
                def by_value(output: Tensor) -> Tensor:  # the logits' values at the seed (from_logit's convention)
                    return seed * output

                if use_params:
                    output, relevance, by_param = with_params(wrapped, part, by_value)
                else:
                    output, relevance = plain(wrapped, part, by_value)
                    by_param = {}
                value = (output * seed).flatten(1).sum(1)  # the target logit (minus the contrast's) of each sequence
                embedded = relevance[0]
                decoded = relevance[2] if decoder_input_ids is not None else embedded[..., :0, :]
                # a speech encoder's positions are those after its convolutions: (B, S), filled below
                taken = torch.zeros(embedded.shape[:-1] if not speech else (embedded.shape[0], 0),
                                    dtype=embedded.dtype, device=embedded.device)
                taken_decoder = torch.zeros(decoded.shape[:-1], dtype=decoded.dtype, device=decoded.device)
                for name in rotary_names:
                    for table in source_relevance(by_param, name):  # cos and sin: (1 or B, L, head dim)
                        taken = taken + table.sum(-1)
                for name in position_names:
                    if name in by_param:
                        if name in decoder_tables:
                            taken_decoder = taken_decoder + by_param[name].sum(-1)
                        elif speech:  # every encoder position's row of the table, shared by the batch
                            taken = by_param[name].sum(-1).expand(embedded.shape[0], -1)
                        else:
                            taken = taken + by_param[name].sum(-1)
                tables = {name.removeprefix("model."): _per_token(by_param[name], taken) if name in by_param
                          else torch.zeros_like(taken) for name in additive_names if name not in decoder_tables}
                tables.update({name.removeprefix("model."): _per_token(by_param[name], taken_decoder)
                               if name in by_param else torch.zeros_like(taken_decoder)
                               for name in additive_names if name in decoder_tables})
                return embedded, taken, value, tables, decoded, taken_decoder

            return torch.func.vmap(one, chunk_size=chunk_size)(seeds[:, rows]) if several else one(seeds[0, rows])

        batch = input_ids.shape[0]
        if use_params and batch > 1:
            # a learned position embedding is one tensor (1, L, H) that the batch shares, so its relevance is summed
            # over the sequences: it is each sequence's own only when the sequences are attributed one at a time
            parts = [attribute_rows(slice(row, row + 1)) for row in range(batch)]
            dim = 1 if several else 0
            columns = list(zip(*parts))
            embedded, taken, value, decoded, taken_decoder = (
                torch.cat(columns[index], dim=dim) for index in (0, 1, 2, 4, 5)
            )
            tables = {name: torch.cat([part[3][name] for part in parts], dim=dim) for name in parts[0][3]}
        else:
            embedded, taken, value, tables, decoded, taken_decoder = attribute_rows(slice(None))
        encoder_decoder = decoder_input_ids is not None
        return TokenAttribution(
            tokens=embedded.sum(-2) if speech else embedded.sum(-1),
            embeddings=embedded,
            positions=taken if set(position_names) - decoder_tables or rotary_names else None,
            logits=logits,
            target=value,
            additive=tables,
            decoder_tokens=decoded.sum(-1) if encoder_decoder else None,
            decoder_embeddings=decoded if encoder_decoder else None,
            decoder_positions=taken_decoder if encoder_decoder and decoder_tables & set(position_names) else None,
        )

    return explain


def _per_token(relevance: Tensor, like: Tensor) -> Tensor:
    """The relevance of a table's output per token, ``like``'s shape ``(B, L)``, for an output of shape ``(B, L, H)``
    (or ``(1, L, H)``, shared by the batch); per sequence, ``(B,)``, for any other shape (a relative position bias
    ``(1, heads, L, L)`` adds to attention scores, not to a token)."""
    if relevance.ndim == like.ndim + 1 and relevance.shape[-2] == like.shape[-1]:
        return relevance.sum(-1) + torch.zeros_like(like)
    if relevance.ndim > 0 and relevance.shape[0] == like.shape[0] and like.shape[0] > 1:
        return relevance.flatten(1).sum(1)
    return relevance.sum() + torch.zeros_like(like[..., 0])


def _chosen(label: str, ids: int | Tensor, batch: int, several: bool, device: torch.device) -> Tensor:
    """Target (or contrast) ids as ``(K, B)``: an int or ``(B,)`` for one, ``(K,)`` or ``(K, B)`` for several."""
    chosen = torch.as_tensor(ids, device=device)
    if several:
        chosen = chosen[:, None].expand(-1, batch) if chosen.ndim == 1 else chosen
    else:
        chosen = chosen.expand(batch)[None] if chosen.ndim == 0 else chosen[None]
    if chosen.ndim != 2 or chosen.shape[1] != batch:
        expected = "(K,) or (K, B)" if several else "an int or (B,)"
        raise ValueError(
            f"attribute_tokens: {label} must be {expected} with B = {batch}, got shape "
            f"{tuple(torch.as_tensor(ids).shape)}"
        )
    return chosen


def _seeds(
    logits: Tensor,
    target: int | Tensor | None,
    position: int | Tensor,
    several: bool,
    contrast: int | Tensor | None = None,
) -> Tensor:
    """One-hot seeds ``(K, *logits.shape)``: ``K = 1`` for one target (``None``: the argmax; an int; a ``(B,)`` tensor),
    else one per row of ``target`` (``(K,)`` for every sequence alike, or ``(K, B)``) or per entry of ``position``;
    minus the one-hot of ``contrast`` (ids of the same forms) where given: the logit difference."""
    batch = logits.shape[0]
    language = logits.ndim == 3
    positions = torch.as_tensor(position, device=logits.device).reshape(-1)
    if not language and (isinstance(position, Tensor) or position != -1):
        raise ValueError(
            "attribute_tokens: position is for language models (logits (B, L, V)); this model gives (B, C)"
        )
    if target is None:
        # the argmax at each position, as tensors (no position read into Python: the function traces)
        chosen = logits[:, positions].argmax(-1).T if language else logits.argmax(-1)[None]
    else:
        chosen = _chosen("targets" if several else "target", target, batch, several, logits.device)
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
    at = (ks, rows, positions[:, None].expand(count, batch)) if language else (ks, rows)
    seeds = seeds.index_put((*at, chosen), torch.ones((), dtype=logits.dtype, device=logits.device))
    if contrast is not None:
        other = _chosen("contrast", contrast, batch, several, logits.device)
        if other.shape[0] != count:
            raise ValueError(f"attribute_tokens: contrast must give one id per target ({count}), got {other.shape[0]}")
        minus = torch.full((), -1.0, dtype=logits.dtype, device=logits.device)
        seeds = seeds.index_put((*at, other.expand(count, batch)), minus, accumulate=True)
    return seeds


@dataclass(frozen=True)
class GenerationAttribution:
    """Every generated token of a greedy generation, attributed to the tokens before it.

    Shapes: ``B`` prompts of ``L`` tokens, ``N`` generated tokens.

    Attributes:
        sequences: ``(B, L + N)``: the prompts and the generated tokens.
        relevance: ``(B, N, L + N)``: row ``n`` is the relevance of each token for generated token ``n`` (at position
            ``L + n``, predicted from position ``L + n - 1``); zero from position ``L + n`` on.
        positions: ``(B, N, L + N)``: the relevance taken by learned position embeddings, ``None`` without them.
        target: ``(B, N)``: the logit each row starts from (minus the contrast's logit where one was given).
        prompt_length: ``L``.
        decoder_relevance, decoder_positions: For an encoder-decoder model (T5, BART): ``sequences`` is then the
            decoder's ``(B, 1 + N)`` ids (its start token and the generated ones), ``relevance`` ``(B, N, L)`` the
            relevance of the encoder's tokens (the prompt) for each generated token, and ``decoder_relevance``
            ``(B, N, N)`` that of the decoder's inputs (row ``n``: the start token and the tokens generated before
            token ``n``; zero from column ``n + 1`` on); ``positions`` and ``decoder_positions`` likewise. ``None``
            for a decoder-only model.
        features: For a speech encoder-decoder (Whisper), whose prompt is ``input_features`` ``(B, n_mels, T)``:
            ``(B, N, n_mels, T)``, the relevance of each feature for each generated token; ``relevance`` is then
            ``(B, N, T)``, summed over the mel bins, ``prompt_length`` is ``T``, and ``positions`` ``(B, N, S)``
            belongs to the encoder's ``S`` positions after its convolutions. ``None`` otherwise.
    """

    sequences: Tensor
    relevance: Tensor
    positions: Tensor | None
    target: Tensor
    prompt_length: int
    decoder_relevance: Tensor | None = None
    decoder_positions: Tensor | None = None
    features: Tensor | None = None


def attribute_generation(
    model: nn.Module,
    composite: Composite | None = None,
    canonizers: Sequence[Canonizer] | Canonizer = (),
    *,
    positions: bool = True,
) -> Callable[..., GenerationAttribution]:
    """Generate greedily and attribute every generated token to the prompt and the tokens generated before it.

    Definition:
        The model generates ``N`` tokens greedily (the argmax at each step; the ids ``model.generate(do_sample=False)``
        gives when no end-of-sequence token stops it: an end-of-sequence token is kept like any other, never blocked
        as ``min_new_tokens`` blocks it). One forward pass over the ``L + N`` tokens then gives every
        row at once: row ``n`` is :func:`attribute_tokens`'s attribution of the logit of generated token ``n`` at
        position ``L + n - 1`` (``vmap`` over the ``N`` seeds), starting from its value.

    Args:
        model: A HuggingFace causal language model, or an encoder-decoder (T5, BART: the prompt goes to the encoder
            and the decoder generates from its ``decoder_start_token_id``; Whisper: the first argument of ``explain``
            is then ``input_features`` ``(B, n_mels, T)``), as for :func:`attribute_tokens`.
        composite: The rules, e.g. :func:`lrpfunc.composites.attnlrp`; ``None`` for the plain gradient.
        canonizers: Canonizers, as for :func:`lrpfunc.attribute`.
        positions: Report the relevance of position embeddings (learned, or rotary with
            ``attnlrp(rotary_positions=True)``), as for :func:`attribute_tokens`.

    Returns:
        ``explain(input_ids, max_new_tokens, *, attention_mask=None, contrast=None, chunk_size=None, params=None) ->
        GenerationAttribution``. ``contrast``: ``(B, N)`` token ids: row ``n`` explains the logit of generated token
        ``n`` minus that of ``contrast[:, n]`` at the same position. ``chunk_size``: how many rows are propagated at
        once (bounds memory, as for ``torch.func.vmap``).

    Example:
        >>> explain = lrpfunc.hf.attribute_generation(model, lrpfunc.composites.attnlrp())
        >>> result = explain(tokenizer("The capital of France is", return_tensors="pt").input_ids, 8)
        >>> result.relevance[0, 0]      # each token's relevance for the first generated token
    """
    _check_model(model)
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_head) or get_head() is None:
        raise TypeError(
            f"attribute_generation: {type(model).__name__} has no language-model head (get_output_embeddings() gives "
            f"none), so it predicts no next token; give the model with its head (...ForCausalLM, "
            f"...ForConditionalGeneration)"
        )
    tokens = attribute_tokens(model, composite, canonizers, positions=positions)
    uses_cache = _takes_use_cache(model)
    speech = _is_speech(model)

    def explain(
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        attention_mask: Tensor | None = None,
        contrast: Tensor | None = None,
        chunk_size: int | None = None,
        params: Mapping[str, Tensor] | None = None,
    ) -> GenerationAttribution:
        if speech:
            _check_features("attribute_generation", input_ids)
        else:
            _check_input_ids("attribute_generation", input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"attribute_generation: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        batch, length = input_ids.shape[0], input_ids.shape[-1]
        if contrast is not None and (not isinstance(contrast, Tensor) or contrast.shape != (batch, max_new_tokens)):
            got = tuple(contrast.shape) if isinstance(contrast, Tensor) else type(contrast).__name__
            raise ValueError(f"attribute_generation: contrast must be token ids ({batch}, {max_new_tokens}), got {got}")
        given = None if params is None else {name: value.detach() for name, value in params.items()}
        rows = torch.arange(max_new_tokens, device=input_ids.device)
        if _is_encoder_decoder(model):
            return _explain_encoder_decoder(model, tokens, given, input_ids, max_new_tokens, attention_mask, contrast,
                                            chunk_size, params)
        sequences, mask = _greedy(model, given, input_ids, attention_mask, max_new_tokens, uses_cache)
        result = tokens(
            sequences,
            targets=sequences[:, length:].T,
            position=length - 1 + rows,
            attention_mask=mask,
            contrast=None if contrast is None else contrast.T,
            chunk_size=chunk_size,
            params=params,
        )
        # row n explains token L + n from the tokens before it: what lies at L + n and after is zero by causality,
        # and set to exactly zero here
        before = torch.arange(length + max_new_tokens, device=input_ids.device)[None] < (length + rows)[:, None]
        relevance = result.tokens.transpose(0, 1) * before
        taken = None if result.positions is None else result.positions.transpose(0, 1) * before
        return GenerationAttribution(
            sequences=sequences,
            relevance=relevance,
            positions=taken,
            target=result.target.T,
            prompt_length=length,
        )

    return explain


def _explain_encoder_decoder(model: nn.Module, tokens: Callable[..., TokenAttribution],
                             params: Mapping[str, Tensor] | None, input_ids: Tensor, count: int,
                             attention_mask: Tensor | None, contrast: Tensor | None, chunk_size: int | None,
                             given_params: Mapping[str, Tensor] | None) -> GenerationAttribution:
    """:func:`attribute_generation` for an encoder-decoder: the prompt through the encoder, ``count`` tokens generated
    greedily by the decoder from its start token, every one attributed from one forward pass."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(
            f"attribute_generation: {type(model).__name__}'s config has no decoder_start_token_id, the token the "
            f"decoder starts from; set model.config.decoder_start_token_id"
        )
    batch, length = input_ids.shape[0], input_ids.shape[-1]
    start_ids = torch.full((batch, 1), int(start), dtype=torch.long, device=input_ids.device)
    decoder, _ = _greedy(model, params, input_ids, attention_mask, count, True, decoder=start_ids)
    rows = torch.arange(count, device=input_ids.device)
    result = tokens(
        input_ids,
        targets=decoder[:, 1:].T,
        position=rows,
        attention_mask=attention_mask,
        contrast=None if contrast is None else contrast.T,
        chunk_size=chunk_size,
        params=given_params,
        decoder_input_ids=decoder[:, :-1],
    )
    # row n explains generated token n, predicted at decoder position n from the decoder's inputs 0..n
    before = torch.arange(count, device=input_ids.device)[None] <= rows[:, None]
    assert result.decoder_tokens is not None
    return GenerationAttribution(
        sequences=decoder,
        relevance=result.tokens.transpose(0, 1),
        features=result.embeddings.transpose(0, 1) if _is_speech(model) else None,
        positions=None if result.positions is None else result.positions.transpose(0, 1),
        target=result.target.T,
        prompt_length=length,
        decoder_relevance=result.decoder_tokens.transpose(0, 1) * before,
        decoder_positions=(None if result.decoder_positions is None
                           else result.decoder_positions.transpose(0, 1) * before),
    )


def _cache_argument(model: nn.Module) -> str | None:
    """The name of ``model.forward``'s key-value cache argument (``cache`` in transformers 5, ``past_key_values``
    before), or ``None`` if it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _greedy(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    count: int,
    uses_cache: bool,
    *,
    decoder: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``count`` tokens appended greedily by the model with ``params`` (default: its own), and the attention mask
    extended over them. With the model's key-value cache (as ``generate`` decodes) each step after the first feeds only
    the newest token (and an encoder-decoder's encoder runs once); without it, the whole sequence. With ``decoder`` (an
    encoder-decoder's start ids), the tokens are appended to the decoder's ids, and ``input_ids`` (a speech model's
    features) and its mask stay the encoder's."""
    sequences, mask = (input_ids, attention_mask) if decoder is None else (decoder, attention_mask)
    cache_name = _cache_argument(model) if uses_cache else None
    extra: dict[str, Any] = {"use_cache": cache_name is not None} if uses_cache else {}
    info = ModelInfo(model) if params is not None else None
    encoder_input = getattr(model, "main_input_name", "input_ids")
    cache: Any = None
    encoded: Tensor | None = None
    with torch.no_grad():
        for _ in range(count):
            fed = sequences if cache is None else sequences[:, -1:]  # with a cache, only what it has not seen
            if decoder is None:
                kwargs = {"input_ids": fed, "attention_mask": mask, **extra}
            else:
                kwargs = {encoder_input: input_ids, "attention_mask": mask, "decoder_input_ids": fed, **extra}
                if encoded is not None:  # the encoder's output of the first step
                    kwargs["encoder_outputs"] = (encoded,)
            if cache is not None:
                kwargs[cast(str, cache_name)] = cache
            output = model(**kwargs) if params is None else evaluate(model, params, kwargs, info)
            sequences = torch.cat([sequences, output.logits[:, -1].argmax(-1, keepdim=True)], 1)
            if mask is not None and decoder is None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if cache_name is not None:
                cache = getattr(output, cache_name, None)
                if decoder is not None:
                    encoded = getattr(output, "encoder_last_hidden_state", None)
    return sequences, mask


def recompute_layers(model: nn.Module, composite: Composite) -> Composite:
    """``composite`` with the model's transformer layers recomputed during the sweep: the memory mode for long contexts.

    The layer types are those HuggingFace keeps whole when it splits a model across devices
    (``model._no_split_modules``: ``LlamaDecoderLayer``, ``GPT2Block``, ...). Each layer's call holds only its inputs
    and outputs in the forward pass and is attributed by running it again when the sweep reaches it
    (:func:`lrpfunc.composites.recompute_layers`): the peak memory falls to about one layer's attribution plus the
    hidden states and logits, for about one more forward pass of the layers. The relevance equals ``composite``'s for
    composites by class and operation (``attnlrp()``, ``cp_lrp()``).

    Raises:
        ValueError: The model names no layer type, or none of its modules has one of the named types.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"recompute_layers: {type(model).__name__} names no layer types (_no_split_modules); use "
            f"lrpfunc.composites.recompute_layers(composite, LayerType) with its block's class"
        )
    types = tuple(dict.fromkeys(type(module) for module in model.modules() if type(module).__name__ in names))
    if not types:
        raise ValueError(
            f"recompute_layers: none of the modules of {type(model).__name__} is of its layer types {sorted(names)}"
        )
    return _composites.recompute_layers(composite, *types)
