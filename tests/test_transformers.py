"""AttnLRP and CP-LRP on HuggingFace transformers built from configs (random weights), float64 unless said."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpfunc
import lrpfunc.hf
from lrpfunc import composites, ops

transformers = pytest.importorskip("transformers")

D = torch.float64
TINY = 1e-12  # epsilon -> 0: AttnLRP as LXT computes it (gradient times input with modified local derivatives)


class Logits(nn.Module):
    """``model(inputs_embeds=e).logits``: the function of the embeddings that is attributed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return lrpfunc.hf.FromEmbeddings(self.model)(embeds)


def _llama(attn: str = "eager", **overrides) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attn_implementation=attn, **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(D).eval()


def _bert(attn: str = "eager") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3,
        max_position_embeddings=32, attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(D).eval()
    with torch.no_grad():  # away from the initialisation's zeros and ones, so that mistakes show
        for name, tensor in model.named_parameters():
            if name.endswith("bias") or "LayerNorm.weight" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model


def _gpt2(attn: str = "eager") -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(D).eval()


def _qwen2(attn: str = "eager") -> nn.Module:
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).to(D).eval()


def _mistral(attn: str = "eager") -> nn.Module:
    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        sliding_window=None, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).to(D).eval()


def _gemma(attn: str = "eager") -> nn.Module:
    config = transformers.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                                      attn_implementation=attn)
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(config).to(D).eval()
    with torch.no_grad():  # Gemma's RMSNorm scales by (1 + weight): make the weights non-zero
        for name, tensor in model.named_parameters():
            if "norm" in name:
                tensor.uniform_(-0.5, 0.5)
    return model


LANGUAGE_MODELS = {"llama": _llama, "gpt2": _gpt2, "qwen2": _qwen2, "mistral": _mistral, "gemma": _gemma}


def _embeds(model: nn.Module, length: int = 10, batch: int = 1, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, 64, (batch, length))
    return model.get_input_embeddings()(ids).detach()


def _seed_at(logits: torch.Tensor, index: int | None = None) -> torch.Tensor:
    """The one-hot seed times the logit: at the last position's argmax for a language model, a class otherwise."""
    seed = torch.zeros_like(logits)
    if logits.ndim == 3:
        token = logits[0, -1].argmax() if index is None else index
        seed[0, -1, token] = logits[0, -1, token]
    else:
        cls = logits[0].argmax() if index is None else index
        seed[0, cls] = logits[0, cls]
    return seed


def _attribute(model: nn.Module, composite, embeds: torch.Tensor, seed: torch.Tensor | None = None):
    wrapper = Logits(model)
    params = {k: v.detach() for k, v in wrapper.named_parameters()}
    logits = wrapper(embeds).detach()
    seed = _seed_at(logits) if seed is None else seed
    with torch.no_grad():
        _, relevance = lrpfunc.attribute(wrapper, composite)(params, embeds, seed)
    return relevance, seed


# ----------------------------------------------------------------------------------------------------------------
# references derived from the rule definitions: AttnLRP as modified local derivatives times input, written out
# ----------------------------------------------------------------------------------------------------------------


def _divide_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The value of ``x``, its gradient divided by ``factor`` (the uniform rule on a product of two activations)."""
    return x.detach() + (x - x.detach()) / factor


def _identity(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with local derivative ``fn(x) / x`` (the identity rule of an element-wise nonlinearity)."""
    y = fn(x)
    return y.detach() + (x - x.detach()) * (y / x).detach()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _reference_llama(model: nn.Module, embeds: torch.Tensor, seed: torch.Tensor, cp: bool = False) -> torch.Tensor:
    """AttnLRP (or CP-LRP) relevance of a Llama, written out: RMSNorm with its divisor detached, q and k taking a quarter
    and v half of the gradient of the attention (two uniform products), softmax and linear layers with their true
    local derivatives, SiLU by the identity rule, the gated product halved; relevance = gradient times input."""
    config, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    x = embeds.clone().requires_grad_()
    batch, length, hidden = x.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    theta = config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else config.rope_theta  # 5.x, 4.x
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(D) / head_dim))
    freqs = torch.arange(length, dtype=D)[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.full((length, length), torch.finfo(D).min, dtype=D).triu(1)

    def rms(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps).detach())

    h = x
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        n = rms(h, sd[p + "input_layernorm.weight"])
        q = (n @ sd[p + "self_attn.q_proj.weight"].T).view(batch, length, heads, head_dim).transpose(1, 2)
        k = (n @ sd[p + "self_attn.k_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = (n @ sd[p + "self_attn.v_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cp:
            q, k = q.detach(), k.detach()
        else:
            q, k, v = _divide_gradient(q, 4), _divide_gradient(k, 4), _divide_gradient(v, 2)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(2, 3) * head_dim**-0.5 + mask
        weights = torch.softmax(scores, -1, dtype=torch.float32).to(D)  # HF's eager attention: softmax in float32
        attended = (weights @ v).transpose(1, 2).reshape(batch, length, hidden)
        h = h + attended @ sd[p + "self_attn.o_proj.weight"].T
        n = rms(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = n @ sd[p + "mlp.gate_proj.weight"].T, n @ sd[p + "mlp.up_proj.weight"].T
        product = F.silu(gate.detach()) * up if cp else _divide_gradient(_identity(F.silu, gate) * up, 2)
        h = h + product @ sd[p + "mlp.down_proj.weight"].T
    logits = rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
    (gradient,) = torch.autograd.grad(logits, x, seed / torch.where(seed == 0, 1.0, logits.detach()))
    return (x * gradient).detach()


def _reference_bert(model: nn.Module, embeds: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """AttnLRP relevance of a BERT classifier, written out: LayerNorm with its standard deviation detached (its
    centring and bias keep their true derivatives), the two attention products halved, GELU and tanh by the
    identity rule; relevance = gradient times input."""
    config, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    x = embeds.clone().requires_grad_()
    batch, length, hidden = x.shape
    heads = config.num_attention_heads
    head_dim = hidden // heads
    eps = config.layer_norm_eps

    def layer_norm(v: torch.Tensor, name: str) -> torch.Tensor:
        mean = v.mean(-1, keepdim=True)
        std = (((v - mean) ** 2).mean(-1, keepdim=True) + eps).sqrt()
        return (v - mean) / std.detach() * sd[name + ".weight"] + sd[name + ".bias"]

    def linear(v: torch.Tensor, name: str) -> torch.Tensor:
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    e = x + sd["bert.embeddings.token_type_embeddings.weight"][0] + sd["bert.embeddings.position_embeddings.weight"][:length]
    h = layer_norm(e, "bert.embeddings.LayerNorm")
    for layer in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{layer}."
        q = linear(h, p + "attention.self.query").view(batch, length, heads, head_dim).transpose(1, 2)
        k = linear(h, p + "attention.self.key").view(batch, length, heads, head_dim).transpose(1, 2)
        v = linear(h, p + "attention.self.value").view(batch, length, heads, head_dim).transpose(1, 2)
        scores = _divide_gradient(q @ k.transpose(-1, -2), 2) / math.sqrt(head_dim)
        attended = _divide_gradient(torch.softmax(scores, -1) @ v, 2).transpose(1, 2).reshape(batch, length, hidden)
        h = layer_norm(linear(attended, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        inner = _identity(F.gelu, linear(h, p + "intermediate.dense"))
        h = layer_norm(linear(inner, p + "output.dense") + h, p + "output.LayerNorm")
    pooled = _identity(torch.tanh, linear(h[:, 0], "bert.pooler.dense"))
    logits = linear(pooled, "classifier")
    (gradient,) = torch.autograd.grad(logits, x, seed / torch.where(seed == 0, 1.0, logits.detach()))
    return (x * gradient).detach()


@pytest.mark.parametrize("epsilon", [0.0, TINY], ids=["gradient_form", "epsilon"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cp_lrp"])
def test_llama_equals_the_rules_written_out(attn: str, cp: bool, epsilon: float) -> None:
    """With epsilon 0 (the default) every rule has a gradient form; with a tiny epsilon every step is relevance."""
    model = _llama(attn)
    embeds = _embeds(model)
    make = composites.cp_lrp if cp else composites.attnlrp
    composite = make(epsilon=epsilon, stabilizer=epsilon)
    relevance, seed = _attribute(model, composite, embeds)
    expected = _reference_llama(model, embeds, seed, cp=cp)
    torch.testing.assert_close(relevance, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("epsilon", [0.0, TINY], ids=["gradient_form", "epsilon"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_equals_the_rules_written_out(attn: str, epsilon: float) -> None:
    model = _bert(attn)
    embeds = _embeds(model)
    relevance, seed = _attribute(model, composites.attnlrp(epsilon=epsilon, stabilizer=epsilon), embeds)
    torch.testing.assert_close(relevance, _reference_bert(model, embeds, seed), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# every model, both attention implementations
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS) + ["bert"])
def test_eager_and_sdpa_give_the_same_relevance(name: str) -> None:
    build = _bert if name == "bert" else LANGUAGE_MODELS[name]
    eager, sdpa = build("eager"), build("sdpa")
    embeds = _embeds(eager)
    for composite in (composites.attnlrp(), composites.cp_lrp()):
        first, seed = _attribute(eager, composite, embeds)
        second, _ = _attribute(sdpa, composite, embeds, seed)
        assert torch.isfinite(first).all() and first.abs().sum() > 0
        # HF eager attention takes its softmax in float32 even in a float64 model: agreement to float32 precision
        torch.testing.assert_close(second, first, rtol=1e-4, atol=1e-4 * first.abs().max().item())


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS) + ["bert"])
def test_no_rules_equals_the_vector_jacobian_product(name: str) -> None:
    model = (_bert if name == "bert" else LANGUAGE_MODELS[name])("sdpa")
    embeds = _embeds(model)
    wrapper = Logits(model)
    params = dict(wrapper.named_parameters())
    output, pullback = torch.func.vjp(lambda e: torch.func.functional_call(wrapper, params, (e,)), embeds)
    seed = torch.randn_like(output)
    _, relevance = lrpfunc.attribute(wrapper, None)(params, embeds, seed)
    torch.testing.assert_close(relevance, pullback(seed)[0], rtol=1e-10, atol=1e-12)


def test_vision_transformer() -> None:
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    torch.manual_seed(2)
    models = {attn: transformers.ViTForImageClassification(config).to(D).eval() for attn in ("eager", "sdpa")}
    models["sdpa"].load_state_dict(models["eager"].state_dict())
    models["sdpa"].config._attn_implementation = "sdpa"
    models["eager"].config._attn_implementation = "eager"
    pixels = torch.randn(2, 3, 16, 16, dtype=D)

    class Classifier(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).logits

    results = {}
    for attn, model in models.items():
        wrapper = Classifier(model)
        seed = torch.eye(5, dtype=D)[[1, 3]]
        composite = composites.attnlrp(layer_map=[(lrpfunc.types.Linear + (ops.Dense, ops.Convolution), lrpfunc.rules.gamma(0.25))])
        _, results[attn] = lrpfunc.attribute(wrapper, composite)(dict(wrapper.named_parameters()), pixels, seed)
    assert torch.isfinite(results["eager"]).all() and results["eager"].abs().sum() > 0
    torch.testing.assert_close(results["sdpa"], results["eager"], rtol=1e-5, atol=1e-8)


class Block(nn.Module):
    """A transformer block with nn.MultiheadAttention, or the same attention written out by hand (``eager``)."""

    def __init__(self, eager: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)
        self.eager = eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eager:
            attention = self.attention
            q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
            batch, length, _ = x.shape

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(batch, length, 4, 4).transpose(1, 2)

            scores = torch.matmul(heads(q), heads(k).transpose(-2, -1)) * 0.5
            attended = torch.matmul(torch.softmax(scores, dim=-1), heads(v)).transpose(1, 2).reshape(batch, length, 16)
            out = attention.out_proj(attended)
        else:
            out, _ = self.attention(x, x, x)
        return self.head(self.norm(x + out).mean(1))


def test_multihead_attention_equals_its_eager_form() -> None:
    torch.manual_seed(3)
    module, eager = Block(False).to(D).eval(), Block(True).to(D).eval()
    eager.load_state_dict(module.state_dict())
    x = torch.randn(2, 5, 16, dtype=D)
    seed = torch.randn(2, 3, dtype=D)
    for composite in (composites.attnlrp(), composites.cp_lrp()):
        _, expected = lrpfunc.attribute(eager, composite)(dict(eager.named_parameters()), x, seed)
        _, got = lrpfunc.attribute(module, composite)(dict(module.named_parameters()), x, seed)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    table = lrpfunc.rule_table(module, composites.attnlrp(), x)
    assert any(site.op_class is ops.Attention and repr(rule) == "attention" for site, rule in table)
    assert any(site.op_class is ops.Softmax and repr(rule) == "softmax" for site, rule in table)


# ----------------------------------------------------------------------------------------------------------------
# conservation, derivatives, batched targets
# ----------------------------------------------------------------------------------------------------------------


def test_conservation_on_a_llama_without_biases() -> None:
    """CP-LRP conserves the target logit; AttnLRP loses exactly what its softmax rule absorbs (by definition: the rule
    x * (R - s * sum(R)) does not conserve), and every other site conserves."""
    model = _llama()
    embeds = _embeds(model)
    relevance, seed = _attribute(model, composites.cp_lrp(epsilon=TINY, stabilizer=TINY), embeds)
    assert abs((relevance.sum() / seed.sum()).item() - 1) < 1e-6
    relevance32, _ = _attribute(model.float(), composites.cp_lrp(), embeds.float(), seed.float())
    assert abs((relevance32.sum() / seed.sum()).item() - 1) < 1e-2
    model = model.double()
    wrapper = Logits(model)
    report = lrpfunc.conservation(wrapper, composites.attnlrp(epsilon=TINY, stabilizer=TINY))(
        dict(wrapper.named_parameters()), embeds, seed
    )
    absorbed = sum(row.created for row in report.rows if row.site.op_class is ops.Softmax)
    others = [row for row in report.leaks(1e-8) if row.site.op_class is not ops.Softmax]
    assert others == []
    assert report.total_out == pytest.approx(report.total_in + absorbed, rel=1e-8)


def _float64_throughout(model: nn.Module) -> nn.Module:
    """HuggingFace's RMSNorms compute in float32 whatever the model's dtype, which leaves finite differences of a
    float64 Llama at float32 precision: swap them for torch's RMSNorm with the same weight and epsilon."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            norm = nn.RMSNorm(module.weight.shape, eps=module.variance_epsilon, dtype=D)
            norm.weight.data.copy_(module.weight.data)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, norm)
    return model


@pytest.mark.parametrize("name,attn", [("llama", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa"), ("bert", "eager"), ("bert", "sdpa")])
def test_explanation_loss_gradients_match_finite_differences(name: str, attn: str) -> None:
    """The gradient of a loss on the relevance w.r.t. every parameter and the input, along a random direction.

    Epsilon 0.1 keeps the rules' denominators away from zero (epsilon * sign(z) jumps where z crosses zero, so the
    relevance is smooth only between such points) and the step small enough not to cross one. HF's eager attention
    takes its softmax in float32, so the Llama is checked with sdpa only (and float64 RMSNorms)."""
    model = {"llama": lambda a: _float64_throughout(_llama(a)), "gpt2": _gpt2, "bert": _bert}[name](attn)
    wrapper = Logits(model)
    embeds = _embeds(model, length=6)
    params = {k: v.detach() for k, v in wrapper.named_parameters()}
    seed = _seed_at(wrapper(embeds).detach())
    fn = lrpfunc.attribute(wrapper, composites.attnlrp(epsilon=0.1, stabilizer=0.1))
    torch.manual_seed(4)
    weight = torch.randn_like(embeds)

    def loss(p: dict[str, torch.Tensor], e: torch.Tensor) -> torch.Tensor:
        return (fn(p, e, seed)[1] * weight).sum()

    grads = torch.func.grad(loss, argnums=(0, 1))(params, embeds)
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    de = torch.randn_like(embeds)

    def along(t: float) -> torch.Tensor:
        return loss({k: v + t * direction[k] for k, v in params.items()}, embeds + t * de)

    h = 1e-6
    numeric = (along(h) - along(-h)) / (2 * h)
    exact = sum((grads[0][k] * direction[k]).sum() for k in params) + (grads[1] * de).sum()
    assert torch.isfinite(exact) and exact.abs() > 0
    torch.testing.assert_close(exact, numeric, rtol=1e-6, atol=1e-12)


def test_sixteen_target_tokens_from_one_forward_pass_equal_a_loop() -> None:
    model = _llama()
    wrapper = Logits(model)
    embeds = _embeds(model)
    params = dict(wrapper.named_parameters())
    logits = wrapper(embeds).detach()
    tokens = logits[0, -1].topk(16).indices
    seeds = torch.zeros(16, *logits.shape, dtype=D)
    seeds[torch.arange(16), 0, -1, tokens] = 1.0
    fn = lrpfunc.attribute(wrapper, composites.attnlrp())
    batched = torch.func.vmap(fn, in_dims=(None, None, 0))(params, embeds, seeds)[1]
    loop = torch.stack([fn(params, embeds, seed)[1] for seed in seeds])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# the token helper
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_learned_positions_of_a_batch_are_each_sequences_own(build) -> None:
    """The batch shares one position embedding tensor; its relevance is still reported per sequence, equal to
    attributing each sequence alone (with padding: an attention mask), for one target and for several."""
    model = build()
    explain = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())
    torch.manual_seed(6)
    ids = torch.randint(0, 64, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    batched = explain(ids, attention_mask=mask)
    language = batched.logits.ndim == 3
    several = explain(ids, targets=torch.tensor([1, 2]), attention_mask=mask)
    for row in range(3):
        alone = explain(ids[row : row + 1], attention_mask=mask[row : row + 1])
        for field in ("positions", "tokens", "target"):
            torch.testing.assert_close(getattr(batched, field)[row], getattr(alone, field)[0], rtol=1e-9, atol=1e-12)
        for k, target in enumerate([1, 2]):
            single = explain(ids[row : row + 1], target=target, attention_mask=mask[row : row + 1])
            torch.testing.assert_close(several.positions[k, row], single.positions[0], rtol=1e-9, atol=1e-12)
    assert batched.positions.abs().sum() > 0 and language == (build is _gpt2)


def test_attribute_tokens_reports_tokens_and_learned_positions() -> None:
    model = _gpt2()
    explain = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())
    torch.manual_seed(5)
    ids = torch.randint(0, 64, (2, 7))
    result = explain(ids)
    assert result.tokens.shape == (2, 7) and result.embeddings.shape == (2, 7, 32) and result.positions.shape == (2, 7)
    logits = model(ids).logits.detach()
    torch.testing.assert_close(result.target, logits[:, -1].max(-1).values, rtol=1e-12, atol=1e-12)
    # the same attribution by hand: embeddings in, one-hot seed times the logit
    wrapper = Logits(model)
    embeds = model.get_input_embeddings()(ids).detach()
    seed = torch.zeros_like(logits)
    seed[torch.arange(2), -1, logits[:, -1].argmax(-1)] = logits[:, -1].max(-1).values
    _, expected = lrpfunc.attribute(wrapper, composites.attnlrp())(dict(wrapper.named_parameters()), embeds, seed)
    torch.testing.assert_close(result.embeddings, expected, rtol=1e-10, atol=1e-12)
    # the position embeddings take exactly the rest of what enters the first block (the sum rule there)
    assert result.positions.abs().sum() > 0
    # several targets at once (every generated position): one forward pass, equal to single calls
    several = explain(ids, targets=torch.tensor([3, 5, 9]), position=torch.tensor([2, 4, 6]))
    assert several.tokens.shape == (3, 2, 7)
    for k, (token, position) in enumerate([(3, 2), (5, 4), (9, 6)]):
        single = explain(ids, target=token, position=position)
        torch.testing.assert_close(several.tokens[k], single.tokens, rtol=1e-10, atol=1e-12)
    # a model with rotary positions has none to report
    assert lrpfunc.hf.attribute_tokens(_llama(), composites.attnlrp())(ids).positions is None
    with pytest.raises(ValueError, match=r"attribute_tokens: input_ids must be an integer tensor \(B, L\), got \(7,\)"):
        explain(ids[0])
    with pytest.raises(ValueError, match=r"attribute_tokens: target must be an int or \(B,\) with B = 2, got shape \(3,\)"):
        explain(ids, target=torch.tensor([1, 2, 3]))
