"""Encoder-decoder models (T5, BART, Whisper): the relevance of the encoder's and of the decoder's tokens, for one target and
for every token of a greedy generation, against lrpfunc.attribute on the embeddings (float64)."""

from __future__ import annotations

import pytest
import torch

import lrpfunc
import lrpfunc.hf
from lrpfunc import composites

transformers = pytest.importorskip("transformers")

D = torch.float64


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                       num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = transformers.T5ForConditionalGeneration(config)
    else:
        config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=2,
                                         pad_token_id=1, bos_token_id=0, eos_token_id=2, forced_eos_token_id=None,
                                         forced_bos_token_id=None)
        model = transformers.BartForConditionalGeneration(config)
    return model.to(D).eval()


def _total(result) -> torch.Tensor:
    """Everything that took relevance: both sides' tokens and positions and the other tables."""
    total = result.tokens.sum(-1) + result.decoder_tokens.sum(-1)
    for taken in (result.positions, result.decoder_positions):
        if taken is not None:
            total = total + taken.sum(-1)
    for table in result.additive.values():
        total = total + (table.sum(-1) if table.ndim == result.tokens.ndim else table)
    return total


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_and_decoder_tokens(family: str) -> None:
    model = _model(family)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    decoder_ids = torch.randint(3, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    result = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(ids, decoder_input_ids=decoder_ids)
    assert result.tokens.shape == (2, 7) and result.decoder_tokens.shape == (2, 4)
    assert result.decoder_embeddings.shape == (2, 4, 32)
    torch.testing.assert_close(_total(result), result.target, rtol=1e-10, atol=1e-12)  # CP-LRP conserves
    # the same as lrpfunc.attribute on the embeddings, with the target logit's value as the seed
    fn = lrpfunc.attribute(lrpfunc.hf.FromEmbeddings(model), composites.attnlrp())
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        x = (embedding(ids), torch.ones_like(ids), embedding(decoder_ids))
        params = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
        logits = lrpfunc.hf.FromEmbeddings(model)(*x)
    token = logits[:, -1].argmax(-1)
    seed = torch.zeros_like(logits)
    seed[torch.arange(2), -1, token] = logits[torch.arange(2), -1, token]
    _, (encoder, _, decoder) = fn(params, x, seed)
    attn = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())(ids, decoder_input_ids=decoder_ids)
    torch.testing.assert_close(attn.tokens, encoder.sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attn.decoder_tokens, decoder.sum(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_attribute_generation_of_an_encoder_decoder(family: str) -> None:
    model = _model(family)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    count = 4
    result = lrpfunc.hf.attribute_generation(model, composites.cp_lrp())(ids, count)
    start = model.config.decoder_start_token_id
    assert result.sequences.shape == (2, 1 + count) and (result.sequences[:, 0] == start).all()
    # the same ids as a greedy decode by hand
    decoder = result.sequences[:, :1]
    with torch.no_grad():
        for _ in range(count):
            logits = model(input_ids=ids, decoder_input_ids=decoder, use_cache=False).logits
            decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(result.sequences, decoder)
    assert result.relevance.shape == (2, count, 6) and result.decoder_relevance.shape == (2, count, count)
    for n in range(count):  # row n: attribute_tokens at decoder position n with the inputs before it
        row = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(
            ids, target=decoder[:, n + 1], position=n, decoder_input_ids=decoder[:, :count]
        )
        torch.testing.assert_close(result.relevance[:, n], row.tokens, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.decoder_relevance[:, n, : n + 1], row.decoder_tokens[:, : n + 1],
                                   rtol=1e-9, atol=1e-12)
        assert (result.decoder_relevance[:, n, n + 1:] == 0).all()
        torch.testing.assert_close(row.decoder_tokens[:, n + 1:], torch.zeros_like(row.decoder_tokens[:, n + 1:]))


def test_encoder_decoder_gradcheck_through_a_generation_row() -> None:
    model = _model("bart")
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    decoder_ids = torch.tensor([[2, 7, 9]])
    fn = lrpfunc.attribute(lrpfunc.hf.FromEmbeddings(model), composites.attnlrp())
    embedding = model.get_input_embeddings()
    params = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        encoder_embeds, decoder_embeds = embedding(ids), embedding(decoder_ids)
    seed = torch.zeros(1, 3, 64, dtype=D)
    seed[0, -1, 11] = 1.0

    def loss(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        _, (r_encoder, _, r_decoder) = fn(params, (e, torch.ones_like(ids), d), seed)
        return r_encoder.square().sum() + r_decoder.square().sum()

    assert torch.autograd.gradcheck(loss, (encoder_embeds.requires_grad_(), decoder_embeds.requires_grad_()))


def test_decoder_inputs_are_required_and_refused_where_they_belong() -> None:
    t5 = _model("t5")
    ids = torch.randint(3, 64, (1, 5))
    with pytest.raises(ValueError, match=r"attribute_tokens: T5ForConditionalGeneration is an encoder-decoder: give "
                                         r"decoder_input_ids, the decoder's tokens so far \(B, M\), starting with its "
                                         r"decoder_start_token_id \(0\)"):
        lrpfunc.hf.attribute_tokens(t5, composites.cp_lrp())(ids)
    with pytest.raises(ValueError, match=r"decoder_input_ids must have one row per sequence \(1\), got \(2, 3\)"):
        lrpfunc.hf.attribute_tokens(t5, composites.cp_lrp())(ids, decoder_input_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attribute_tokens: decoder_input_ids must be an integer tensor \(B, L\)"):
        lrpfunc.hf.attribute_tokens(t5, composites.cp_lrp())(ids, decoder_input_ids=torch.zeros(1, 3))
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1,
                                                                n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    with pytest.raises(ValueError, match=r"decoder_input_ids is for encoder-decoder models; GPT2LMHeadModel has no "
                                         r"decoder inputs"):
        lrpfunc.hf.attribute_tokens(gpt2, composites.cp_lrp())(ids, decoder_input_ids=ids)


def test_generation_needs_a_language_model_head_and_explains_contrasts() -> None:
    torch.manual_seed(0)
    base = transformers.BartModel(_model("bart").config).to(D).eval()
    with pytest.raises(TypeError, match=r"attribute_generation: BartModel has no language-model head"):
        lrpfunc.hf.attribute_generation(base, composites.cp_lrp())
    model = _model("t5")
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    contrast = torch.full((2, 3), 7)
    result = lrpfunc.hf.attribute_generation(model, composites.cp_lrp())(ids, 3, contrast=contrast)
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=result.sequences[:, :3], use_cache=False).logits
    chosen = logits.gather(2, result.sequences[:, 1:, None])[..., 0] - logits[..., 7]
    torch.testing.assert_close(result.target, chosen, rtol=1e-10, atol=1e-12)


def _whisper() -> torch.nn.Module:
    config = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=12,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).to(D).eval()


def _features(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 8, 24, dtype=D, generator=torch.Generator().manual_seed(5))


def test_speech_features_take_the_place_of_the_encoders_tokens() -> None:
    """Whisper: the relevance of each input feature (and per frame), of the encoder's positions after its
    convolutions and of the decoder's tokens; CP-LRP conserves over all of them; the same as lrpfunc.attribute on the
    features with the target logit as the seed."""
    model = _whisper()
    features, decoder_ids = _features(), torch.tensor([[1, 5, 7], [1, 3, 3]])
    result = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(features, decoder_input_ids=decoder_ids)
    assert result.embeddings.shape == (2, 8, 24) and result.tokens.shape == (2, 24)
    assert result.positions.shape == (2, 12) and result.decoder_tokens.shape == (2, 3)
    torch.testing.assert_close(result.tokens, result.embeddings.sum(1))
    torch.testing.assert_close(_total(result), result.target, rtol=1e-10, atol=1e-12)
    wrapper = lrpfunc.hf.FromEmbeddings(model)
    params = {f"model.{name}": p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        x = (features, torch.ones(2, 24, dtype=torch.long), model.get_input_embeddings()(decoder_ids))
        logits = wrapper(*x)
    token = logits[:, -1].argmax(-1)
    seed = torch.zeros_like(logits)
    seed[torch.arange(2), -1, token] = logits[torch.arange(2), -1, token]
    _, (by_features, _, _) = lrpfunc.attribute(wrapper, composites.attnlrp())(params, x, seed)
    attn = lrpfunc.hf.attribute_tokens(model, composites.attnlrp(), positions=False)(features,
                                                                                     decoder_input_ids=decoder_ids)
    torch.testing.assert_close(attn.embeddings, by_features, rtol=1e-10, atol=1e-12)


def test_attribute_generation_of_a_speech_model() -> None:
    model = _whisper()
    features, count = _features(), 3
    result = lrpfunc.hf.attribute_generation(model, composites.cp_lrp())(features, count)
    assert result.sequences.shape == (2, 1 + count) and result.prompt_length == 24
    assert result.features.shape == (2, count, 8, 24) and result.relevance.shape == (2, count, 24)
    assert result.positions.shape == (2, count, 12) and result.decoder_relevance.shape == (2, count, count)
    decoder = result.sequences[:, :1]
    with torch.no_grad():  # plain greedy decoding from the start token
        for _ in range(count):
            logits = model(input_features=features, decoder_input_ids=decoder, use_cache=False).logits
            decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(result.sequences, decoder)
    total = (result.relevance.sum(-1) + result.positions.sum(-1) + result.decoder_relevance.sum(-1)
             + result.decoder_positions.sum(-1))
    torch.testing.assert_close(total, result.target, rtol=1e-10, atol=1e-12)  # CP-LRP conserves per row
    for n in range(count):
        row = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(
            features, target=decoder[:, n + 1], position=n, decoder_input_ids=decoder[:, :count]
        )
        torch.testing.assert_close(result.features[:, n], row.embeddings, rtol=1e-9, atol=1e-12)


def test_speech_models_take_float_features() -> None:
    model = _whisper()
    with pytest.raises(ValueError, match=r"attribute_tokens: this model's encoder reads input_features: give a float "
                                         r"tensor \(B, n_mels, frames\) as the first argument, got \(2, 5\) "
                                         r"torch.int64"):
        lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(torch.zeros(2, 5, dtype=torch.long),
                                                                decoder_input_ids=torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attribute_generation: this model's encoder reads input_features"):
        lrpfunc.hf.attribute_generation(model, composites.cp_lrp())(torch.zeros(2, 5, dtype=torch.long), 2)
