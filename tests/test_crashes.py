"""Regression tests for crashes on models and inputs the engine did not expect: calls on constants alone, opting out
of a rule in a map, integer inputs beside float ones, compiled submodules, activation checkpointing and empty
batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import _tape, composites, rules

D = torch.float64
TAPES = ("autograd", "level", "vjp")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


# ------------------------------------------------------------------------------------------------------------
# a call whose inputs are all constants
# ------------------------------------------------------------------------------------------------------------


class LearnedQuery(nn.Module):
    """A LayerNorm on a learned tensor (a query, a position table) beside a layer on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(3, 4))
        self.norm = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.rms(self.norm(self.query))


class WithBuffer(nn.Module):
    def __init__(self, lin: nn.Linear, constant: torch.Tensor) -> None:
        super().__init__()
        self.lin = lin
        self.register_buffer("constant", constant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.constant


@pytest.mark.parametrize("composite", ["attnlrp", "attnlrp_epsilon", "epsilon_plus_flat"])
def test_a_normalization_of_a_constant_is_no_call_site(composite: str) -> None:
    torch.manual_seed(0)
    model = LearnedQuery().to(D)
    chosen = {
        "attnlrp": composites.attnlrp(),
        "attnlrp_epsilon": composites.attnlrp(epsilon=1e-6, stabilizer=1e-6),
        "epsilon_plus_flat": composites.epsilon_plus_flat(),
    }[composite]
    x, g = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    output, relevance = lrpfunc.attribute(model, chosen)(_params(model), x, g)
    torch.testing.assert_close(output, model(x), rtol=1e-14, atol=1e-14)
    # the input gets what it gets when the constant is a buffer computed beforehand
    reference = WithBuffer(model.lin, model.rms(model.norm(model.query)).detach())
    expected = lrpfunc.attribute(reference, chosen)(_params(reference), x, g)[1]
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)
    # the calls on constants are no sites: the first layer rule goes to the first layer on the input
    table = lrpfunc.rule_table(model, chosen, x)
    assert [site.name for site, _ in table if site.kind == "module"] == ["", "lin"]
    if composite == "epsilon_plus_flat":
        assert repr(table.rule_of("lin")).startswith("flat")
    report = lrpfunc.conservation(model, chosen)(_params(model), x, g)
    assert all(row.site.name not in ("norm", "rms") for row in report.rows)


def test_a_submodule_of_a_constant_call_that_reads_an_activation_is_a_site() -> None:
    class ReadsStored(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.table = nn.Parameter(torch.randn(3, 4))

        def forward(self, stored: list[torch.Tensor]) -> torch.Tensor:
            return self.norm(stored[0]) + self.table

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.inner = ReadsStored()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner([self.lin(x)])

    torch.manual_seed(1)
    model = Outer().to(D)
    x = torch.randn(3, 4, dtype=D)
    table = lrpfunc.rule_table(model, composites.attnlrp(), x)
    assert repr(table.rule_of("inner.norm")).startswith("normalization")


def _encoder_decoder(kind: str) -> tuple[nn.Module, int]:
    transformers = pytest.importorskip("transformers")
    if kind == "t5":
        config = transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8,
                                       vocab_size=50, attn_implementation="eager")
        return transformers.T5ForConditionalGeneration(config), 16
    config = transformers.BartConfig(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1,
                                     decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                     vocab_size=50, max_position_embeddings=32)
    return transformers.BartForConditionalGeneration(config), 16


class FromDecoderEmbeddings(nn.Module):
    """An encoder-decoder fed token ids, attributed to the decoder's input embeddings: the whole encoder runs on
    constants."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, decoder_inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, decoder_inputs_embeds=decoder_inputs_embeds, use_cache=False).logits


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoders_with_a_constant_encoder(kind: str) -> None:
    torch.manual_seed(2)
    inner, width = _encoder_decoder(kind)
    model = FromDecoderEmbeddings(inner.to(D).eval())
    ids, embeds = torch.randint(0, 50, (2, 5)), torch.randn(2, 3, width, dtype=D)
    expected = model(ids, embeds)
    output, (r_ids, r_embeds) = lrpfunc.attribute(model, composites.attnlrp())(_params(model), (ids, embeds),
                                                                               torch.ones_like(expected))
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(r_ids, torch.zeros_like(ids))
    assert torch.isfinite(r_embeds).all() and r_embeds.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# a rule of None in a map: no rule, and stop looking
# ------------------------------------------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(D)


def test_none_in_a_name_map_opts_out_of_later_composites() -> None:
    model = _mlp()
    x, g = torch.randn(2, 4, dtype=D), torch.randn(2, 3, dtype=D)
    composite = composites.mixed([composites.name_map([(("0", "2"), None)]), composites.epsilon_plus(epsilon=0.5)])
    table = lrpfunc.rule_table(model, composite, x)
    assert table.rule_of("0") is None and table.rule_of("2") is None
    assert repr(table.rule_of("1")) == "passthrough"
    # no rule anywhere (the operations inside the modules included): the true input gradient
    composite = composites.mixed([composites.name_map([(("0", "1", "2"), None)]), composites.epsilon_plus(epsilon=0.5)])
    table = lrpfunc.rule_table(model, composite, x)
    assert all(rule is None for _, rule in table), str(table)
    _, relevance = lrpfunc.attribute(model, composite)(_params(model), x, g)
    expected = torch.func.vjp(model, x)[1](g)[0]
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)


def test_none_in_a_layer_map_stops_at_that_entry() -> None:
    model = _mlp()
    x = torch.randn(2, 4, dtype=D)
    eps = rules.epsilon(0.25)
    composite = composites.layer_map([(nn.Linear, None), (nn.Linear, eps), (nn.ReLU, rules.passthrough())])
    table = lrpfunc.rule_table(model, composite, x)
    assert table.rule_of("0") is None and table.rule_of("2") is None
    # the named composites' own entries come after the caller's: None there wins over epsilon on dense layers
    table = lrpfunc.rule_table(model, composites.epsilon_plus(layer_map=[(nn.Linear, None)]), x)
    assert table.rule_of("0") is None and table.rule_of("2") is None
    assert table.rule_of("0/linear") is None and repr(table.rule_of("1")) == "passthrough"


def test_none_for_a_module_keeps_its_true_gradient_under_attnlrp() -> None:
    torch.manual_seed(4)
    model = LearnedQuery().to(D)
    x, g = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    params = _params(model)
    plain = torch.func.vjp(model, x)[1](g)[0]
    opted = composites.attnlrp(layer_map=[(LearnedQuery, None)])  # the whole model: every site inside it too
    torch.testing.assert_close(lrpfunc.attribute(model, opted)(params, x, g)[1], plain, rtol=1e-12, atol=1e-14)


def test_none_in_a_first_map_takes_the_first_layer() -> None:
    model = _mlp()
    x = torch.randn(2, 4, dtype=D)
    composite = composites.epsilon_plus_flat(first_map=[(nn.Linear, None)])
    table = lrpfunc.rule_table(model, composite, x)
    assert table.rule_of("0") is None
    assert repr(table.rule_of("2")).startswith("epsilon")
    nested = composites.mixed([composites.first_layer_map([(nn.Linear, None)], composites.layer_map([])),
                               composites.epsilon_plus()])
    table = lrpfunc.rule_table(model, nested, x)
    assert table.rule_of("0") is None and repr(table.rule_of("2")).startswith("epsilon")


def test_none_in_a_map_of_a_composite_without_resolver() -> None:
    class ListOnly:
        """A composite with only ``resolve(sites)``."""

        def resolve(self, sites):
            return [rules.epsilon(0.5) if isinstance(site.module, nn.Linear) else None for site in sites]

    model = _mlp()
    x = torch.randn(2, 4, dtype=D)
    composite = composites.mixed([composites.name_map([("2", None)]), ListOnly()])
    table = lrpfunc.rule_table(model, composite, x)
    assert repr(table.rule_of("0")).startswith("epsilon") and table.rule_of("2") is None


def test_a_rule_that_is_neither_callable_nor_none_is_refused() -> None:
    with pytest.raises(TypeError, match="must be callable, got int .give a rule, or None for no rule."):
        composites.name_map([("0", 3)])


# ------------------------------------------------------------------------------------------------------------
# integer inputs beside float ones
# ------------------------------------------------------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode="mean")
        self.lin = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.bag(ids, offsets) * x))


class BagOfFixedLength(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode="sum", padding_idx=-1)
        self.lin = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.bag(ids) + x)


def _bag_cases() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    torch.manual_seed(5)
    x = torch.randn(2, 4, dtype=D)
    return {
        "offsets": (Bag().to(D), (torch.tensor([1, 2, 4, 5, 4, 3]), torch.tensor([0, 3]), x)),
        "fixed_length": (BagOfFixedLength().to(D), (torch.tensor([[1, 9, 4], [5, 4, 3]]), x)),
    }


@pytest.mark.parametrize("composite", ["none", "epsilon_plus"])
@pytest.mark.parametrize("case", ["offsets", "fixed_length"])
def test_embedding_bags_with_integer_inputs_on_every_tape(case: str, composite: str) -> None:
    model, inputs = _bag_cases()[case]
    chosen = None if composite == "none" else composites.epsilon_plus()
    params = _params(model)  # requiring grad: the exact tapes
    g = torch.randn(2, 3, dtype=D)
    detached = {name: value.detach() for name, value in params.items()}
    expected_output = model(*inputs)
    gradient = torch.func.vjp(lambda x: torch.func.functional_call(model, detached, (*inputs[:-1], x)), inputs[-1])[1](g)[0]
    results = []
    for tape in TAPES:
        with _tape.forced(tape):
            output, relevance = lrpfunc.attribute(model, chosen)(params, inputs, g)
        torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
        for leaf, r in zip(inputs[:-1], relevance[:-1]):
            assert r.dtype == leaf.dtype and torch.equal(r, torch.zeros_like(leaf))
        if chosen is None:
            torch.testing.assert_close(relevance[-1], gradient, rtol=1e-12, atol=1e-14)
        results.append(relevance[-1])
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-14)
    assert torch.isfinite(results[0]).all()


# ------------------------------------------------------------------------------------------------------------
# compiled submodules and activation checkpointing
# ------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    """``out(block(x))``; ``wrap`` says how the block is called: ``"plain"``, ``"compiled"`` (a ``torch.compile``'d
    submodule), ``"checkpoint"`` or ``"reentrant"`` (``torch.utils.checkpoint``)."""

    def __init__(self, block: nn.Module, out: nn.Module, wrap: str) -> None:
        super().__init__()
        self.block = torch.compile(block) if wrap == "compiled" else block
        self.out = out
        self.wrap = wrap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wrap in ("checkpoint", "reentrant"):
            hidden = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.wrap == "reentrant")
        else:
            hidden = self.block(x)
        return self.out(hidden)


def _wrapped(wrap: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(6)
    block = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh()).to(D)
    out = nn.Linear(5, 2).to(D)
    with warnings.catch_warnings():  # torch.compile's first call imports modules that warn of deprecated torch.jit
        warnings.simplefilter("ignore", DeprecationWarning)
        return Net(block, out, "plain"), Net(block, out, wrap)


@pytest.mark.parametrize("composite", ["none", "epsilon_plus", "attnlrp"])
@pytest.mark.parametrize("wrap", ["compiled", "checkpoint", "reentrant"])
def test_compiled_and_checkpointed_blocks_give_the_plain_result(wrap: str, composite: str) -> None:
    plain, wrapped = _wrapped(wrap)
    make = {"none": lambda: None, "epsilon_plus": composites.epsilon_plus, "attnlrp": composites.attnlrp}[composite]
    x, g = torch.randn(3, 4, dtype=D), torch.randn(3, 2, dtype=D)
    expected_output, expected = lrpfunc.attribute(plain, make())(_params(plain), x, g)
    for tape in TAPES:
        with _tape.forced(tape):
            output, relevance = lrpfunc.attribute(wrapped, make())(_params(wrapped), x, g)
        torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wrap", ["compiled", "checkpoint"])
def test_compiled_and_checkpointed_blocks_differentiate_and_report(wrap: str) -> None:
    plain, wrapped = _wrapped(wrap)
    x, g = torch.randn(3, 4, dtype=D), torch.randn(3, 2, dtype=D)

    def loss(model: nn.Module) -> torch.Tensor:
        fn = lrpfunc.attribute(model, composites.epsilon_plus())
        return torch.func.grad(lambda x: fn(_params(model), x, g)[1].pow(2).sum())(x)

    torch.testing.assert_close(loss(wrapped), loss(plain), rtol=1e-12, atol=1e-14)
    report = lrpfunc.conservation(wrapped, composites.epsilon_plus())(_params(wrapped), x, g)
    reference = lrpfunc.conservation(plain, composites.epsilon_plus())(_params(plain), x, g)
    assert report.total_out == pytest.approx(reference.total_out, rel=1e-12)
    if wrap == "checkpoint":  # outside an attribution the checkpoint is back (compiling the block would take seconds)
        torch.testing.assert_close(wrapped(x), plain(x), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# empty batches
# ------------------------------------------------------------------------------------------------------------


class Normalized(nn.Module):
    """Convolution, GroupNorm, a LayerNorm over channels last, softmax: the normalisations' rules on an empty batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.group = nn.GroupNorm(2, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.group(torch.relu(self.conv(x))).mean((2, 3))
        return torch.softmax(self.head(self.norm(hidden)), -1)


def _empty_cases() -> dict[str, tuple[nn.Module, object, tuple]]:
    from models import cnn, randomize_batchnorms

    torch.manual_seed(7)
    small_cnn = cnn().to(D).eval()
    randomize_batchnorms(small_cnn)
    return {
        "cnn": (small_cnn, composites.epsilon_plus_flat(), (lrpfunc.canonizers.merge_batchnorm(),)),
        "cnn_gamma_box": (small_cnn, composites.epsilon_gamma_box(-3.0, 3.0), ()),
        "normalized": (Normalized().to(D).eval(), composites.attnlrp(epsilon=1e-6, stabilizer=1e-6), ()),
    }


@pytest.mark.parametrize("case", ["cnn", "cnn_gamma_box", "normalized"])
def test_an_empty_batch(case: str) -> None:
    model, composite, canonizer_list = _empty_cases()[case]
    x = torch.randn(0, 3, 8, 8, dtype=D)
    g = torch.zeros_like(model(x))
    params = _params(model)
    report = lrpfunc.conservation(model, composite, canonizer_list)(params, x, g)
    assert report.total_in == 0 and report.total_out == 0
    assert report.rows and all(row.relevance_in == 0 and row.relevance_out == 0 for row in report.rows)
    assert report.leaks() == []
    str(report)
    for chosen in (None, composite):
        for tape in TAPES:
            with _tape.forced(tape):
                output, relevance = lrpfunc.attribute(model, chosen, canonizer_list)(params, x, g)
            assert output.shape == g.shape and relevance.shape == x.shape
    # nothing differentiates the result: the rules may leave out terms that are exactly zero, which reads the input
    detached = {name: value.detach() for name, value in params.items()}
    with torch.no_grad():
        _, relevance = lrpfunc.attribute(model, composite, canonizer_list)(detached, x, g)
    assert relevance.shape == x.shape
