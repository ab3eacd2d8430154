"""Explaining every token a language model generates, on a task where the evidence for each one is known.

The user story: a model generated a continuation, and you want to know, for each generated token, which tokens before
it the model used; and a number that says whether a method's answer reflects what the model does. This script

1. builds a copy task over 12 symbols: a prompt of ``LENGTH`` random symbols and the separator ``<sep>``; the model
   must then repeat the symbols in order, so the evidence for generated token ``n`` is prompt token ``n``;
2. trains a tiny ``LlamaForCausalLM`` (random weights from a config, float32: hidden size 64, 2 layers, 4 heads) for a
   few seconds and reports how many held-out prompts it copies exactly;
3. explains every generated token at once with ``lrpfunc.hf.attribute_generation`` (one forward pass per prompt,
   ``vmap`` over the generated tokens) under AttnLRP, CP-LRP and AttnLRP with PA-LRP's rotary positions
   (``attnlrp(rotary_positions=True)``: the positions take a share, the tokens the rest), and draws the matrix
   (generated tokens as rows, the tokens before them as columns) as ``attnlrp.png`` and, with the others beside it,
   ``generation.html``;
4. scores five attributions per generated token: the three above, input x gradient and the gradient (both w.r.t. the
   embeddings, summed over the hidden size), plus random. Two measures: the ABPC of ``lrpfunc.evaluate`` (for
   generated token ``n``, the tokens before it set to 0 one at a time, most- and least-relevant-first, the score being
   the token's logit with the generated prefix kept as it was) averaged over the generated tokens, and the evidence hit
   rate (how often the most relevant token before it is prompt token ``n``; chance is one in the number of tokens
   before it);
5. prints the table, writes it to ``faithfulness.md`` and returns the numbers.

All attributions start from the generated token's logit and are computed in float32. Whatever the table shows is the
result: the task is not tuned to favour any method.

Run it with ``python examples/generation.py [OUT]`` (default ``./out/generation``); it needs
``pip install lrpfunc[transformers]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import lrpfunc.hf
from lrpfunc import composites
from lrpfunc.evaluate import evaluate_dataset
from lrpfunc.text import generation_heatmap_html, save_generation_heatmap

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

SYMBOLS = [chr(ord("A") + index) for index in range(12)]
SEPARATOR = "<sep>"
VOCABULARY = [*SYMBOLS, SEPARATOR]
LENGTH = 6  # symbols per prompt; the model generates as many


def make_prompts(count: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, LENGTH + 1)`` ids: random symbols, then the separator."""
    symbols = torch.randint(len(SYMBOLS), (count, LENGTH), generator=generator)
    return torch.cat([symbols, torch.full((count, 1), VOCABULARY.index(SEPARATOR))], 1)


def make_model() -> LlamaForCausalLM:
    """A tiny Llama over :data:`VOCABULARY` with random weights, float32, eager attention."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("generation needs transformers: pip install lrpfunc[transformers]") from error
    config = transformers.LlamaConfig(
        vocab_size=len(VOCABULARY), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no token of ours is a special one
    )
    return transformers.LlamaForCausalLM(config)


def train(model: nn.Module, steps: int, generator: torch.Generator, *, batch_size: int = 64, lr: float = 3e-3) -> float:
    """Cross-entropy of the copy after ``<sep>`` (teacher forcing) with Adam on fresh prompts; eval mode after."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        prompts = make_prompts(batch_size, generator)
        sequences = torch.cat([prompts, prompts[:, :LENGTH]], 1)
        logits = model(input_ids=sequences[:, :-1], use_cache=False).logits[:, LENGTH:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(VOCABULARY)), sequences[:, LENGTH + 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def gradient_methods(model: nn.Module, sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input x gradient and the gradient w.r.t. the embeddings (summed over the hidden size) for every generated
    token, ``(B, N, L + N)`` like ``GenerationAttribution.relevance``: one backward pass per generated token."""
    prompt = sequences.shape[1] - LENGTH
    embeddings = model.get_input_embeddings()(sequences).detach()
    gradient = torch.zeros(sequences.shape[0], LENGTH, sequences.shape[1])
    times_input = torch.zeros_like(gradient)
    for n in range(LENGTH):
        leaf = embeddings[:, : prompt + n].clone().requires_grad_()
        logits = model(inputs_embeds=leaf, use_cache=False).logits[:, -1]
        target = logits.gather(1, sequences[:, prompt + n, None]).sum()
        (grad,) = torch.autograd.grad(target, leaf)
        gradient[:, n, : prompt + n] = grad.sum(-1)
        times_input[:, n, : prompt + n] = (leaf * grad).sum(-1).detach()
    return {"input x gradient": times_input, "gradient": gradient}


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "generation"), help="output folder")
    parser.add_argument("--fast", action="store_true", help="fewer prompts evaluated (for tests)")
    parser.add_argument("--prompts", type=int, default=128, help="held-out prompts explained and scored")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = 32 if fast or args.fast else args.prompts
    if count < 1:
        parser.error(f"expected --prompts >= 1, got {count}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_model()
    training = time.perf_counter()
    loss = train(model, steps=150, generator=generator)
    train_seconds = time.perf_counter() - training
    model.requires_grad_(False)
    prompts = make_prompts(count, generator)
    prompt = prompts.shape[1]

    # 1. every generated token explained from one forward pass per prompt
    explained = time.perf_counter()
    methods = (("AttnLRP", composites.attnlrp()), ("CP-LRP", composites.cp_lrp()),
               ("AttnLRP, rotary positions (PA-LRP)", composites.attnlrp(rotary_positions=True)))
    results = {name: lrpfunc.hf.attribute_generation(model, composite)(prompts, LENGTH) for name, composite in methods}
    explain_seconds = time.perf_counter() - explained
    sequences = results["AttnLRP"].sequences
    copied = (sequences[:, prompt:] == prompts[:, :LENGTH]).all(1).float().mean().item()

    # 2. the matrix of the first prompt
    tokens = [VOCABULARY[int(i)] for i in sequences[0]]
    png = save_generation_heatmap(tokens, results["AttnLRP"].relevance[0], out / "attnlrp.png",
                                  prompt_length=prompt, title="AttnLRP: each generated token (rows) explained")
    pages = [generation_heatmap_html(tokens, result.relevance[0], prompt_length=prompt, title=name)
             for name, result in results.items()]
    html_path = out / "generation.html"
    html_path.write_text("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Generation"
                         "</title>\n</head>\n<body style=\"margin: 1em\">\n" + "\n<br>\n".join(pages)
                         + "\n</body>\n</html>\n", encoding="utf-8")

    # 3. faithfulness per generated token
    relevance = {name: result.relevance for name, result in results.items()}
    relevance.update(gradient_methods(model, sequences))
    noise = torch.randn(sequences.shape[0], LENGTH, sequences.shape[1], generator=torch.Generator().manual_seed(1))
    relevance["random"] = noise
    embeddings = model.get_input_embeddings()(sequences).detach()

    def score(batch: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """The logit of the generated token (``pair[:, 1]``) at the last position of ``batch``."""
        return model(inputs_embeds=batch, use_cache=False).logits[:, -1].gather(1, pair[:, 1:])[:, 0]

    abpc: dict[str, list[float]] = {name: [] for name in relevance}
    hits: dict[str, float] = {}
    for name, values in relevance.items():
        found = 0.0
        for n in range(LENGTH):
            before = prompt + n  # the tokens generated token n may depend on
            x = embeddings[:, :before]
            per_token = values[:, n, :before]
            spread = (per_token[..., None] / x.shape[-1]).expand_as(x)  # a token's relevance over its embedding

            def attribution(_: torch.Tensor, rows: torch.Tensor, spread: torch.Tensor = spread) -> torch.Tensor:
                return spread[rows]

            rows = torch.arange(count)
            target = sequences[:, before]
            data = [(x[i : i + 64], torch.stack([rows[i : i + 64], target[i : i + 64]], 1))
                    for i in range(0, count, 64)]
            result = evaluate_dataset(score, lambda batch, pair: attribution(batch, pair[:, 0]), data, steps=before,
                                      baseline=0.0, progress=False)
            abpc[name].append(result.abpc)
            found += (per_token.argmax(-1) == n).float().mean().item()
        hits[name] = found / LENGTH
    chance = sum(1 / (prompt + n) for n in range(LENGTH)) / LENGTH
    seconds = time.perf_counter() - start

    table = ["| method | ABPC (mean over generated tokens) | ABPC first / last token | top-1 on evidence |",
             "| --- | --- | --- | --- |"]
    for name, values in abpc.items():
        table.append(f"| {name} | {sum(values) / len(values):.2f} | {values[0]:.2f} / {values[-1]:.2f} | "
                     f"{hits[name]:.3f} |")
    notes = (f"{count} held-out prompts of {LENGTH} symbols and <sep>, {LENGTH} tokens generated each "
             f"({copied:.3f} copied exactly); score: the generated token's logit, the tokens before it set to 0 one "
             f"at a time; top-1 on evidence by chance: {chance:.3f}")
    (out / "faithfulness.md").write_text("\n".join(table) + "\n\n" + notes + "\n", encoding="utf-8")

    print(f"trained in {train_seconds:.1f} s (last loss {loss:.4f}); {copied:.3f} of {count} held-out prompts copied "
          f"exactly")
    print(f"attribute_generation: {count} prompts x {LENGTH} generated tokens, {len(methods)} composites, in "
          f"{explain_seconds:.1f} s")
    print("\n".join(table))
    print(notes)
    print(f"wrote {png}, {html_path} and {out / 'faithfulness.md'} in {seconds:.1f} s")
    return {
        "copied": copied,
        "prompts": count,
        "abpc": {name: sum(values) / len(values) for name, values in abpc.items()},
        "abpc_per_token": abpc,
        "top1_on_evidence": hits,
        "chance_top1": chance,
        "png": str(png),
        "html": str(html_path),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
