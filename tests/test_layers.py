"""attribute_layers: layer relevance, masks (concept-conditional relevance), relevance that starts at a layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpfunc
from lrpfunc import composites, rules, types

D = torch.float64


class Twice(nn.Module):
    """An MLP whose ``shared`` layer is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.out(h)


def _twice() -> Twice:
    torch.manual_seed(0)
    return Twice().to(D)


def _epsilon_step(layer: nn.Linear, x: torch.Tensor, relevance: torch.Tensor, eps: float) -> torch.Tensor:
    """LRP-epsilon through one linear layer, written out: R_i = x_i sum_j w_ji R_j / (z_j + eps sign(z_j))."""
    z = x @ layer.weight.T + layer.bias
    s = z + eps * (2 * (z >= 0).to(z) - 1)
    return x * ((relevance / s) @ layer.weight)


def _written_out(model: Twice, x: torch.Tensor, seed: torch.Tensor, eps: float, masks: dict[str, torch.Tensor]):
    """The epsilon rule on every layer and ReLUs passing relevance, by hand, masking the named calls' outputs:
    returns the input relevance and the relevance arriving at each call's output (before its mask)."""
    with torch.no_grad():
        a0 = x
        a1 = torch.relu(model.inp(a0))
        a2 = torch.relu(model.shared(a1))
        a3 = torch.relu(model.shared(a2))
        at = {}
        r = _epsilon_step(model.out, a3, seed, eps)
        at["shared[1]"] = r
        r = r * masks.get("shared[1]", 1.0)
        r = _epsilon_step(model.shared, a2, r, eps)
        at["shared[0]"] = r
        r = r * masks.get("shared[0]", 1.0)
        r = _epsilon_step(model.shared, a1, r, eps)
        at["inp"] = r
        r = r * masks.get("inp", 1.0)
        r = _epsilon_step(model.inp, a0, r, eps)
    return r, at


def test_conditional_relevance_equals_the_rule_written_out_with_a_module_called_twice() -> None:
    model = _twice()
    x = torch.randn(4, 6, dtype=D)
    seed = torch.eye(3, dtype=D)[[0, 1, 2, 0]]
    eps = 0.01
    composite = composites.layer_map([(types.Linear, rules.epsilon(eps))])
    fn = lrpfunc.attribute_layers(model, composite, layers=["shared", "inp"])
    params = dict(model.named_parameters())
    torch.manual_seed(1)
    for masks in (
        {},
        {"shared[1]": (torch.rand(8, dtype=D) > 0.5).to(D)},
        {"shared[0]": torch.eye(8, dtype=D)[2], "inp": torch.eye(8, dtype=D)[[5]]},
        {"shared": torch.eye(8, dtype=D)[4]},  # every call of the module
    ):
        _, relevance, at = fn(params, x, seed, masks)
        expanded = {f"shared[{k}]": masks["shared"] for k in (0, 1)} if "shared" in masks else masks
        expected, expected_at = _written_out(model, x, seed, eps, expanded)
        assert list(at) == ["inp", "shared[0]", "shared[1]"]  # call order
        torch.testing.assert_close(relevance, expected, rtol=0, atol=1e-12)
        for name in expected_at:
            torch.testing.assert_close(at[name], expected_at[name], rtol=0, atol=1e-12)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 16, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _net() -> Net:
    torch.manual_seed(2)
    return Net().to(D)


COMPOSITE = composites.layer_map(
    [*composites.layer_map_base(), (nn.Conv2d, rules.zplus()), (nn.Linear, rules.epsilon(1e-3))]
)


def _parts(net: Net) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The network split after ``features.2`` (64 channels) and after ``features.5``."""
    return net.features[:3], nn.Sequential(*net.features[3:6]), nn.Sequential(net.features[6], net.classifier)


def test_masks_at_two_layers_equal_propagating_part_by_part() -> None:
    net = _net()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    seed = torch.eye(5, dtype=D)[[1, 4]]
    bottom, middle, top = _parts(net)
    mask_middle = torch.zeros(1, 16, 1, 1, dtype=D)
    mask_middle[0, [3, 7]] = 1.0
    mask_bottom = torch.zeros(1, 64, 1, 1, dtype=D)
    mask_bottom[0, 10:40] = 1.0
    fn = lrpfunc.attribute_layers(net, COMPOSITE, layers=["features.2", "features.5"])
    _, relevance, at = fn(dict(net.named_parameters()), x, seed, {"features.5": mask_middle, "features.2": mask_bottom})

    def part(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return lrpfunc.attribute(module, COMPOSITE)(dict(module.named_parameters()), inputs, grad)[1]

    with torch.no_grad():
        h1 = bottom(x)
        h2 = middle(h1)
    r2 = part(top, h2, seed)
    r1 = part(middle, h1, r2 * mask_middle)
    r0 = part(bottom, x, r1 * mask_bottom)
    torch.testing.assert_close(at["features.5"], r2, rtol=0, atol=1e-12)
    torch.testing.assert_close(at["features.2"], r1, rtol=0, atol=1e-12)
    torch.testing.assert_close(relevance, r0, rtol=0, atol=1e-12)


def test_relevance_given_at_a_layer_equals_the_sweep_from_there() -> None:
    net = _net()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    bottom, middle, _ = _parts(net)
    torch.manual_seed(3)
    given = torch.randn(2, 16, 4, 4, dtype=D)
    fn = lrpfunc.attribute_layers(net, COMPOSITE, layers=["features.5", "features.2"])
    _, relevance, at = fn(dict(net.named_parameters()), x, {"features.5": given})
    torch.testing.assert_close(at["features.5"], given, rtol=0, atol=0)
    with torch.no_grad():
        h1 = bottom(x)
    chain = nn.Sequential(*bottom, *middle)
    _, expected = lrpfunc.attribute(chain, COMPOSITE)(dict(chain.named_parameters()), x, given)
    torch.testing.assert_close(relevance, expected, rtol=0, atol=1e-12)
    _, r1 = lrpfunc.attribute(middle, COMPOSITE)(dict(middle.named_parameters()), h1, given)
    torch.testing.assert_close(at["features.2"], r1, rtol=0, atol=1e-12)
    # and it adds up: relevance given at two layers is the sum of the two sweeps
    other = torch.randn(2, 64, 8, 8, dtype=D)
    _, both, _ = fn(dict(net.named_parameters()), x, {"features.5": given, "features.2": other})
    _, alone, _ = fn(dict(net.named_parameters()), x, {"features.2": other})
    torch.testing.assert_close(both, relevance + alone, rtol=0, atol=1e-12)


def test_sixty_four_channel_masks_under_vmap_equal_the_loop() -> None:
    net = _net()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    seed = torch.eye(5, dtype=D)[[2]]
    params = dict(net.named_parameters())
    fn = lrpfunc.attribute_layers(net, COMPOSITE, layers=["features.2"])
    masks = torch.eye(64, dtype=D)[:, None, :, None, None]

    def concept(mask: torch.Tensor) -> torch.Tensor:
        return fn(params, x, seed, {"features.2": mask})[1]

    batched = torch.func.vmap(concept)(masks)
    loop = torch.stack([concept(mask) for mask in masks])
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-12)
    # the concepts partition the heatmap: relevance is linear in the relevance at the layer
    _, heatmap, at = fn(params, x, seed)
    torch.testing.assert_close(batched.sum(0), heatmap, rtol=0, atol=1e-12)
    # each concept's share of the layer equals its channel's relevance there (z+ conserves between the layers
    # except where z+ = 0; compare against the relevance that reaches the input through the bottom part)
    bottom = net.features[:3]
    with torch.no_grad():
        expected = torch.stack([
            lrpfunc.attribute(bottom, COMPOSITE)(dict(bottom.named_parameters()), x, at["features.2"] * mask)[1]
            for mask in masks
        ])
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-12)


def test_layer_relevance_is_conserved_layer_by_layer_without_biases() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.ReLU(),
        nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False),
    ).to(D)
    x = torch.randn(5, 12, dtype=D)
    seed = torch.eye(4, dtype=D)[[0, 1, 2, 3, 0]] * model(x).detach()
    composite = composites.layer_map([*composites.layer_map_base(), (types.Linear, rules.epsilon(1e-12))])
    fn = lrpfunc.attribute_layers(model, composite, layers=["0", "1", "2", "4", "5"])
    _, relevance, at = fn(dict(model.named_parameters()), x, seed)
    total = seed.sum(1)
    for name, value in at.items():
        torch.testing.assert_close(value.sum(1), total, rtol=1e-9, atol=1e-12, msg=f"layer {name}")
    torch.testing.assert_close(relevance.sum(1), total, rtol=1e-9, atol=1e-12)


def test_gradient_of_a_conditional_heatmap_loss_matches_finite_differences() -> None:
    net = _net()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    seed = torch.eye(5, dtype=D)[[3]]
    composite = composites.layer_map([*composites.layer_map_base(), (types.Linear, rules.epsilon(0.5))])
    fn = lrpfunc.attribute_layers(net, composite, layers=["features.2"])
    mask = torch.zeros(1, 64, 1, 1, dtype=D)
    mask[0, 5] = 1.0
    params = {k: v.detach() for k, v in net.named_parameters()}
    torch.manual_seed(5)
    weight = torch.randn_like(x)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (fn(p, x, seed, {"features.2": mask})[1] * weight).sum()

    grads = torch.func.grad(loss)(params)
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    h = 1e-6
    numeric = (
        loss({k: v + h * direction[k] for k, v in params.items()}) - loss({k: v - h * direction[k] for k, v in params.items()})
    ) / (2 * h)
    exact = sum((grads[k] * direction[k]).sum() for k in params)
    assert exact.abs() > 0
    torch.testing.assert_close(exact, numeric, rtol=1e-6, atol=1e-10)
    # w.r.t. the mask: the relevance is linear in it, so the Jacobian of its sum holds each channel's total
    jac = torch.func.jacrev(lambda m: fn(params, x, seed, {"features.2": m})[1].sum())(mask)
    channels = torch.eye(64, dtype=D)[:, None, :, None, None]
    totals = torch.stack([fn(params, x, seed, {"features.2": m})[1].sum() for m in channels[:8]])
    torch.testing.assert_close(jac.flatten()[:8], totals, rtol=1e-10, atol=1e-12)


def test_layer_relevance_of_a_transformer_block() -> None:
    transformers = pytest.importorskip("transformers")
    import lrpfunc.hf

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(6)
    model = transformers.LlamaForCausalLM(config).to(D).eval()
    wrapper = lrpfunc.hf.FromEmbeddings(model)
    embeds = model.get_input_embeddings()(torch.randint(0, 64, (1, 7))).detach()
    logits = wrapper(embeds).detach()
    seed = torch.zeros_like(logits)
    seed[0, -1, logits[0, -1].argmax()] = logits[0, -1].max()
    composite = composites.cp_lrp()  # epsilon 0: gradients between the observed layers, relevance at them
    names = ["model.model.layers.0.mlp", "model.model.layers.1"]
    fn = lrpfunc.attribute_layers(wrapper, composite, layers=names)
    params = dict(wrapper.named_parameters())
    _, relevance, at = fn(params, embeds, seed)
    _, expected = lrpfunc.attribute(wrapper, composite)(params, embeds, seed)
    # observing converts the gradient form to relevance and back at the layers: equal up to rounding
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-15)
    layer = at["model.model.layers.1"]
    layer = layer[0] if isinstance(layer, tuple) else layer
    # CP-LRP conserves: the relevance at the last block's output is the target logit
    assert abs(layer.sum().item() / seed.sum().item() - 1) < 1e-6
    # the relevance at one token position of the block's output, propagated to the embeddings (a token-to-token map)
    mask = torch.zeros(1, 7, 1, dtype=D)
    mask[0, 3] = 1.0
    _, conditional, _ = fn(params, embeds, seed, {"model.model.layers.1": mask})
    assert abs(conditional.sum().item() - layer[0, 3].sum().item()) < 1e-6 * abs(seed.sum().item())


def test_errors_name_the_layer_the_expected_and_the_received() -> None:
    net = _net()
    params = dict(net.named_parameters())
    x = torch.randn(1, 3, 8, 8, dtype=D)
    seed = torch.eye(5, dtype=D)[[0]]
    with pytest.raises(ValueError, match=r"attribute_layers\(Net, composite\): Net has no module named 'feature.2'"):
        lrpfunc.attribute_layers(net, COMPOSITE, layers=["feature.2"])
    with pytest.raises(ValueError, match=r"layers must name at least one module"):
        lrpfunc.attribute_layers(net, COMPOSITE, layers=[])
    fn = lrpfunc.attribute_layers(net, COMPOSITE, layers=["features.2"])
    with pytest.raises(ValueError, match=r"masks\['features.2'\] must broadcast to the output of 'features.2', "
                                         r"\(1, 64, 8, 8\), got \(1, 63, 1, 1\)"):
        fn(params, x, seed, {"features.2": torch.ones(1, 63, 1, 1, dtype=D)})
    with pytest.raises(ValueError, match=r"masks has key 'features.3', which is not one of the layers \['features.2'\]"):
        fn(params, x, seed, {"features.3": torch.ones(1, dtype=D)})
    with pytest.raises(ValueError, match=r"grad_output\['features.2'\] must have the shape of that output, "
                                         r"\(1, 64, 8, 8\), got \(1, 64, 4, 4\)"):
        fn(params, x, {"features.2": torch.ones(1, 64, 4, 4, dtype=D)})
    with pytest.raises(TypeError, match=r"masks\['features.2'\] must be a tensor \(or a tuple of them\), got float"):
        fn(params, x, seed, {"features.2": 1.0})
    # a module inside a call that one rule propagates as a whole is never observed
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model = nn.Sequential(block, nn.Linear(4, 2)).to(D)
    whole = composites.name_map([(["0"], rules.epsilon())])
    with pytest.raises(ValueError, match=r"'0.0' made no call the sweep could observe"):
        lrpfunc.attribute_layers(model, whole, layers=["0.0"])(dict(model.named_parameters()), torch.randn(3, 4, dtype=D),
                                                               torch.ones(3, 2, dtype=D))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), _net().parameters()))  # nothing changed
