"""Mixtures of experts: the routing weights (softmax, top-k, renormalised) and the experts gathered by ``index_add`` or
run at once by ``grouped_mm``, under CP-LRP and AttnLRP, against the rules written out by hand (float64), and on
HuggingFace's Mixtral and Qwen3-MoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
from lrpfunc import composites, ops, rules

D = torch.float64


def _half(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its gradient halved (the uniform rule on a product of two activations, in gradient form)."""
    return 0.5 * x + 0.5 * x.detach()


def _identity_rule(activation, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)`` with the gradient ``activation(x) / x`` (the identity rule, in gradient form)."""
    return x * (activation(x) / x).detach()


class MoE(nn.Module):
    """Mixtral's sparse block written out: a router (softmax, top-k, renormalised), gated SiLU experts, ``index_add``.

    ``rules_by_hand``: the same function with AttnLRP's (``"attnlrp"``) or CP-LRP's (``"cp_lrp"``) modified gradients
    written into it (products halved or gates detached, the identity rule on SiLU, the denominator of the
    renormalisation held, the softmax and everything linear with their true gradients), so that ``x * grad`` is the
    rule's relevance (gradient times input, as LXT computes it)."""

    def __init__(self, hidden: int = 6, inner: int = 8, experts: int = 4, top: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.gate = nn.ModuleList([nn.Linear(hidden, inner, bias=False) for _ in range(experts)])
        self.up = nn.ModuleList([nn.Linear(hidden, inner, bias=False) for _ in range(experts)])
        self.down = nn.ModuleList([nn.Linear(inner, hidden, bias=False) for _ in range(experts)])
        self.top = top
        self.rules_by_hand: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        by_hand = self.rules_by_hand
        probs = F.softmax(self.router(x), dim=-1)
        weights, chosen = torch.topk(probs, self.top, dim=-1)
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total.detach() if by_hand else total)
        if by_hand == "cp_lrp":
            weights = weights.detach()
        out = torch.zeros_like(x)
        for expert in range(len(self.gate)):
            rows, slot = torch.where(chosen == expert)
            if rows.numel() == 0:
                continue
            h = x[rows]
            gate = self.gate[expert](h)
            activated = _identity_rule(F.silu, gate) if by_hand else F.silu(gate)
            if by_hand == "cp_lrp":
                inner = activated.detach() * self.up[expert](h)
            elif by_hand == "attnlrp":
                inner = _half(activated) * _half(self.up[expert](h))
            else:
                inner = activated * self.up[expert](h)
            expert_out = self.down[expert](inner)
            weight = weights[rows, slot, None]
            if by_hand == "attnlrp":
                contribution = _half(expert_out) * _half(weight)
            else:
                contribution = expert_out * weight
            out = out.index_add(0, rows, contribution)
        return out


def _by_hand(model: MoE, rule: str, x: torch.Tensor) -> torch.Tensor:
    """Gradient times input of the rewritten forward, seeded with ones: the relevance of every output's value."""
    leaf = x.detach().clone().requires_grad_()
    model.rules_by_hand = rule
    try:
        (grad,) = torch.autograd.grad(model(leaf).sum(), leaf)
    finally:
        model.rules_by_hand = None
    return leaf.detach() * grad


def _moe() -> tuple[MoE, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MoE().to(D)
    x = torch.randn(7, 6, dtype=D)
    with torch.no_grad():
        seed = model(x)  # the relevance seeded at each output: its value
    return model, {name: p.detach() for name, p in model.named_parameters()}, x, seed


@pytest.mark.parametrize("name", ["cp_lrp", "attnlrp"])
def test_a_mixture_of_experts_layer_equals_the_rules_by_hand(name: str) -> None:
    model, params, x, seed = _moe()
    composite = composites.cp_lrp() if name == "cp_lrp" else composites.attnlrp()
    _, relevance = lrpfunc.attribute(model, composite)(params, x, seed)
    expected = _by_hand(model, name, x)
    torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)
    _, in_relevance_form, _ = lrpfunc.attribute_with_params(model, composite)(params, x, seed)
    torch.testing.assert_close(in_relevance_form, expected, rtol=1e-10, atol=1e-12)


def test_cp_lrp_conserves_through_a_mixture_of_experts_and_the_router_gets_nothing() -> None:
    """Bias-free: CP-LRP's relevance sums to the output's; the routing weights (top-k of a softmax, renormalised) are
    gates, so the router's parameters get no relevance."""
    model, params, x, seed = _moe()
    _, relevance, by_param = lrpfunc.attribute_with_params(model, composites.cp_lrp())(params, x, seed)
    torch.testing.assert_close(relevance.sum(), seed.sum(), rtol=1e-12, atol=0)
    assert "router.weight" not in by_param or by_param["router.weight"].abs().max() == 0
    assert by_param["up.0.weight"].abs().max() > 0


def test_explanation_loss_through_a_mixture_of_experts_gradchecks() -> None:
    model, params, x, seed = _moe()
    fn = lrpfunc.attribute(model, composites.attnlrp())
    assert torch.autograd.gradcheck(lambda v: fn(params, v, seed)[1].square().sum(), x.clone().requires_grad_())


def test_a_quotient_of_activations_gives_its_relevance_to_the_numerator() -> None:
    class Renormalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            w = torch.exp(self.lin(v))
            return w / w.sum(-1, keepdim=True)

    torch.manual_seed(1)
    model = Renormalised().to(D)
    x, seed = torch.randn(5, 3, dtype=D), torch.randn(5, 4, dtype=D)
    sites = {line.split()[1]: line.split()[-1] for line in str(lrpfunc.rule_table(model, composites.attnlrp(), x))
             .splitlines() if line.startswith("operation")}
    assert sites["'div'"] == "quotient"
    assert ops.classify(torch.div, (x, x), {}, lambda t: True).op_class is ops.Quotient
    assert ops.classify(torch.div, (x, 2.0), {}, lambda t: t is x).op_class is ops.Scale
    composite = composites.layer_map([(ops.Quotient, rules.quotient(0.0))])
    params = {name: p.detach() for name, p in model.named_parameters()}
    output, _ = lrpfunc.attribute(model, composite)(params, x, seed)
    # the quotient alone with a rule: R_numerator = R where the output is not zero, the denominator gets none; the
    # exp and the linear layer keep their true gradient (of relevance)
    _, relevance, _ = lrpfunc.attribute_with_params(model, composite)(params, x, seed * output)
    leaf = x.clone().requires_grad_()
    numerator = torch.exp(model.lin(leaf))
    (expected,) = torch.autograd.grad(numerator, leaf, seed * output)
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)


transformers = pytest.importorskip("transformers")


def _hf_moe(family: str, dtype: torch.dtype, experts: str | None) -> nn.Module:
    torch.manual_seed(0)
    if family == "mixtral":
        config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=8)
        model = transformers.Qwen3MoeForCausalLM(config)
    model = model.to(dtype).eval()
    if experts is not None:
        model.set_experts_implementation(experts)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize(("dtype", "experts", "tolerance"), [
    (torch.float32, None, 1e-5),  # transformers' default experts (grouped_mm)
    (torch.float64, "eager", 1e-6),  # a loop over experts with index_add; the RMSNorm computes in float32
], ids=["default-float32", "eager-float64"])
def test_huggingface_mixtures_of_experts(family: str, dtype: torch.dtype, experts: str | None,
                                         tolerance: float) -> None:
    import lrpfunc.hf

    if not hasattr(transformers, "Qwen3MoeConfig") or not hasattr(transformers.PreTrainedModel,
                                                                   "set_experts_implementation"):
        pytest.skip("this transformers has no Qwen3-MoE or no choice of experts implementation")
    model = _hf_moe(family, dtype, experts)
    ids = torch.randint(64, (1, 9), generator=torch.Generator().manual_seed(3))
    cp = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(ids)  # the argmax logit
    assert abs(float(cp.tokens.sum() / cp.target.squeeze()) - 1) < tolerance
    attn = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())(ids)
    assert torch.isfinite(attn.tokens).all() and attn.tokens.abs().sum() > 0
