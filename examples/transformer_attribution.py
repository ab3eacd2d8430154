"""Token heatmaps of a small HuggingFace transformer, and how faithful each attribution method is to it.

The user story: a language model answered, and you want to know which input tokens the answer rests on; and
before you trust a heatmap, a number that says whether the method reflects what the model actually uses.
A task whose evidence is known lets you check both. This script

1. builds a synthetic review task over a small vocabulary of words (a token id is an index into the list):
   ``LENGTH`` filler words with one or two sentiment words planted at random positions, all of one polarity
   ("great", "superb", ... or "awful", "dreadful", ...), then the separator ``<sep>``; the next token is the
   label, "positive" or "negative"; reviews with no sentiment word are "neutral". The third class makes both
   kinds of sentiment word necessary (with two classes a model may learn "negative if a negative word, else
   positive", and positive words would be no evidence); the planted words are the evidence, and the only one;
2. trains a tiny ``LlamaForCausalLM`` (built from a config with random weights, float32: hidden size 64,
   2 layers, 4 heads) to predict the label after ``<sep>`` for a few seconds, reports its accuracy on held-out
   reviews, and checks that it uses the evidence: zeroing the planted words' embeddings lowers the label's
   logit far more than zeroing as many filler words;
3. explains the label's logit at the last position with ``lrpfunc.hf.attribute_tokens`` and AttnLRP and writes
   ``attnlrp.png`` and ``attnlrp.html`` (a few held-out reviews, red for relevance for the label, blue against),
   and ``methods.html`` with every method's heatmap of the same reviews;
4. scores five per-token attributions of held-out positive and negative reviews side by side: AttnLRP
   (``composites.attnlrp()``), CP-LRP (``composites.cp_lrp()``), input x gradient (the embedding times the
   gradient w.r.t. it, summed over the hidden dimension), the gradient (the gradient w.r.t. the embedding,
   summed over the hidden dimension: signed, not its norm) and random. Two measures: the ABPC of
   ``lrpfunc.evaluate`` (whole tokens' embeddings set to 0 one at a time, most- and least-relevant-first, the
   score being the label's logit) and the evidence hit rate (how often the most relevant token is a planted
   word; chance is the share of planted words);
5. prints the table, writes it to ``faithfulness.md`` and returns the numbers.

All attributions start from the label's logit (the LRP methods with its value as ``attribute_tokens`` does,
the gradients with a one-hot seed) and are computed in float32. Whatever the table shows is the result: the
task is not tuned to favour any method.

Run it with ``python examples/transformer_attribution.py [OUT]`` (default ``./out/transformer_attribution``);
it needs ``pip install lrpfunc[transformers]``.
"""

from __future__ import annotations

import argparse
import html
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import lrpfunc
import lrpfunc.hf
from lrpfunc import composites
from lrpfunc.evaluate import evaluate_dataset
from lrpfunc.text import save_token_heatmap, save_token_heatmap_html, token_heatmap_html

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

SEPARATOR = "<sep>"
LABELS = ("positive", "negative", "neutral")  # labels 0, 1, 2; each a word of the vocabulary
POSITIVE = ("great", "excellent", "wonderful", "superb")
NEGATIVE = ("awful", "terrible", "boring", "dreadful")
FILLER = ("the", "a", "of", "and", "to", "in", "it", "was", "this", "that", "with", "for", "on", "as", "is", "at",
          "by", "from", "his", "her", "they", "we", "film", "story", "plot", "actors", "scene", "music", "ending",
          "time", "people", "way")
VOCABULARY = (SEPARATOR, *LABELS, *FILLER, *POSITIVE, *NEGATIVE)
INDEX = {word: index for index, word in enumerate(VOCABULARY)}
LENGTH = 14  # words per review; the separator follows

Attribution = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (embeddings, target token ids) -> relevance


@dataclass(frozen=True)
class Reviews:
    """A batch of synthetic reviews.

    Attributes:
        ids: ``(N, LENGTH + 1)`` token ids: the words, then the separator.
        labels: ``(N,)`` 0 for positive, 1 for negative, 2 for neutral (see :data:`LABELS`).
        evidence: ``(N, LENGTH + 1)`` bool: where the sentiment words were planted (none in a neutral review).
    """

    ids: torch.Tensor
    labels: torch.Tensor
    evidence: torch.Tensor

    @property
    def targets(self) -> torch.Tensor:
        """``(N,)`` the token id of each review's label word (what the model is to predict after ``<sep>``)."""
        return torch.tensor([INDEX[label] for label in LABELS])[self.labels]

    def words(self, row: int) -> list[str]:
        """The words of review ``row``, the first as it is and the others with a leading space (a word gap)."""
        return [("" if position == 0 else " ") + VOCABULARY[index] for position, index in enumerate(self.ids[row])]


def make_reviews(n: int, generator: torch.Generator, *, neutral: bool = True, length: int = LENGTH) -> Reviews:
    """``n`` reviews of ``length`` filler words, one or two sentiment words of the label's polarity planted.

    The labels are drawn uniformly from positive, negative and (if ``neutral``) neutral; a neutral review has no
    sentiment word.
    """
    if n < 1 or length < 2:
        raise ValueError(f"make_reviews: expected n >= 1 and length >= 2, got n={n}, length={length}")
    labels = torch.randint(0, 3 if neutral else 2, (n,), generator=generator)

    def draw(choices: tuple[str, ...]) -> torch.Tensor:
        """``(n, length)`` token ids, each a word of ``choices`` drawn uniformly."""
        ids = torch.tensor([INDEX[word] for word in choices])
        return ids[torch.randint(0, len(ids), (n, length), generator=generator)]

    words = draw(FILLER)
    planted_words = torch.where(labels[:, None] == 0, draw(POSITIVE), draw(NEGATIVE))
    count = torch.randint(1, 3, (n, 1), generator=generator) * (labels[:, None] != 2)  # 1 or 2; none if neutral
    rank = torch.rand(n, length, generator=generator).argsort(1).argsort(1)  # a random permutation per review
    planted = rank < count
    ids = torch.cat([torch.where(planted, planted_words, words), torch.full((n, 1), INDEX[SEPARATOR])], 1)
    evidence = torch.cat([planted, torch.zeros(n, 1, dtype=torch.bool)], 1)
    return Reviews(ids, labels, evidence)


def make_model() -> LlamaForCausalLM:
    """A tiny Llama over :data:`VOCABULARY` with random weights, float32, eager attention."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("transformer_attribution needs transformers: pip install lrpfunc[transformers]") from error
    config = transformers.LlamaConfig(
        vocab_size=len(VOCABULARY), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # the defaults 1 and 2 would name our label words
    )
    return transformers.LlamaForCausalLM(config)


def label_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(N, V)``: the next-token logits after the separator (the last position)."""
    return model(input_ids=ids, use_cache=False).logits[:, -1]


def train(model: nn.Module, steps: int, generator: torch.Generator, *, batch_size: int = 64, lr: float = 3e-3) -> float:
    """Cross-entropy of the label word after ``<sep>`` with Adam on fresh reviews; eval mode after, the last loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        reviews = make_reviews(batch_size, generator)
        loss = nn.functional.cross_entropy(label_logits(model, reviews.ids), reviews.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def last_position_seed(target: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``grad_output`` of the logits ``(N, L, V)``: one at the last position's ``target[n]`` logit, zero elsewhere."""
    seed = torch.zeros(shape)
    seed[torch.arange(shape[0]), -1, target] = 1.0
    return seed


def methods(model: nn.Module, generator: torch.Generator) -> dict[str, Attribution]:
    """Name -> ``(embeddings (N, L, H), target (N,)) -> relevance (N, L, H)`` of the target logit at the last position.

    The LRP methods seed with the logit's value (the LRP convention, as :func:`lrpfunc.hf.attribute_tokens`), the
    gradient with one; random gives every token one uniform draw (spread over its embedding's entries).
    """
    logits_of = lrpfunc.hf.FromEmbeddings(model)
    params = {name: value.detach() for name, value in logits_of.named_parameters()}
    gradient_fn = lrpfunc.attribute(logits_of, None)  # no composite: the plain vector-Jacobian product

    def gradient(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gradient_fn(params, embeddings, last_position_seed(target, embeddings.shape[:2] + (len(VOCABULARY),)))[1]

    def lrp(composite: composites.Composite) -> Attribution:
        fn = lrpfunc.attribute(logits_of, composite)

        def relevance(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            seed = last_position_seed(target, embeddings.shape[:2] + (len(VOCABULARY),))
            logits, relevance_per_one = fn(params, embeddings, seed)
            value = (logits * seed).sum((1, 2))  # the target logit of each review
            return relevance_per_one * value[:, None, None]

        return relevance

    def random_relevance(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        draw = torch.rand(embeddings.shape[:2], generator=generator)
        return (draw[..., None] / embeddings.shape[-1]).expand(embeddings.shape)

    return {
        "attnlrp": lrp(composites.attnlrp()),
        "cp_lrp": lrp(composites.cp_lrp()),
        "input_x_gradient": lambda embeddings, target: embeddings * gradient(embeddings, target),
        "gradient": gradient,
        "random": random_relevance,
    }


def logit_drops(model: nn.Module, reviews: Reviews, generator: torch.Generator) -> dict[str, float]:
    """Whether the model uses the evidence: the mean fall of the label's logit when the embeddings of the planted
    words are set to 0 (``"evidence"``), and when those of as many filler words, drawn at random, are (``"filler"``)."""
    logits_of = lrpfunc.hf.FromEmbeddings(model)
    embeddings = model.get_input_embeddings()(reviews.ids)
    filler = ~reviews.evidence
    filler[:, -1] = False  # the separator is no filler word
    draw = torch.rand(reviews.ids.shape, generator=generator).masked_fill(~filler, 2.0)  # non-filler sorts last
    decoys = draw.argsort(1).argsort(1) < reviews.evidence.sum(1, keepdim=True)
    drops = {}
    with torch.no_grad():
        for name, removed in (("evidence", reviews.evidence), ("filler", decoys)):
            before, after = (logits_of(e)[:, -1].gather(1, reviews.targets[:, None])[:, 0]
                             for e in (embeddings, embeddings * ~removed[..., None]))
            drops[name] = (before - after).mean().item()
    return drops


def write_methods_page(reviews: Reviews, rows: int, relevance: dict[str, torch.Tensor], path: Path) -> Path:
    """An HTML page: for each of the first ``rows`` reviews, one heatmap per method, each on its own colour scale."""
    blocks = []
    for row in range(rows):
        blocks.append(f"<h3>review {row + 1}: {LABELS[int(reviews.labels[row])]}</h3>")
        for name, tokens in relevance.items():
            blocks.append(token_heatmap_html(reviews.words(row), tokens[row], title=name))
    body = "\n".join(blocks)
    title = "Token relevance of the label logit, by method"
    path.write_text(f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
                    f'</title>\n</head>\n<body style="margin: 1em; background: #fff">\n<h2>{html.escape(title)}</h2>\n'
                    f"{body}\n</body>\n</html>\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "transformer_attribution"),
                        help="output folder")
    parser.add_argument("--fast", action="store_true", help="train briefly, evaluate fewer reviews (for tests)")
    parser.add_argument("--reviews", type=int, default=256, help="held-out reviews evaluated")
    parser.add_argument("--samples", type=int, default=4, help="reviews shown as heatmaps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fast = fast or args.fast
    count = 128 if fast else args.reviews
    if count < 1 or not 1 <= args.samples <= count:
        parser.error(f"expected --reviews >= 1 and 1 <= --samples <= reviews, got {count} and {args.samples}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_model()
    training = time.perf_counter()
    loss = train(model, steps=60 if fast else 200, generator=generator)
    train_seconds = time.perf_counter() - training
    model.requires_grad_(False)
    held_out = make_reviews(count, generator)  # all three classes
    test = make_reviews(count, generator, neutral=False)  # the reviews explained: each has evidence
    with torch.no_grad():
        accuracy = (label_logits(model, held_out.ids).argmax(-1) == held_out.targets).float().mean().item()
        logits = label_logits(model, test.ids)
    test_accuracy = (logits.argmax(-1) == test.targets).float().mean().item()
    target_logit = logits.gather(1, test.targets[:, None])[:, 0]
    drop = logit_drops(model, test, generator)

    # 1. token heatmaps from token ids
    shown = args.samples
    explain = lrpfunc.hf.attribute_tokens(model, composites.attnlrp())
    explanation = explain(test.ids[:shown], target=test.targets[:shown])
    words = [test.words(row) for row in range(shown)]
    labels = ", ".join(LABELS[int(label)] for label in test.labels[:shown])
    caption = f"AttnLRP relevance of the label logit (red: for, blue: against); one row per review, labels: {labels}"
    png = save_token_heatmap(words, explanation.tokens, out / "attnlrp.png", title=caption, width=800)
    page = save_token_heatmap_html(words, explanation.tokens, out / "attnlrp.html", title=caption)

    # 2. every method on the embeddings of the held-out reviews
    logits_of = lrpfunc.hf.FromEmbeddings(model)
    embeddings = model.get_input_embeddings()(test.ids).detach()
    attributions = methods(model, torch.Generator().manual_seed(args.seed + 1))
    relevance = {name: fn(embeddings, test.targets).detach() for name, fn in attributions.items()}
    token_relevance = {name: value.sum(-1) for name, value in relevance.items()}
    from_ids_vs_embeddings = (explanation.embeddings - relevance["attnlrp"][:shown]).abs().max().item()
    methods_page = write_methods_page(test, shown, {name: value[:shown] for name, value in token_relevance.items()},
                                      out / "methods.html")

    # the "target" of evaluate_dataset is the review's index: the score looks its label up, and the attribution is
    # the one computed above, so that both measures rate the same relevance (random's draw included)
    def score(batch: torch.Tensor, review: torch.Tensor) -> torch.Tensor:
        return logits_of(batch)[:, -1].gather(1, test.targets[review][:, None])[:, 0]

    tokens = test.ids.shape[1]
    rows = torch.arange(count)
    data = [(embeddings[i : i + 64], rows[i : i + 64]) for i in range(0, count, 64)]
    chance = (test.evidence.sum(1) / tokens).float().mean().item()
    results, hit_rate = {}, {}
    for name, values in relevance.items():
        results[name] = evaluate_dataset(score, lambda _, review, values=values: values[review], data, steps=tokens,
                                         baseline=0.0, progress=False)
        hit_rate[name] = test.evidence[rows, token_relevance[name].argmax(-1)].float().mean().item()
    seconds = time.perf_counter() - start

    table = ["| method | ABPC | AUC most | AUC least | top-1 on evidence |", "| --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        table.append(f"| {name} | {result.abpc:.2f} | {result.auc_most:.2f} | {result.auc_least:.2f} | "
                     f"{hit_rate[name]:.3f} |")
    notes = (f"{count} held-out positive and negative reviews of {tokens} tokens (accuracy {test_accuracy:.3f}); "
             f"score: the label's logit (mean {target_logit.mean().item():.2f} before any removal); one token's "
             f"embedding set to 0 per step; top-1 on evidence by chance: {chance:.3f}")
    (out / "faithfulness.md").write_text("\n".join(table) + "\n\n" + notes + "\n", encoding="utf-8")

    print(f"trained in {train_seconds:.1f} s (last loss {loss:.4f}); accuracy {accuracy:.3f} on {count} held-out "
          f"reviews of all three classes")
    print(f"the label's logit falls by {drop['evidence']:.2f} when the planted words are zeroed, "
          f"by {drop['filler']:.2f} when as many filler words are")
    print(f"attribute_tokens (from ids) vs lrpfunc.attribute (from embeddings), max difference: "
          f"{from_ids_vs_embeddings:.2e}")
    print("\n".join(table))
    print(notes)
    print(f"wrote {png}, {page}, {methods_page} and {out / 'faithfulness.md'} in {seconds:.1f} s")
    return {
        "test_accuracy": accuracy,
        "evaluated_accuracy": test_accuracy,
        "logit_drop": drop,
        "reviews": count,
        "chance_top1": chance,
        "abpc": {name: results[name].abpc for name in results},
        "auc_most": {name: results[name].auc_most for name in results},
        "auc_least": {name: results[name].auc_least for name in results},
        "top1_on_evidence": {name: hit_rate[name] for name in results},
        "min_target_logit": target_logit.min().item(),
        "attribute_tokens_vs_attribute": from_ids_vs_embeddings,
        "png": str(png),
        "html": [str(page), str(methods_page)],
        "table": str(out / "faithfulness.md"),
        "seconds": seconds,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)  # the model is tiny: one thread is faster, and immune to a busy machine
    main()
