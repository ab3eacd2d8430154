"""Recomputed calls (the memory mode): a block's call holds only its inputs and outputs in the forward pass and is
attributed by running it again in the sweep; the relevance and its derivatives equal one pass over the whole model."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import lrpfunc
import lrpfunc._attribute as attribute_module
from lrpfunc import RuleError, composites, rules

D = torch.float64


class Block(nn.Module):
    """A residual block with a norm, a gate and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.a, self.g, self.b = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.inner: weakref.ref[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        h = self.norm(x)
        inner = torch.relu(self.a(h)) * torch.sigmoid(self.g(h))
        self.inner = weakref.ref(inner)
        return x + self.b(inner) * scale


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, scale=0.5)
        return self.out(h)


def _setup() -> tuple[Stack, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Stack().to(D)
    params = {name: p.detach() for name, p in model.named_parameters()}
    return model, params, torch.randn(5, 4, dtype=D), torch.randn(5, 3, dtype=D)


COMPOSITES = [composites.attnlrp(), composites.cp_lrp(), composites.epsilon_plus(), composites.epsilon()]


@pytest.mark.parametrize("composite", COMPOSITES, ids=repr)
def test_recomputed_blocks_equal_one_pass(composite) -> None:
    model, params, x, g = _setup()
    recomputed = composites.recompute_layers(composite, Block)
    output, relevance = lrpfunc.attribute(model, composite)(params, x, g)
    output_r, relevance_r = lrpfunc.attribute(model, recomputed)(params, x, g)
    assert relevance.abs().max() > 0.1
    torch.testing.assert_close(output_r, output, rtol=0, atol=0)
    torch.testing.assert_close(relevance_r, relevance, rtol=1e-12, atol=1e-14)

    def loss(fn, v: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn(p, v, g)[1].square().sum()

    one, split = lrpfunc.attribute(model, composite), lrpfunc.attribute(model, recomputed)
    for argnums in (0, 1):  # the input and the parameters
        expected = torch.func.grad(lambda v, p: loss(one, v, p), argnums=argnums)(x, params)
        got = torch.func.grad(lambda v, p: loss(split, v, p), argnums=argnums)(x, params)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_parameter_relevance_through_recomputed_blocks() -> None:
    model, params, x, g = _setup()
    composite = composites.epsilon_plus()
    _, relevance, by_param = lrpfunc.attribute_with_params(model, composite)(params, x, g)
    _, relevance_r, by_param_r = lrpfunc.attribute_with_params(
        model, composites.recompute_layers(composite, Block)
    )(params, x, g)
    torch.testing.assert_close(relevance_r, relevance, rtol=1e-12, atol=1e-14)
    assert set(by_param_r) == set(by_param)
    for name, value in by_param.items():
        torch.testing.assert_close(by_param_r[name], value, rtol=1e-12, atol=1e-14, msg=name)


def test_gradcheck_through_recomputed_blocks() -> None:
    model, params, x, g = _setup()
    fn = lrpfunc.attribute(model, composites.recompute_layers(composites.attnlrp(), Block))
    assert torch.autograd.gradcheck(lambda v: fn(params, v, g)[1], x.requires_grad_())


def test_the_forward_pass_holds_nothing_inside_a_recomputed_block(monkeypatch) -> None:
    model, params, x, g = _setup()
    alive: list[bool] = []
    sweep = attribute_module.sweep

    def checked(trace, *args, **kwargs):
        if not alive:  # the outer sweep (the blocks' own attributions run the engine again)
            alive.extend(block.inner() is not None for block in model.blocks if block.inner is not None)
        return sweep(trace, *args, **kwargs)

    monkeypatch.setattr(attribute_module, "sweep", checked)
    lrpfunc.attribute(model, composites.recompute_layers(composites.epsilon_plus(), Block))(params, x, g)
    assert alive == [False, False, False]
    alive.clear()
    lrpfunc.attribute(model, composites.epsilon_plus())(params, x, g)
    assert alive == [True, True, True]  # in one pass the rule of the layer that reads it holds it


def test_recompute_refuses_an_operation_and_an_input_read_from_elsewhere() -> None:
    _, _, x, g = _setup()
    on_add = composites.mixed([composites.layer_map([(torch.add, rules.recompute(composites.epsilon()))]),
                               composites.epsilon()])

    class Adds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            h = self.lin(v)
            return torch.add(h, h)

    adds = Adds().to(D)
    with pytest.raises(RuleError, match=r"rule recompute runs a module again; operation add 'add' is an operation"):
        lrpfunc.attribute(adds, on_add)({n: p.detach() for n, p in adds.named_parameters()}, x, g)

    class WithClosure(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 4)
            self.closure = Reads(self)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            self.hidden = self.second(v)
            return self.closure(self.first(v))

    class Reads(nn.Module):
        def __init__(self, owner: nn.Module) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.owner = [owner]  # not a submodule

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.lin(h + self.owner[0].hidden)

    reading = WithClosure().to(D)
    composite = composites.recompute_layers(composites.epsilon(), Reads)
    with pytest.raises(RuleError, match=r"recomputes Reads 'closure' from its arguments, but the call read activation "
                                        r"input\(s\) \[1\] from elsewhere"):
        lrpfunc.attribute(reading, composite)({n: p.detach() for n, p in reading.named_parameters()}, x, g)


def test_recompute_layers_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"recompute_layers: give at least one module type"):
        composites.recompute_layers(composites.attnlrp())
    with pytest.raises(TypeError, match=r"recompute_layers: expected a composite, got Block"):
        composites.recompute_layers(Block(), Block)  # type: ignore[arg-type]


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("composite", [composites.attnlrp(), composites.cp_lrp()], ids=repr)
def test_recompute_layers_of_a_huggingface_model(family: str, composite) -> None:
    import lrpfunc.hf

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=4, bos_token_id=0,
                                         eos_token_id=0, attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(config)
    model = model.to(D).eval()
    ids = torch.randint(64, (2, 10), generator=torch.Generator().manual_seed(1))
    one = lrpfunc.hf.attribute_tokens(model, composite)(ids, target=5)
    split = lrpfunc.hf.attribute_tokens(model, lrpfunc.hf.recompute_layers(model, composite))(ids, target=5)
    assert one.tokens.abs().max() > 1e-3
    torch.testing.assert_close(split.tokens, one.tokens, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.logits, one.logits, rtol=0, atol=0)


def test_recompute_layers_of_a_model_without_layer_types() -> None:
    import lrpfunc.hf

    with pytest.raises(ValueError, match=r"recompute_layers: Stack names no layer types \(_no_split_modules\)"):
        lrpfunc.hf.recompute_layers(Stack(), composites.attnlrp())

