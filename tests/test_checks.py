"""What a new user gets wrong, answered by name: dtypes, parameter shapes and prefixes, model outputs with logits,
a model in training mode, parameters that require grad for a heatmap; and the seed of a target's logit."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import composites

D = torch.float64


def _mlp(dtype: torch.dtype = D) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(dtype)


def _detached(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------
# grad_output of another dtype, parameters of another shape or with another prefix, outputs holding logits
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite", [None, composites.epsilon_plus()], ids=["no-rules", "epsilon_plus"])
def test_grad_output_of_another_dtype_names_both(composite) -> None:
    model = _mlp(torch.float32)
    fn = lrpfunc.attribute(model, composite)
    message = (
        r"attribute\(Sequential, composite\): grad_output must have the output's dtype torch\.float32, got "
        r"torch\.float64 \(convert it with \.to\(output\.dtype\), or the model with \.to\(torch\.float64\)\)"
    )
    with pytest.raises(TypeError, match=message):
        fn(_detached(model), torch.randn(2, 4), torch.ones(2, 2, dtype=D))
    with pytest.raises(TypeError, match=r"grad_output must have the output's dtype torch\.float32, got torch\.int64"):
        fn(_detached(model), torch.randn(2, 4), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(
        TypeError, match=r"conservation\(Sequential, composite\): grad_output must have the output's dtype"
    ):
        lrpfunc.conservation(model, composites.epsilon_plus())(
            _detached(model), torch.randn(2, 4), torch.ones(2, 2, dtype=D)
        )


def test_params_of_the_wrong_shape_are_named_with_their_module() -> None:
    model = _mlp()
    params = {**_detached(model), "2.weight": torch.zeros(2, 5, dtype=D)}
    message = (
        r"params\['2\.weight'\] \(Linear '2'\) must have the shape \(2, 3\) of the model's own tensor, got \(2, 5\)"
    )
    for fn in (lrpfunc.attribute(model), lrpfunc.attribute(model, composites.epsilon_plus())):
        with pytest.raises(ValueError, match=message):
            fn(params, torch.randn(2, 4, dtype=D), torch.ones(2, 2, dtype=D))


def test_params_of_the_right_shape_are_checked_per_sample_under_vmap() -> None:
    model = _mlp()
    stacked = {name: torch.stack([p, 2 * p]) for name, p in _detached(model).items()}  # an ensemble of two
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    x, seed = torch.randn(2, 4, dtype=D), torch.ones(2, 2, dtype=D)
    _, relevance = torch.func.vmap(fn, in_dims=(0, None, None))(stacked, x, seed)
    assert relevance.shape == (2, 2, 4)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_names_without_the_wrappers_prefix_say_which_prefix() -> None:
    inner = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)]).to(D)
    fn = lrpfunc.attribute(Wrapper(inner), composites.epsilon())
    message = (
        r"params has names that are neither parameters nor buffers of Wrapper: '0\.weight', '0\.bias', '1\.weight', "
        r"'1\.bias', '2\.weight' and 3 more; the model's names start with 'model\.' \(a wrapper module registers the "
        r"wrapped model under that name\): pass \{'model\.' \+ name: tensor\}"
    )
    with pytest.raises(ValueError, match=message):
        fn(_detached(inner), torch.randn(2, 4, dtype=D), torch.ones(2, 4, dtype=D))
    with pytest.raises(ValueError, match=r"the model's names have no prefix 'outer\.': drop it"):
        lrpfunc.attribute(inner)(
            {"outer.0.weight": torch.zeros(4, 4, dtype=D)}, torch.randn(2, 4, dtype=D), torch.ones(2, 4, dtype=D)
        )


def test_from_embeddings_with_the_models_own_names_says_which_prefix() -> None:
    transformers = pytest.importorskip("transformers")
    import lrpfunc.hf

    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=8)
    model = transformers.GPT2LMHeadModel(config).eval()
    fn = lrpfunc.attribute(lrpfunc.hf.FromEmbeddings(model), composites.attnlrp())
    with pytest.raises(ValueError, match=r"and \d+ more; the model's names start with 'model\.'"):
        fn(_detached(model), torch.randn(1, 3, 16), torch.ones(1, 3, 20))


@dataclass
class Output:
    logits: torch.Tensor


class ReturnsOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.linear(x))


def test_an_output_with_logits_says_how_to_attribute_them() -> None:
    model = ReturnsOutput().to(D)
    message = (
        r"attribute\(ReturnsOutput, composite\): the model's output must be a tensor \(or a pytree of tensors\), got "
        r"Output; it holds logits: attribute a module that returns them \(lrpfunc\.hf\.FromEmbeddings does"
    )
    for composite in (None, composites.epsilon()):
        with pytest.raises(TypeError, match=message):
            lrpfunc.attribute(model, composite)(_detached(model), torch.randn(2, 4, dtype=D), torch.ones(2, 2, dtype=D))


def test_integer_ids_with_a_composite_get_relevance_on_the_embedding_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).to(D)
    ids = torch.tensor([[1, 2, 3]])
    output, relevance = lrpfunc.attribute(model, composites.epsilon())(
        _detached(model), ids, torch.ones(1, 3, 3, dtype=D)
    )
    torch.testing.assert_close(output, model(ids))
    assert relevance.dtype == torch.long and not relevance.any()  # integer inputs take no relevance


# --------------------------------------------------------------------------------------------------------
# warnings: training mode, parameters that require grad
# --------------------------------------------------------------------------------------------------------


def _training_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(D)


def test_a_training_mode_model_warns_once_per_function_at_the_callers_line() -> None:
    model = _training_model()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    x, seed = torch.randn(3, 4, dtype=D), torch.ones(3, 2, dtype=D)
    message = (
        r"attribute\(Sequential, composite\): Sequential is in training mode, in which these modules compute "
        r"differently: Dropout '1' \(active\), BatchNorm1d '2' \(the batch's statistics\); two calls differ.*"
        r"Call model\.eval\(\) first.*category=lrpfunc\.TrainingModeWarning"
    )
    with pytest.warns(lrpfunc.TrainingModeWarning, match=message) as record:
        fn(_detached(model), x, seed)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(_detached(model), x, seed)  # once per attribution function
        model.eval()
        lrpfunc.attribute(model, composites.epsilon_plus())(_detached(model), x, seed)


def test_modules_that_do_not_depend_on_the_mode_do_not_warn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 2)).to(D)  # training mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrpfunc.attribute(model, composites.epsilon_plus())(
            _detached(model), torch.randn(3, 4, dtype=D), torch.ones(3, 2, dtype=D)
        )


def test_conservation_warns_of_training_mode_too() -> None:
    model = _training_model()
    with pytest.warns(
        lrpfunc.TrainingModeWarning, match=r"conservation\(Sequential, composite\): Sequential is in training mode"
    ):
        lrpfunc.conservation(model, composites.epsilon_plus())(
            _detached(model), torch.randn(3, 4, dtype=D), torch.ones(3, 2, dtype=D)
        )


@pytest.mark.filterwarnings("default::lrpfunc.ParamsRequireGradWarning")
def test_params_that_require_grad_for_a_heatmap_get_a_hint_once() -> None:
    model = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    x, seed = torch.randn(2, 4, dtype=D), torch.ones(2, 2, dtype=D)
    message = (
        r"attribute\(Sequential, composite\): params require grad, so the attribution records an exact tape.*"
        r"pass detached params \(\{k: v\.detach\(\) for k, v in model\.named_parameters\(\)\}\) or call under "
        r"torch\.no_grad\(\).*category=lrpfunc\.ParamsRequireGradWarning"
    )
    with pytest.warns(lrpfunc.ParamsRequireGradWarning, match=message) as record:
        fn(dict(model.named_parameters()), x, seed)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(dict(model.named_parameters()), x, seed)  # once per attribution function
        other = lrpfunc.attribute(model, composites.epsilon_plus())
        other(_detached(model), x, seed)  # detached: the fast path
        with torch.no_grad():
            other(dict(model.named_parameters()), x, seed)
        torch.func.grad(lambda p: other(p, x, seed)[1].sum())(_detached(model))  # a transform: no hint
        other(dict(model.named_parameters()), x.requires_grad_(), seed)  # x requires grad: a tape is needed anyway


def test_the_hint_names_a_real_speed_difference() -> None:
    """The hint's claim holds: with parameters that require grad the result is attached to them (a tape was
    recorded); detached, it is not, and the relevance is the same."""
    model = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon_plus())
    x, seed = torch.randn(2, 4, dtype=D), torch.ones(2, 2, dtype=D)
    _, attached = fn(dict(model.named_parameters()), x, seed)
    _, detached = fn(_detached(model), x, seed)
    assert attached.requires_grad and not detached.requires_grad
    torch.testing.assert_close(attached.detach(), detached)


# --------------------------------------------------------------------------------------------------------
# from_logit: the seed of a target's logit
# --------------------------------------------------------------------------------------------------------


def test_from_logit_seeds_the_target_logit_with_its_value_or_one() -> None:
    model = _mlp()
    params, x = _detached(model), torch.randn(3, 4, dtype=D)
    target = torch.tensor([0, 1, 1])
    fn = lrpfunc.attribute(model, composites.epsilon(1e-12, zero_params="bias"))
    logits = model(x).detach()
    one_hot = torch.eye(2, dtype=D)[target]
    _, by_value = fn(params, x, lrpfunc.from_logit(target))
    _, by_one = fn(params, x, lrpfunc.from_logit(target, value=False))
    torch.testing.assert_close(by_one, fn(params, x, one_hot)[1])
    torch.testing.assert_close(by_value, fn(params, x, one_hot * logits)[1])
    # bias-free epsilon rules conserve: the maps sum to the logit, or to one
    picked = logits.gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(by_value.sum(1), picked)
    torch.testing.assert_close(by_one.sum(1), torch.ones(3, dtype=D))
    _, every_row = fn(params, x, lrpfunc.from_logit(1))
    torch.testing.assert_close(every_row, fn(params, x, torch.eye(2, dtype=D)[[1, 1, 1]] * logits)[1])


def test_from_logit_is_differentiable_through_the_logits_value() -> None:
    """The value seed depends on the output: d/dx of the relevance includes the logit's own derivative, as for the
    relevance multiplied by the logit afterwards (relevance is linear in grad_output)."""
    model = _mlp()
    params, x = _detached(model), torch.randn(2, 4, dtype=D)
    fn = lrpfunc.attribute(model, composites.epsilon_plus())

    def seeded(x: torch.Tensor) -> torch.Tensor:
        return fn(params, x, lrpfunc.from_logit(1))[1].square().sum()

    def by_hand(x: torch.Tensor) -> torch.Tensor:
        output, relevance = fn(params, x, torch.eye(2, dtype=D)[[1, 1]])
        return (relevance * output[:, 1:]).square().sum()

    torch.testing.assert_close(torch.func.grad(seeded)(x), torch.func.grad(by_hand)(x))
    torch.autograd.gradcheck(seeded, (x.clone().requires_grad_(),))


def test_from_logit_in_every_transform_that_takes_grad_output() -> None:
    model = _mlp()
    params, x = _detached(model), torch.randn(2, 4, dtype=D)
    seed = lrpfunc.from_logit(torch.tensor([1, 0]), value=False)
    expected = lrpfunc.attribute(model, composites.epsilon())(params, x, torch.eye(2, dtype=D)[[1, 0]])[1]
    torch.testing.assert_close(lrpfunc.attribute(model, composites.epsilon())(params, x, seed)[1], expected)
    torch.testing.assert_close(lrpfunc.attribute_with_params(model, composites.epsilon())(params, x, seed)[1], expected)
    report = lrpfunc.conservation(model, composites.epsilon(1e-12, zero_params="bias"))(params, x, seed)
    assert abs(report.total_out / report.total_in - 1) < 1e-9
    torch.testing.assert_close(
        lrpfunc.attribute(model)(params, x, seed)[1],
        lrpfunc.attribute(model)(params, x, torch.eye(2, dtype=D)[[1, 0]])[1],
    )


def test_from_logit_errors() -> None:
    with pytest.raises(TypeError, match=r"from_logit: target must be an int or an integer tensor, got float"):
        lrpfunc.from_logit(1.0)
    with pytest.raises(TypeError, match=r"from_logit: target must be an integer tensor, got dtype torch\.float32"):
        lrpfunc.from_logit(torch.tensor([1.0]))
    model = _mlp()
    fn = lrpfunc.attribute(model, composites.epsilon())
    with pytest.raises(
        ValueError, match=r"from_logit: target of shape \(3,\) does not broadcast against the output's \(2,\)"
    ):
        fn(_detached(model), torch.randn(2, 4, dtype=D), lrpfunc.from_logit(torch.tensor([0, 1, 1])))


def test_attribute_tokens_checks_the_model_up_front() -> None:
    import lrpfunc.hf

    class NoEmbeddings(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids.float()

    class NoInputsEmbeds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(8, 4)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.embed(input_ids)

    with pytest.raises(TypeError, match=r"attribute_tokens: model must be a torch.nn.Module \(a HuggingFace model\), "
                                        r"got str"):
        lrpfunc.hf.attribute_tokens("gpt2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"attribute_tokens: NoEmbeddings has no get_input_embeddings\(\)"):
        lrpfunc.hf.attribute_tokens(NoEmbeddings())
    with pytest.raises(TypeError, match=r"attribute_tokens: NoInputsEmbeds.forward takes no inputs_embeds"):
        lrpfunc.hf.attribute_tokens(NoInputsEmbeds())
