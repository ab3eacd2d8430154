"""Embedding tables added to the token embeddings (token types, learned positions) take relevance: ``attribute_tokens``
reports it, so that under CP-LRP tokens + positions + the other tables sum to the target logit."""

from __future__ import annotations

import pytest
import torch

import lrpfunc.hf
from lrpfunc import composites

transformers = pytest.importorskip("transformers")

D = torch.float64


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=3, max_position_embeddings=32))
    elif family == "roberta":
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=3, max_position_embeddings=40, type_vocab_size=2))
    else:
        model = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3, max_position_embeddings=32))
    model = model.to(D).eval()
    with torch.no_grad():  # tables away from their initialisation, so that a table left out shows
        for name, p in model.named_parameters():
            if "token_type" in name or "position" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("family", "tables"), [
    ("bert", ["bert.embeddings.token_type_embeddings"]),
    ("roberta", ["roberta.embeddings.token_type_embeddings"]),
    ("distilbert", []),
])
def test_tokens_positions_and_tables_sum_to_the_target(family: str, tables: list[str]) -> None:
    model = _model(family)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    result = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(ids)
    assert sorted(result.additive) == tables
    assert result.positions is not None
    total = result.tokens.sum(-1) + result.positions.sum(-1) + sum(v.sum(-1) for v in result.additive.values())
    torch.testing.assert_close(total, result.target, rtol=1e-10, atol=1e-12)
    for name in tables:
        assert result.additive[name].shape == (2, 9) and result.additive[name].abs().sum() > 1e-3
    # each sequence's own: the batch attributed at once equals its sequences one at a time
    for row in range(2):
        single = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(ids[row:row + 1])
        for name in tables:
            torch.testing.assert_close(result.additive[name][row], single.additive[name][0], rtol=1e-10, atol=1e-12)


def test_tables_with_several_targets_and_without_positions() -> None:
    model = _model("bert")
    ids = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    several = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(ids, targets=torch.tensor([0, 2]))
    (name,) = several.additive
    assert several.additive[name].shape == (2, 1, 7)
    for k, target in enumerate((0, 2)):
        one = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(ids, target=target)
        torch.testing.assert_close(several.additive[name][k], one.additive[name], rtol=1e-10, atol=1e-12)
    skipped = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp(), positions=False)(ids)
    assert skipped.additive == {} and skipped.positions is None
