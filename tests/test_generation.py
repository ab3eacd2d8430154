"""attribute_generation: greedy ids equal to model.generate, every row equal to attribute_tokens for its token and
position, contrastive rows, chunked rows, conservation of CP-LRP per row, and an explanation loss through a row
checked against finite differences."""

from __future__ import annotations

import pytest
import torch

import lrpfunc
import lrpfunc.hf
from lrpfunc import composites

transformers = pytest.importorskip("transformers")

D = torch.float64
VOCAB = 64


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(D).eval()


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(D).eval()


def _prompts(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def test_the_ids_are_those_of_greedy_generate() -> None:
    model = _llama()
    ids = _prompts()
    result = lrpfunc.hf.attribute_generation(model, composites.attnlrp())(ids, 6)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(result.sequences, expected)
    assert result.relevance.shape == (2, 6, 11) and result.target.shape == (2, 6) and result.prompt_length == 5


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_every_row_equals_attribute_tokens_for_its_token_and_position(build) -> None:
    model = build()
    ids = _prompts()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 0] = 0  # a padded prompt
    result = lrpfunc.hf.attribute_generation(model, composites.attnlrp())(ids, 4, attention_mask=mask)
    tokens = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    for n in range(4):
        alone = tokens(result.sequences, target=result.sequences[:, 5 + n], position=4 + n, attention_mask=full_mask)
        torch.testing.assert_close(result.relevance[:, n], alone.tokens, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.target[:, n], alone.target, rtol=1e-9, atol=1e-12)
        if result.positions is not None:
            torch.testing.assert_close(result.positions[:, n], alone.positions, rtol=1e-9, atol=1e-12)
        assert not result.relevance[:, n, 5 + n :].any()  # nothing from the token itself or after it
    assert (result.positions is not None) == (build is _gpt2)


def test_rows_of_cp_lrp_conserve_their_logit() -> None:
    model = _llama()
    result = lrpfunc.hf.attribute_generation(model, composites.cp_lrp())(_prompts(), 5)
    torch.testing.assert_close(result.relevance.sum(-1), result.target, rtol=1e-6, atol=1e-9)


def test_contrastive_rows_explain_the_logit_difference() -> None:
    model = _llama()
    ids = _prompts()
    contrast = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(4))
    explain = lrpfunc.hf.attribute_generation(model, composites.cp_lrp())
    plain = explain(ids, 3)
    result = explain(ids, 3, contrast=contrast)
    assert torch.equal(result.sequences, plain.sequences)
    logits = model(result.sequences).logits.detach()
    for n in range(3):
        row = logits[torch.arange(2), 4 + n]
        expected = row.gather(1, result.sequences[:, 5 + n, None])[:, 0] - row.gather(1, contrast[:, n, None])[:, 0]
        torch.testing.assert_close(result.target[:, n], expected, rtol=1e-9, atol=1e-12)
        alone = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(
            result.sequences, target=result.sequences[:, 5 + n], position=4 + n, contrast=contrast[:, n]
        )
        torch.testing.assert_close(result.relevance[:, n], alone.tokens, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.relevance.sum(-1), result.target, rtol=1e-6, atol=1e-9)  # CP-LRP conserves


def test_chunked_rows_equal_all_at_once() -> None:
    model = _llama()
    explain = lrpfunc.hf.attribute_generation(model, composites.attnlrp())
    whole, chunked = explain(_prompts(), 5), explain(_prompts(), 5, chunk_size=2)
    torch.testing.assert_close(chunked.relevance, whole.relevance, rtol=1e-12, atol=1e-14)


def test_an_explanation_loss_through_a_row_matches_finite_differences() -> None:
    """GPT-2: its LayerNorm computes in the model's dtype (Llama's RMSNorm upcasts to float32, which finite
    differences in float64 cannot resolve)."""
    model = _gpt2()
    ids = _prompts(batch=1, length=4)
    explain = lrpfunc.hf.attribute_generation(model, composites.attnlrp(), positions=False)
    params = {name: p.detach() for name, p in model.named_parameters()}
    name = "transformer.h.1.mlp.c_proj.bias"

    def loss(weight: torch.Tensor) -> torch.Tensor:
        result = explain(ids, 2, params={**params, name: weight})
        return (result.relevance[0, 1, :4] ** 2).sum()  # the second generated token's relevance on the prompt

    weight = params[name].clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (weight,), eps=1e-6, atol=1e-7, fast_mode=True)


def test_bad_arguments_are_named() -> None:
    explain = lrpfunc.hf.attribute_generation(_llama(), composites.attnlrp())
    with pytest.raises(ValueError, match=r"attribute_generation: input_ids must be an integer tensor \(B, L\), got \(5,\)"):
        explain(_prompts()[0], 3)
    with pytest.raises(ValueError, match=r"attribute_generation: max_new_tokens must be a positive int, got 0"):
        explain(_prompts(), 0)
    with pytest.raises(ValueError, match=r"attribute_generation: contrast must be token ids \(2, 3\), got \(2, 2\)"):
        explain(_prompts(), 3, contrast=torch.zeros(2, 2, dtype=torch.long))
