"""Error messages: what was expected, what came, and where (module names, shapes, parameter names)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import ParamMod, RuleError, canonizers, composites, rules, types

D = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(D)


def _call(model: nn.Module, composite=None, canonizer_list=(), x=None, grad_output=None, params=None):
    x = torch.randn(2, 4, dtype=D) if x is None else x
    grad_output = torch.ones(2, 2, dtype=D) if grad_output is None else grad_output
    params = dict(model.named_parameters()) if params is None else params
    return lrpfunc.attribute(model, composite, canonizer_list)(params, x, grad_output)


# --------------------------------------------------------------------------------------------------------
# grad_output
# --------------------------------------------------------------------------------------------------------


def test_grad_output_of_wrong_shape_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"grad_output must have the output's shape \(2, 2\), got \(2, 3\)"):
        _call(_mlp(), grad_output=torch.ones(2, 3, dtype=D))
    with pytest.raises(ValueError, match=r"grad_output must have the output's shape \(2, 2\), got \(2,\)"):
        _call(_mlp(), composites.epsilon_plus(), grad_output=torch.ones(2, dtype=D))


def test_grad_output_error_names_the_transform_and_the_model() -> None:
    with pytest.raises(ValueError, match=r"^attribute\(Sequential, composite\): grad_output"):
        _call(_mlp(), grad_output=torch.ones(1, 2, dtype=D))
    model = _mlp()
    fn = lrpfunc.attribute_with_params(model, composites.epsilon_plus())
    with pytest.raises(ValueError, match=r"^attribute_with_params\(Sequential, composite\): grad_output"):
        fn(dict(model.named_parameters()), torch.randn(2, 4, dtype=D), torch.ones(2, 3, dtype=D))


def test_grad_output_that_is_not_a_tensor() -> None:
    model = _mlp()
    fn = lrpfunc.attribute(model)
    x = torch.randn(2, 4, dtype=D)
    with pytest.raises(ValueError, match=r"grad_output must have the output's shape \(2, 2\), got NoneType"):
        fn(dict(model.named_parameters()), x, None)
    with pytest.raises(ValueError, match=r"grad_output must have the output's shape \(2, 2\), got float"):
        fn(dict(model.named_parameters()), x, 1.0)
    with pytest.raises(ValueError, match=r"grad_output must have the structure of the model's output"):
        _call(_mlp(), grad_output=[torch.ones(2, 2, dtype=D)])


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.a(h), self.b(h)


def test_grad_output_leaf_of_a_tuple_output_is_named() -> None:
    model = TwoHeads().to(D)
    good = (torch.ones(2, 2, dtype=D), torch.ones(2, 5, dtype=D))
    _call(model, grad_output=good)  # the right structure works
    with pytest.raises(ValueError, match=r"grad_output \(output leaf 1\) must have the output's shape \(2, 5\), got \(2, 2\)"):
        _call(model, grad_output=(torch.ones(2, 2, dtype=D), torch.ones(2, 2, dtype=D)))
    with pytest.raises(ValueError, match=r"must have the structure of the model's output"):
        _call(model, grad_output=torch.ones(2, 2, dtype=D))
    with pytest.raises(ValueError, match=r"must have the structure of the model's output"):
        _call(model, grad_output=[torch.ones(2, 2, dtype=D), torch.ones(2, 5, dtype=D)])


# --------------------------------------------------------------------------------------------------------
# rules that cannot handle their call
# --------------------------------------------------------------------------------------------------------


def test_required_parameter_missing_names_parameter_and_module() -> None:
    weight_only = rules.basic(param_modifiers=[ParamMod(lambda w, _: w.clamp(min=0), param_keys="weight")])
    composite = composites.layer_map([(nn.ReLU, weight_only)])
    with pytest.raises(RuleError, match=r"rule basic requires parameter\(s\) 'weight' of ReLU '1', which has parameters: none"):
        _call(_mlp(), composite)
    # the message also suggests a way out
    with pytest.raises(RuleError, match=r"require_params=False"):
        _call(_mlp(), composite)


def test_required_parameter_missing_on_second_call_names_the_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.lin(self.act(x)))

    model = Twice().to(D)
    rule = rules.basic(param_modifiers=[ParamMod(lambda w, _: w, param_keys=("weight",))])
    with pytest.raises(RuleError, match=r"'weight' of Tanh 'act' \(call 2\)"):
        lrpfunc.attribute(model, composites.layer_map([(nn.Tanh, rule)]))(
            dict(model.named_parameters()), torch.randn(2, 3, dtype=D), torch.ones(2, 3, dtype=D)
        )


def test_require_params_false_and_missing_bias_do_not_raise() -> None:
    relu_rule = rules.basic(param_modifiers=[ParamMod(lambda w, _: w, param_keys="weight", require_params=False)])
    _call(_mlp(), composites.layer_map([(nn.ReLU, relu_rule)]))
    # a bias that is None exists (as an attribute) and is skipped
    model = nn.Sequential(nn.Linear(4, 2, bias=False)).to(D)
    both = rules.basic(param_modifiers=[ParamMod(lambda w, _: w.clamp(min=0), param_keys=("weight", "bias"))])
    _, relevance = _call(model, composites.layer_map([(nn.Linear, both)]))
    assert torch.isfinite(relevance).all()


def test_epsilon_on_a_module_without_parameters_modifies_nothing() -> None:
    """``param_keys=None`` means the parameters the module holds; a ReLU holds none, so epsilon applies
    (as in Zennit) with nothing to modify: ``R_in = x * relu'(x) * R / s(relu(x))``."""
    model = _mlp()
    x = torch.randn(2, 4, dtype=D)
    composite = composites.layer_map([(nn.ReLU, rules.epsilon(0.5))])
    _, relevance = _call(model, composite, x=x)
    z = model[0](x)
    a = z.clamp(min=0)
    relevance_at_a = torch.ones(2, 2, dtype=D) @ model[2].weight
    r_z = z * (z > 0) * relevance_at_a / (a + 0.5)
    torch.testing.assert_close(relevance, r_z @ model[0].weight, rtol=1e-12, atol=1e-14)


def test_passthrough_on_a_call_of_different_shapes() -> None:
    composite = composites.layer_map([(nn.Linear, rules.passthrough())])
    expected = (
        r"rule passthrough handles element-wise calls with one input and one output of the same shape; "
        r"Linear '2' has 1 input\(s\) of shape\(s\) \[\(2, 3\)\] and 1 output\(s\) of shape\(s\) \[\(2, 2\)\]"
    )
    with pytest.raises(RuleError, match=expected):
        _call(_mlp(), composite)


@pytest.mark.parametrize("rule", [rules.relu_deconvnet(), rules.relu_guided_backprop(), rules.relu_beta_smooth()])
def test_relu_rules_on_a_call_of_different_shapes(rule) -> None:
    with pytest.raises(RuleError, match=rf"rule {re.escape(repr(rule).split('(')[0])} handles element-wise calls.*Linear '2'"):
        _call(_mlp(), composites.layer_map([(nn.Linear, rule)]))


class Split(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.relu(), x.tanh()


class SplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.split = Split()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.split(self.lin(x))
        return a + b


def test_basic_rule_on_a_call_with_two_outputs() -> None:
    model = SplitNet().to(D)
    expected = (
        r"rule epsilon\(epsilon=1e-06\) handles calls with at least one activation input and exactly one "
        r"floating-point output; Split 'split' has 1 input\(s\) and 2 output\(s\)"
    )
    with pytest.raises(RuleError, match=expected):
        _call(model, composites.layer_map([(Split, rules.epsilon())]), grad_output=torch.ones(2, 4, dtype=D))


def test_rule_returning_the_wrong_number_of_relevances() -> None:
    composite = composites.layer_map([(nn.ReLU, lambda call, grads: (grads[0], grads[0]))])
    with pytest.raises(RuleError, match=r"returned 2 input relevance\(s\) for ReLU '1', which has 1 activation input\(s\)"):
        _call(_mlp(), composite)


def test_rule_returning_the_wrong_shape() -> None:
    composite = composites.layer_map([(nn.Linear, lambda call, grads: (grads[0],))])
    with pytest.raises(RuleError, match=r"relevance of shape \(2, 2\) for input 0 of Linear '2', expected shape \(2, 3\)"):
        _call(_mlp(), composite)


def test_gradient_mapper_returning_the_wrong_count() -> None:
    rule = rules.basic(input_modifiers=[lambda x: x, lambda x: x], gradient_mapper=lambda g, outputs: g, name="two")
    with pytest.raises(RuleError, match=r"rule two: the gradient mapper returned 1 tensors for 2 modified outputs of Linear '2'"):
        _call(_mlp(), composites.layer_map([(nn.Linear, rule)]))


def test_zbox_bound_that_does_not_broadcast() -> None:
    composite = composites.layer_map([(nn.Linear, rules.zbox(torch.zeros(3, dtype=D), 1.0))])
    with pytest.raises(RuleError, match=r"zbox: a bound of shape \(3,\) does not broadcast to the input's shape \(2, 4\)"):
        _call(_mlp(), composite)


def test_rule_error_is_a_runtime_error() -> None:
    assert issubclass(RuleError, RuntimeError)


# --------------------------------------------------------------------------------------------------------
# outputs, inputs and params
# --------------------------------------------------------------------------------------------------------


class Returns(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.what = what

    def forward(self, x: torch.Tensor):
        y = self.lin(x)
        if self.what == "string":
            return "not a tensor"
        if self.what == "none":
            return None
        if self.what == "tuple-with-none":
            return y, None
        return {"logits": y, "count": 3}


@pytest.mark.parametrize(
    "what, message",
    [
        ("string", r"the model's output must be a tensor \(or a pytree of tensors\), got str"),
        ("none", r"the model's output must be a tensor \(or a pytree of tensors\), got NoneType"),
        ("tuple-with-none", r"the model's output\[1\] must be a tensor \(or a pytree of tensors\), got NoneType"),
        ("dict-with-int", r"the model's output\['count'\] must be a tensor \(or a pytree of tensors\), got int"),
    ],
)
def test_output_that_is_not_a_tensor(what: str, message: str) -> None:
    model = Returns(what).to(D)
    with pytest.raises(TypeError, match=message):
        _call(model)
    with pytest.raises(TypeError, match=message):
        lrpfunc.rule_table(model, composites.epsilon_plus(), torch.randn(2, 4, dtype=D))


def test_params_with_unknown_names_are_named() -> None:
    model = _mlp()
    params = {**dict(model.named_parameters()), "0.wieght": torch.zeros(3, 4, dtype=D), "head.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"params has names that are neither parameters nor buffers of Sequential: '0.wieght', 'head.bias'"):
        _call(model, params=params)


def test_params_of_the_wrong_kind() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match=r"params must be a mapping of names to tensors like dict\(model.named_parameters\(\)\), got list"):
        _call(model, params=list(model.named_parameters()))
    with pytest.raises(TypeError, match=r"params\['0.weight'\] must be a tensor, got float"):
        _call(model, params={"0.weight": 1.0})


def test_input_that_is_not_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"x must be a tensor \(or a pytree of tensors\), got str"):
        _call(_mlp(), x="x")

    class Two(nn.Module):
        def forward(self, a, b):
            return a * b

    with pytest.raises(TypeError, match=r"x\[1\]\[0\] must be a tensor \(or a pytree of tensors\), got float"):
        lrpfunc.attribute(Two())({}, (torch.ones(2), [1.0, 2.0]), torch.ones(2))


# --------------------------------------------------------------------------------------------------------
# set-up: model, composite, canonizers
# --------------------------------------------------------------------------------------------------------


def _plain_function(x):
    return x


@pytest.mark.parametrize("transform", [lrpfunc.attribute, lrpfunc.attribute_with_params])
def test_model_that_is_not_a_module(transform) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        transform(_plain_function)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got dict"):
        transform({"weight": torch.ones(2)})


def test_rule_table_model_that_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"^rule_table\(function, composite\): model must be a torch.nn.Module"):
        lrpfunc.rule_table(_plain_function, None, torch.ones(2))


@pytest.mark.parametrize(
    "composite, name",
    [(rules.epsilon(), "BasicRule"), ({nn.Linear: rules.epsilon()}, "dict"), ([(nn.Linear, rules.epsilon())], "list")],
)
def test_composite_of_the_wrong_type(composite, name: str) -> None:
    with pytest.raises(TypeError, match=rf"composite must be None or a composite from lrpfunc.composites .*got {name}"):
        lrpfunc.attribute(_mlp(), composite)


def test_canonizers_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"canonizers must be lrpfunc.canonizers.Canonizer instances, got function"):
        lrpfunc.attribute(_mlp(), None, [lambda record: None])
    with pytest.raises(TypeError, match=r"canonizers must be lrpfunc.canonizers.Canonizer instances, got type"):
        lrpfunc.attribute(_mlp(), None, [canonizers.MergeBatchNorm])  # the class, not an instance
    # a single canonizer (not in a sequence) is accepted
    lrpfunc.attribute(_mlp(), None, canonizers.merge_batchnorm())


def test_composite_resolving_the_wrong_number_of_rules() -> None:
    class Short:
        def resolve(self, sites):
            return [None] * (len(sites) - 1)

    with pytest.raises(ValueError, match=r"resolved 6 rules for 7 call sites"):
        _call(_mlp(), Short())


def test_composite_entries_of_the_wrong_form() -> None:
    with pytest.raises(TypeError, match=r"layer_map: each entry must be a pair \(types, rule\)"):
        composites.layer_map([nn.Linear])
    with pytest.raises(TypeError, match=r"layer_map: the rule of entry .*Linear.* must be callable, got int"):
        composites.layer_map([(nn.Linear, 3)])
    with pytest.raises(TypeError, match=r"name_map: each entry must be a pair"):
        composites.name_map(["0"])
    with pytest.raises(TypeError, match=r"mixed: expected composites, got BasicRule"):
        composites.mixed([composites.epsilon_plus(), rules.epsilon()])


def test_rule_table_lookup_of_an_absent_site() -> None:
    table = lrpfunc.rule_table(_mlp(), composites.epsilon_plus(), torch.randn(2, 4, dtype=D))
    with pytest.raises(KeyError, match=r"no call site named 'nope' \(call 1\)"):
        table.rule_of("nope")
    with pytest.raises(KeyError, match=r"no call site named '1' \(call 2\)"):
        table.rule_of("1", call_index=1)


# --------------------------------------------------------------------------------------------------------
# rule and canonizer arguments
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, beta", [(2.0, 2.0), (1.0, 1.0), (3.0, 1.0), (0.5, 0.0)])
def test_alpha_beta_must_differ_by_one(alpha: float, beta: float) -> None:
    with pytest.raises(ValueError, match=rf"alpha_beta: alpha - beta must equal 1, got alpha={alpha}, beta={beta}"):
        rules.alpha_beta(alpha, beta)


def test_alpha_beta_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match=r"alpha and beta must be non-negative, got alpha=0.5, beta=-0.5"):
        rules.alpha_beta(0.5, -0.5)


@pytest.mark.parametrize("alpha, beta", [(1.4, 0.4), (1.0, 0.0), (2.0, 1.0), (1.1, 0.1)])
def test_alpha_beta_accepts_differences_of_one_up_to_rounding(alpha: float, beta: float) -> None:
    rule = rules.alpha_beta(alpha, beta)
    _, relevance = _call(_mlp(), composites.layer_map([(nn.Linear, rule)]))
    assert torch.isfinite(relevance).all()


def test_merge_batchnorm_on_a_training_mode_batchnorm() -> None:
    """Documented: ``ValueError`` at attribution time for a BatchNorm in training mode that would be merged."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).to(D).train()
    expected = (
        r"merge_batchnorm: BatchNorm2d '1' runs in training mode \(batch statistics\), which cannot be folded "
        r"into '0'. Call model.eval\(\) first"
    )
    with pytest.raises(ValueError, match=expected):
        lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.merge_batchnorm())(
            dict(model.named_parameters()), torch.randn(2, 1, 5, 5, dtype=D), torch.ones(2, 2, 3, 3, dtype=D)
        )


def test_merge_batchnorm_on_a_batchnorm_without_running_statistics() -> None:
    """``track_running_stats=False`` always normalises with batch statistics, even in eval mode."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)).to(D).eval()
    with pytest.raises(ValueError, match=r"merge_batchnorm: BatchNorm2d '1' runs in training mode"):
        lrpfunc.attribute(model, composites.epsilon_plus(), canonizers.resnet())(
            dict(model.named_parameters()), torch.randn(2, 1, 5, 5, dtype=D), torch.ones(2, 2, 3, 3, dtype=D)
        )


def test_basic_modifier_lists() -> None:
    with pytest.raises(ValueError, match=r"basic: the modifier lists must have the same length, got \{'input_modifiers': 2, 'param_modifiers': 1\}"):
        rules.basic(input_modifiers=[lambda x: x, lambda x: x], param_modifiers=[ParamMod()])
    with pytest.raises(ValueError, match=r"basic: the modifier lists must not be empty"):
        rules.basic(input_modifiers=[])


def test_param_mod_arguments() -> None:
    with pytest.raises(TypeError, match=r"ParamMod: modifier must be callable, got int"):
        ParamMod(3)
    with pytest.raises(TypeError, match=r"ParamMod.ensure: expected a ParamMod or a callable, got str"):
        ParamMod.ensure("weight")
    with pytest.raises(TypeError, match=r"ParamMod.ensure: expected a ParamMod or a callable, got str"):
        rules.basic(param_modifiers=["weight"])


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_softplus_beta_must_be_positive(beta: float) -> None:
    with pytest.raises(ValueError, match=rf"softplus: beta must be positive, got {beta}"):
        canonizers.softplus(beta)


def test_stabilizer_arguments() -> None:
    with pytest.raises(TypeError, match=r"stabilizer: expected a float or a callable, got True"):
        rules.epsilon(True)
    with pytest.raises(TypeError, match=r"stabilizer: expected a float or a callable, got str"):
        rules.zplus("1e-6")


def test_errors_inside_transforms_keep_their_message() -> None:
    model = _mlp()
    fn = lrpfunc.attribute(model, composites.layer_map([(types.Linear, rules.passthrough())]))
    params = dict(model.named_parameters())
    x = torch.randn(3, 4, dtype=D)
    # the sweep runs backwards: the last Linear is the first call the rule meets; vmap shows per-sample shapes
    with pytest.raises(RuleError, match=r"rule passthrough handles element-wise calls.*Linear '2' has 1 input\(s\) of shape\(s\) \[\(3,\)\]"):
        torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x, torch.ones(3, 2, dtype=D))
    with pytest.raises(RuleError, match=r"rule passthrough handles element-wise calls.*Linear '2' has 1 input\(s\) of shape\(s\) \[\(3, 3\)\]"):
        torch.func.grad(lambda x: fn(params, x, torch.ones(3, 2, dtype=D))[1].sum())(x)


def test_tied_parameters_given_two_different_tensors() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(3, 3, bias=False)
            self.l2 = nn.Linear(3, 3, bias=False)
            self.l2.weight = self.l1.weight

        def forward(self, x):
            return self.l2(self.l1(x))

    model = Tied().to(D)
    fn = lrpfunc.attribute(model)
    params = {"l1.weight": torch.randn(3, 3, dtype=D), "l2.weight": torch.randn(3, 3, dtype=D)}
    with pytest.raises(ValueError, match=r"different tensors for the tied names 'l1.weight', 'l2.weight'"):
        fn(params, torch.randn(2, 3, dtype=D), torch.ones(2, 3, dtype=D))
