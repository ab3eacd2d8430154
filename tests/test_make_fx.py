"""The attribution is a traceable torch program: ``make_fx`` records it as a graph of aten operations that gives the
eager result on a new input (the engine reads no tensor value into Python; what it skips, it knows from the record)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import lrpfunc
import lrpfunc.hf
from lrpfunc import Call, canonizers, composites, rules

D = torch.float64


def _check_traced(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], params: dict[str, torch.Tensor],
                  x: object, new_x: object, grad_output: torch.Tensor) -> int:
    graph = make_fx(fn)(params, x, grad_output)
    for value in (x, new_x):
        traced, eager = graph(params, value, grad_output), fn(params, value, grad_output)
        for got, expected in zip(torch.utils._pytree.tree_leaves(traced), torch.utils._pytree.tree_leaves(eager)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(graph(params, x, grad_output)[0], graph(params, new_x, grad_output)[0])
    return len(graph.graph.nodes)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_make_fx_traces_every_zoo_model(name: str) -> None:
    model, x = zoo.build(name), zoo.example_input(name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grad_output = zoo.target_of(name, model(x).detach())
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())
    assert _check_traced(fn, params, x, zoo.example_input(name, seed=1), grad_output) > 0


transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(D).eval()


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(D).eval()


def _bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, max_position_embeddings=32,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).to(D).eval()


@pytest.mark.parametrize("composite", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("build", [_llama, _gpt2, _bert], ids=["llama", "gpt2", "bert"])
def test_make_fx_traces_transformers(build: Callable[[], nn.Module], composite: str) -> None:
    model = lrpfunc.hf.FromEmbeddings(build())
    params = {k: v.detach() for k, v in model.named_parameters()}
    torch.manual_seed(1)
    # decoders with an attention mask: without one, transformers reads their position ids into Python (packed
    # sequences); BERT without one: with one, it reads the mask (whether it can be skipped). That is the model's own
    # data-dependent control flow, not the attribution's
    mask = () if build is _bert else (torch.ones(2, 5, dtype=torch.long),)
    x, new_x = (torch.randn(2, 5, 32, dtype=D), *mask), (torch.randn(2, 5, 32, dtype=D), *mask)
    output = model(*x).detach()
    grad_output = torch.zeros_like(output)
    if output.ndim == 3:  # a language model: the logit of token 3 at the last position
        grad_output[:, -1, 3] = 1.0
    else:  # a classifier: class 1
        grad_output[:, 1] = 1.0
    fn = lrpfunc.attribute(model, getattr(composites, composite)())
    _check_traced(fn, params, x, new_x, grad_output)


# ----------------------------------------------------------------------------------------------------------------
# the static fact that replaces the value check: which inputs are known non-negative
# ----------------------------------------------------------------------------------------------------------------


class _Seen:
    """A rule that records ``call.nonnegative_inputs`` and passes the relevance on unchanged."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[bool, ...]] = {}

    def __call__(self, call: Call, grad_outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.seen[call.name] = call.nonnegative_inputs
        return tuple(torch.zeros_like(x) for x in call.inputs)


class Signs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.Conv2d(2, 3, 3, padding=1)
        self.after_relu = nn.Conv2d(3, 3, 3, padding=1)
        self.after_pool = nn.Conv2d(3, 3, 1)
        self.after_clamp = nn.Conv2d(3, 3, 1)
        self.after_tanh = nn.Conv2d(3, 3, 1)
        self.after_shift = nn.Conv2d(3, 3, 1)
        self.after_fill = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.raw(x))
        h = self.after_relu(h)
        h = self.after_pool(torch.cat([F.max_pool2d(torch.relu(h), 2), F.avg_pool2d(torch.relu(h), 2)], 2))
        h = self.after_clamp(h.clamp(min=0.0))
        h = self.after_tanh(torch.tanh(h))
        h = self.after_shift(torch.relu(h) - 1.0)
        return self.after_fill(torch.relu(h).masked_fill(h > 0.5, -3.0))



def test_nonnegative_inputs_are_known_from_the_operations_that_made_them() -> None:
    model = Signs().to(D)
    seen = _Seen()
    fn = lrpfunc.attribute(model, composites.layer_map([(nn.Conv2d, seen)]))
    x = torch.randn(2, 2, 8, 8, dtype=D).abs()  # non-negative values, but nothing in the record says so
    fn(dict(model.named_parameters()), x, torch.ones_like(model(x)))
    assert seen.seen == {
        "raw": (False,),
        "after_relu": (True,),
        "after_pool": (True,),  # max and average pools of ReLU outputs, concatenated
        "after_clamp": (True,),
        "after_tanh": (False,),
        "after_shift": (False,),  # a constant subtracted
        "after_fill": (False,),  # a fill value of its own
    }


def test_skipping_known_zero_terms_keeps_the_result() -> None:
    """z+ after a ReLU leaves out the negative part's term; the result equals the rule computing every term."""
    model, x = zoo.build("resnet_basic"), zoo.example_input("resnet_basic")
    params = {k: v.detach() for k, v in model.named_parameters()}
    grad_output = zoo.target_of("resnet_basic", model(x).detach())
    fn = lrpfunc.attribute(model, composites.epsilon_plus_flat(), canonizers.merge_batchnorm())
    with torch.no_grad():
        fast = fn(params, x, grad_output)[1]
    every_term = composites.epsilon_plus_flat(layer_map=[((nn.Conv2d,), rules.zplus())])
    exact = lrpfunc.attribute(model, every_term, canonizers.merge_batchnorm())
    with torch.enable_grad():  # something could differentiate the result: every term is computed
        slow = exact({k: v.clone().requires_grad_() for k, v in params.items()}, x, grad_output)[1]
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-14)
