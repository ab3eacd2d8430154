"""bf16 and float16 end to end on HuggingFace models: the relevance in the model's dtype, close to float32's."""

from __future__ import annotations

import pytest
import torch

import lrpfunc.hf
from lrpfunc import composites

transformers = pytest.importorskip("transformers")



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_half_precision_end_to_end(family: str, dtype: torch.dtype) -> None:
    """bf16 and float16 models attribute in their own dtype (HF's float32 upcasts inside norms and softmax kept):
    finite, CP-LRP conserves within 2e-2, and the relevance is the float32 one within 5e-2 (relative L2), as is the
    memory mode's."""

    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2))
    model = model.eval()
    ids = torch.randint(64, (1, 12), generator=torch.Generator().manual_seed(2))
    reference = lrpfunc.hf.attribute_tokens(model, composites.cp_lrp())(ids, target=5).tokens
    model = model.to(dtype)
    for composite in (composites.cp_lrp(), lrpfunc.hf.recompute_layers(model, composites.cp_lrp())):
        result = lrpfunc.hf.attribute_tokens(model, composite)(ids, target=5)
        assert result.tokens.dtype == dtype and torch.isfinite(result.tokens).all()
        total = result.tokens.float().sum() + (result.positions.float().sum() if result.positions is not None else 0)
        assert abs(total / result.target.float().squeeze() - 1) < 2e-2
        assert (result.tokens.float() - reference).norm() / reference.norm() < 5e-2
    attn = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())(ids, target=5).tokens
    assert attn.dtype == dtype and torch.isfinite(attn).all()
