"""The attribution is a traceable torch program: ``make_fx`` records it as a graph of aten operations that gives the
eager result on a new input (the engine reads no tensor value into Python; what it skips, it knows from the record: ``test_zero_terms.py``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import zoo
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import lrpfunc
import lrpfunc.hf
from lrpfunc import canonizers, composites

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
