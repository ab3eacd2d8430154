"""PA-LRP's rotary position relevance (``attnlrp(rotary_positions=True)``, :func:`lrpfunc.composites.with_sources`):
the rules written out by hand on a rotary product, a Llama whose tables are sources equal to the same Llama with the
tables passed in as inputs, ``positions`` of ``attribute_tokens`` and ``attribute_generation``, finite differences
through a table's relevance, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpfunc
import lrpfunc.hf
from lrpfunc import composites, types

D = torch.float64


class ToyRotaryEmbedding(nn.Module):
    """RoPE's tables as HuggingFace computes them: ``cos`` and ``sin`` of ``position * inv_freq``, halves repeated."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=D) / dim)), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].to(x.dtype) * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-second, first), dim=-1)


class Rotated(nn.Module):
    """``y = sum_d (x * cos + rotate_half(x) * sin)_d`` per position."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.rotary = ToyRotaryEmbedding(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(x, torch.arange(x.shape[1])[None])
        return (x * cos + _rotate_half(x) * sin).sum(-1)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 4, dtype=D, generator=torch.Generator().manual_seed(0))


def test_the_duck_type_matches_the_huggingface_rotary_modules() -> None:
    assert isinstance(ToyRotaryEmbedding(4), types.RotaryEmbedding)
    assert not isinstance(nn.Embedding(3, 4), types.RotaryEmbedding)
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4)
    assert isinstance(transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config), types.RotaryEmbedding)


def test_a_rotary_product_splits_its_relevance_evenly_with_the_table() -> None:
    """With ``R_y = y`` at the output, the sum rule gives the products ``a = x * cos`` and ``b = rotate_half(x) * sin``
    their own values; the uniform rule gives half of each to ``x`` and half to the table."""
    model, x = Rotated(), _x()
    cos, sin = model.rotary(x, torch.arange(3)[None])
    a, b = x * cos, _rotate_half(x) * sin
    y = model(x)
    output, relevance, tables = lrpfunc.attribute_with_params(model, composites.attnlrp(rotary_positions=True))(
        {}, x, y
    )
    torch.testing.assert_close(output, y, rtol=0, atol=0)
    torch.testing.assert_close(tables["rotary[0]"], (a / 2).sum(0, keepdim=True), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(tables["rotary[1]"], (b / 2).sum(0, keepdim=True), rtol=1e-13, atol=1e-13)
    # x takes a / 2 where it is, and b / 2 where rotate_half took it from (its negation, a scaling, keeps the sign
    # of the relevance)
    back = torch.cat(((b / 2)[..., 2:], (b / 2)[..., :2]), dim=-1)
    torch.testing.assert_close(relevance, a / 2 + back, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(relevance.sum() + tables["rotary[0]"].sum() + tables["rotary[1]"].sum(), y.sum())
    # the same function without the option: the tables are constants and x takes everything
    _, plain = lrpfunc.attribute(model, composites.attnlrp())({}, x, y)
    torch.testing.assert_close(plain, a + torch.cat((b[..., 2:], b[..., :2]), dim=-1), rtol=1e-13, atol=1e-13)
    # attribute (without parameter relevance) moves the same relevance to the input, in gradient form
    _, alone = lrpfunc.attribute(model, composites.attnlrp(rotary_positions=True))({}, x, y)
    torch.testing.assert_close(alone, relevance, rtol=1e-13, atol=1e-13)


def test_a_tables_relevance_passes_finite_differences() -> None:
    model = Rotated()
    fn = lrpfunc.attribute_with_params(model, composites.attnlrp(rotary_positions=True))
    weights = torch.randn(1, 3, 4, dtype=D, generator=torch.Generator().manual_seed(1))

    def loss(x: torch.Tensor) -> torch.Tensor:
        _, relevance, tables = fn({}, x, model(x))
        return (tables["rotary[0]"] * weights).sum() + (relevance ** 2).sum()

    assert torch.autograd.gradcheck(loss, (_x().requires_grad_(),))


def test_with_sources_refuses_what_is_not_a_module_type() -> None:
    with pytest.raises(TypeError, match=r"with_sources: sources must be module types, got 'rotary'"):
        composites.with_sources(composites.attnlrp(), "rotary")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"with_sources: give at least one module type"):
        composites.with_sources(composites.attnlrp())
    with pytest.raises(TypeError, match=r"with_sources: expected a composite, got int"):
        composites.with_sources(3, types.RotaryEmbedding)  # type: ignore[arg-type]


def test_sources_survive_recompute_layers_and_print() -> None:
    composite = composites.attnlrp(rotary_positions=True)
    assert repr(composite) == "attnlrp(epsilon=0.0, stabilizer=0.0, rotary_positions=True)"
    assert composites.recompute_layers(composite, nn.Linear).sources == (types.RotaryEmbedding,)


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model: nn.Module = transformers.LlamaForCausalLM(config).to(D).eval()
    return model


class TablesIn(nn.Module):
    """The Llama's forward pass with the rotary tables passed in as inputs (the independent route)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        length = embeds.shape[1]
        mask = torch.full((length, length), float("-inf"), dtype=embeds.dtype).triu(1)[None, None]
        hidden = embeds
        for layer in self.model.model.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin),
                           position_ids=torch.arange(length)[None])
        return self.model.lm_head(self.model.model.norm(hidden))


def test_llama_tables_as_sources_equal_the_tables_passed_in_as_inputs() -> None:
    model = _llama()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    embeds = model.get_input_embeddings()(ids).detach()
    cos, sin = model.model.rotary_emb(embeds, torch.arange(6)[None])
    seed = torch.zeros(1, 6, 64, dtype=D)
    seed[0, -1, 5] = 1.0
    _, relevance, tables = lrpfunc.attribute_with_params(
        lrpfunc.hf.FromEmbeddings(model), composites.attnlrp(rotary_positions=True)
    )({}, (embeds,), seed)
    # both in relevance form (the rules' gradient form differs in rounding: the attention computes its softmax in
    # float32)
    _, (by_embeds, by_cos, by_sin), _ = lrpfunc.attribute_with_params(TablesIn(model), composites.attnlrp())(
        {}, (embeds, cos, sin), seed
    )
    torch.testing.assert_close(relevance[0], by_embeds, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tables["model.model.rotary_emb[0]"], by_cos, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tables["model.model.rotary_emb[1]"], by_sin, rtol=1e-10, atol=1e-12)
    assert by_cos.abs().sum() > 1e-3 * by_embeds.abs().sum()  # the positions take a share worth reporting


def test_attribute_tokens_reports_the_rotary_positions() -> None:
    model = _llama()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    plain = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())(ids)
    assert plain.positions is None
    explain = lrpfunc.hf.attribute_tokens(model, composites.attnlrp(rotary_positions=True))
    result = explain(ids)
    assert result.positions is not None and result.positions.shape == (2, 6)
    # each sequence's own: equal to attributing it alone
    for row in range(2):
        alone = explain(ids[row:row + 1])
        torch.testing.assert_close(result.positions[row:row + 1], alone.positions, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result.tokens[row:row + 1], alone.tokens, rtol=1e-10, atol=1e-12)
    # the positions' relevance is that of both tables, summed over the head dimension
    embeds = model.get_input_embeddings()(ids[:1]).detach()
    cos, sin = model.model.rotary_emb(embeds, torch.arange(6)[None])
    seed = torch.zeros(1, 6, 64, dtype=D)
    seed[0, -1, result.logits[0, -1].argmax()] = result.target[0]
    _, (_, by_cos, by_sin), _ = lrpfunc.attribute_with_params(TablesIn(model), composites.attnlrp())(
        {}, (embeds, cos, sin), seed
    )
    torch.testing.assert_close(result.positions[:1], (by_cos + by_sin).sum(-1), rtol=1e-10, atol=1e-12)


def test_attribute_generation_reports_the_rotary_positions() -> None:
    model = _llama()
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    result = lrpfunc.hf.attribute_generation(model, composites.attnlrp(rotary_positions=True))(ids, 3)
    assert result.positions is not None and result.positions.shape == (1, 3, 7)
    tokens = lrpfunc.hf.attribute_tokens(model, composites.attnlrp(rotary_positions=True))
    row = tokens(result.sequences[:, :5], result.sequences[:, 5], position=4)
    torch.testing.assert_close(result.positions[:, 1, :5], row.positions, rtol=1e-9, atol=1e-12)
    assert torch.all(result.positions[:, 1, 5:] == 0)


def test_the_rule_table_lists_a_source() -> None:
    table = lrpfunc.rule_table(Rotated(), composites.attnlrp(rotary_positions=True), _x())
    text = str(table)
    assert "ToyRotaryEmbedding 'rotary'" in text and "(source)" in text
    assert "(source)        its outputs are inputs of the attribution (with_sources)" in text
    assert table.covered_by("rotary") is None
    assert table.rule_of("rotary") is None
    assert "(source)" not in str(lrpfunc.rule_table(Rotated(), composites.attnlrp(), _x()))


def test_the_conservation_report_counts_what_the_sources_take() -> None:
    model, x = Rotated(), _x()
    report = lrpfunc.conservation(model, composites.attnlrp(rotary_positions=True))({}, x, model(x))
    assert report.total_out == pytest.approx(report.total_in, rel=1e-12)


def test_the_memory_mode_gives_the_same_rotary_positions() -> None:
    model = _llama()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    composite = composites.attnlrp(rotary_positions=True)
    one_pass = lrpfunc.hf.attribute_tokens(model, composite)(ids)
    recomputed = lrpfunc.hf.attribute_tokens(model, lrpfunc.hf.recompute_layers(model, composite))(ids)
    torch.testing.assert_close(recomputed.positions, one_pass.positions, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(recomputed.tokens, one_pass.tokens, rtol=1e-10, atol=1e-12)
