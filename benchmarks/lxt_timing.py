#!/usr/bin/env python
"""Time lrpfunc's and LXT 2.1's AttnLRP against the plain input gradient on a small Llama and on BERT.

    /work/lxt-venv/bin/python benchmarks/lxt_timing.py [--configs llama bert-tiny bert-small] [--budget 15]
        [--threads 2] [--wait-quiet 10] [--no-memory]

Runs in the environment that ``benchmarks/setup_lxt.sh`` creates. One call is what LXT's README does:
a forward pass from ``inputs_embeds`` (a fresh leaf that requires grad; parameters do not), backward of
one logit, and ``inputs_embeds * inputs_embeds.grad``. The plain gradient is the same call on the
unpatched model; lrpfunc's is ``lrpfunc.attribute(FromEmbeddings(model), composites.attnlrp())`` on the
unpatched model, called under ``torch.no_grad()`` with a one-hot seed at the same logit (built once, as a
user would); ``lrpfunc-cached`` is that function through ``lrpfunc.cached`` (traced once, replayed). All three run in one process, in interleaved rounds (``benchmarks.run.time_group``):
:class:`PatchSwitch` records every attribute that LXT's ``monkey_patch`` changed and switches between
the original and the patched values before each call. lrpfunc is imported from the checkout.

Configurations (float32, batch 1, eval mode, ``torch.set_num_threads(2)``):

- Llama: hidden 256, 4 layers, 8 heads, 4 key/value heads, intermediate 1024, vocabulary 1000,
  no biases, sequence 128; eager attention and sdpa;
- BERT (``BertForSequenceClassification``): tiny (hidden 64, 2 layers, 4 heads, intermediate 128,
  sequence 12) and small (hidden 256, 4 layers, 8 heads, intermediate 1024, sequence 128); eager and sdpa.

Printed per configuration: the median time of each implementation, its interquartile range as a share
of the median, the ratio of its median to the plain gradient's median (and lrpfunc's to LXT's), the quartiles of the per-round
ratios (a round times both back to back, so their ratio cancels most of the machine's drift), and the
peak memory of one call (``benchmarks.run.peak_memory``: live bytes from torch's CPU allocator).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.lxt_reference import install_torchvision_standin, perturb_trivial_parameters  # noqa: E402
from benchmarks.run import cpu_pressure, keep_freed_memory, peak_memory, time_group, wait_quiet  # noqa: E402

_MISSING = object()
SWITCHES: list[PatchSwitch] = []  # every switch made, so that a configuration can leave them all off

LLAMA = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256, attention_bias=False, mlp_bias=False)
BERT_TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64, num_labels=2)
BERT_SMALL = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  intermediate_size=1024, max_position_embeddings=256, num_labels=2)


class PatchSwitch:
    """Switches LXT's patches of one module on and off.

    ``monkey_patch`` sets attributes on the classes and modules of its patch map (``forward`` methods,
    ``eager_attention_forward``, ``ALL_ATTENTION_FUNCTIONS``, for BERT every name of the module). The
    switch records those attributes before and after patching and restores either set on demand.

    Args:
        module: the transformers modeling module to patch with LXT's default map.
    """

    def __init__(self, module: Any) -> None:
        from lxt.efficient import monkey_patch
        from lxt.efficient.models import get_default_map

        targets = list(get_default_map(module))
        before = [dict(vars(target)) for target in targets]
        monkey_patch(module, verbose=False)
        self.changes: list[tuple[Any, str, Any, Any]] = []
        for target, old in zip(targets, before):
            for name, new in vars(target).items():
                if old.get(name, _MISSING) is not new:
                    self.changes.append((target, name, old.get(name, _MISSING), new))
        self.patched = True
        self.set(False)
        SWITCHES.append(self)

    def set(self, patched: bool) -> None:
        """Put LXT's attributes in place (``patched``) or the original ones."""
        if patched == self.patched:
            return
        self.patched = patched
        for target, name, old, new in self.changes:
            value = new if patched else old
            if value is _MISSING:
                delattr(target, name)
            else:
                setattr(target, name, value)


def build(model_class: Callable[[Any], nn.Module], config: Any) -> nn.Module:
    torch.manual_seed(0)
    model = model_class(config)
    perturb_trivial_parameters(model, 1)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def relevance_call(model: nn.Module, inputs_embeds: Tensor, pick: Callable[[Tensor], Tensor],
                   switch: PatchSwitch, patched: bool, **kwargs: Any) -> Callable[[], Tensor]:
    """One explanation as LXT's README computes it, with the switch in the given position."""
    def call() -> Tensor:
        switch.set(patched)
        leaf = inputs_embeds.detach().requires_grad_(True)
        logit = pick(model(inputs_embeds=leaf, **kwargs).logits)
        (grad,) = torch.autograd.grad(logit, leaf)
        return leaf * grad
    return call


def lrpfunc_call(model: nn.Module, inputs_embeds: Tensor, seed_at: Callable[[Tensor], Tensor],
                 switch: PatchSwitch, *, recompute: bool = False, cached: bool = False) -> Callable[[], Tensor]:
    """The same explanation with ``lrpfunc.composites.attnlrp()`` on the unpatched model (LXT's patches off):
    ``lrpfunc.attribute`` built once, called with the parameters (not requiring grad) and a one-hot seed.
    ``recompute``: the memory mode, the model's layers recomputed in the sweep (``lrpfunc.hf.recompute_layers``).
    ``cached``: ``lrpfunc.cached(fn)``, traced once and replayed."""
    import lrpfunc
    import lrpfunc.hf

    wrapper = lrpfunc.hf.FromEmbeddings(model)
    params = dict(wrapper.named_parameters())
    composite = lrpfunc.composites.attnlrp()
    if recompute:
        composite = lrpfunc.hf.recompute_layers(model, composite)
    fn = lrpfunc.attribute(wrapper, composite)
    if cached:
        fn = lrpfunc.cached(fn)
    with torch.no_grad():
        seed = seed_at(wrapper(inputs_embeds))

    def call() -> Tensor:
        switch.set(False)
        with torch.no_grad():
            return fn(params, inputs_embeds, seed)[1]
    return call


def one_hot_at(index: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """A seed that picks the logit at ``index``."""
    def seed_at(logits: Tensor) -> Tensor:
        seed = torch.zeros_like(logits)
        seed[index] = 1.0
        return seed
    return seed_at


def llama_calls() -> tuple[str, dict[str, Callable[[], Tensor]]]:
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    switch = PatchSwitch(modeling_llama)
    calls = {}
    for attn in ("eager", "sdpa"):
        model = build(modeling_llama.LlamaForCausalLM, LlamaConfig(**LLAMA, attn_implementation=attn))
        input_ids = torch.randint(LLAMA["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            embeds = model.get_input_embeddings()(input_ids)
            token = int(model(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax())

        def pick(logits: Tensor, token: int = token) -> Tensor:
            return logits[0, -1, token]
        for patched, impl in ((False, "gradient"), (True, "lxt")):
            calls[f"{attn}/{impl}"] = relevance_call(model, embeds, pick, switch, patched, use_cache=False)
        calls[f"{attn}/lrpfunc"] = lrpfunc_call(model, embeds, one_hot_at((0, -1, token)), switch)
        calls[f"{attn}/lrpfunc-cached"] = lrpfunc_call(model, embeds, one_hot_at((0, -1, token)), switch,
                                                       cached=True)
    return "llama h256 L4 heads 8/4 ff1024 V1000 seq128", calls


def bert_calls(sizes: dict[str, Any], seq_len: int) -> dict[str, Callable[[], Tensor]]:
    from transformers import BertConfig
    from transformers.models.bert import modeling_bert

    original_class = modeling_bert.BertForSequenceClassification
    switch = BERT_SWITCH.get("switch") or PatchSwitch(modeling_bert)
    BERT_SWITCH["switch"] = switch
    calls = {}
    for attn in ("eager", "sdpa"):
        config = BertConfig(**sizes, attn_implementation=attn)
        switch.set(False)  # the class's __init__ reads the module's names: build each model in its own state
        plain = build(original_class, config)
        switch.set(True)
        patched = build(modeling_bert.BertForSequenceClassification, config)
        patched.load_state_dict(plain.state_dict())
        switch.set(False)
        input_ids = torch.randint(sizes["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            embeds = plain.bert.get_input_embeddings()(input_ids)

        def pick(logits: Tensor) -> Tensor:
            return logits[0, 0]
        calls[f"{attn}/gradient"] = relevance_call(plain, embeds, pick, switch, False)
        calls[f"{attn}/lxt"] = relevance_call(patched, embeds, pick, switch, True)
        calls[f"{attn}/lrpfunc"] = lrpfunc_call(plain, embeds, one_hot_at((0, 0)), switch)
        calls[f"{attn}/lrpfunc-cached"] = lrpfunc_call(plain, embeds, one_hot_at((0, 0)), switch, cached=True)
    return calls


BERT_SWITCH: dict[str, PatchSwitch] = {}

CONFIGS: dict[str, Callable[[], tuple[str, dict[str, Callable[[], Tensor]]]]] = {
    "llama": llama_calls,
    "bert-tiny": lambda: ("bert tiny h64 L2 heads 4 ff128 seq12", bert_calls(BERT_TINY, 12)),
    "bert-small": lambda: ("bert small h256 L4 heads 8 ff1024 seq128", bert_calls(BERT_SMALL, 128)),
}


def check_switch(calls: dict[str, Callable[[], Tensor]]) -> str:
    """The plain gradient is the same before and after LXT's call, and LXT's result differs from it."""
    first = calls["eager/gradient"]()
    lxt = calls["eager/lxt"]()
    again = calls["eager/gradient"]()
    same = torch.equal(first, again)
    differs = not torch.allclose(first, lxt)
    return f"switch check: plain repeatable {same}, LXT differs from plain {differs}"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def report(title: str, calls: dict[str, Callable[[], Tensor]], times: dict[str, list[float]],
           memory: dict[str, int | None]) -> list[str]:
    header = (f"  {'impl':<16}{'median ms':>10}{'IQR/med':>9}{'ratio':>8}{'round ratios q1/q2/q3':>25}"
              f"{'min-max':>15}{'peak MiB':>10}{'mem ratio':>10}{'vs lxt':>8}")
    lines = [f"{title}  (rounds: {len(next(iter(times.values())))})", header]
    for name in calls:
        base = f"{name.split('/')[0]}/gradient"
        q1, med, q3 = quartiles(times[name])
        ratio = med / statistics.median(times[base])
        paired = [t / b for t, b in zip(times[name], times[base])]
        p1, p2, p3 = quartiles(paired)
        mem = memory.get(name)
        mem_text = "-" if mem is None else f"{mem / 2**20:.2f}"
        mem_ratio = "-" if mem is None or not memory.get(base) else f"{mem / memory[base]:.2f}"
        lxt = f"{name.split('/')[0]}/lxt"
        ours = "/lrpfunc" in name
        versus = f"{med / statistics.median(times[lxt]):.2f}" if ours and lxt in times else ""
        lines.append(f"  {name:<16}{med * 1e3:>10.2f}{(q3 - q1) / med:>9.0%}{ratio:>8.2f}"
                     f"{f'{p1:.2f}/{p2:.2f}/{p3:.2f}':>25}{f'{min(paired):.2f}-{max(paired):.2f}':>15}"
                     f"{mem_text:>10}{mem_ratio:>10}{versus:>8}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--budget", type=float, default=15.0, help="seconds of timed rounds per configuration")
    p.add_argument("--repeats", type=int, default=60, help="at most this many rounds per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait-quiet", type=float, default=10.0, metavar="SECONDS",
                   help="before each configuration, wait up to this long for the CPU pressure to drop below 25%%")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(install_torchvision_standin())
    print(keep_freed_memory())
    from importlib.metadata import version

    import lxt
    import transformers

    print(f"lxt {version('lxt')}  transformers {transformers.__version__}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  float32  batch 1  ({lxt.__name__})")
    groups = [CONFIGS[name]() for name in args.configs]
    lines = []
    for title, calls in groups:
        print(f"{title}: {check_switch(calls)}", flush=True)
        waited = wait_quiet(args.wait_quiet)
        pressure = cpu_pressure()
        times = time_group(calls, warmup=args.warmup, repeats=args.repeats, min_repeats=5,
                           budget_s=args.budget, sync=lambda: None)
        memory: dict[str, int | None] = {name: None for name in calls}
        if not args.no_memory:
            for name, call in calls.items():
                memory[name] = peak_memory(call, torch.device("cpu"))[0]
        pressure_end = cpu_pressure()
        for switch in SWITCHES:  # switches share torch.nn.Dropout: leave all off for the next configuration
            switch.set(False)
        lines += report(title, calls, times, memory)
        lines.append(f"  cpu pressure (avg10, %): start {pressure}, end {pressure_end} (waited {waited:.0f} s for quiet)")
        print("\n".join(lines[-(len(calls) + 3):]), flush=True)
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
