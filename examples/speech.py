"""Explaining a speech model's transcription: which frames of the spectrogram each generated token rests on.

The user story: a Whisper-style encoder-decoder transcribed a recording, and you want to know, for each token it wrote,
where in the audio the evidence lies, and whether a method's answer reflects what the model does. This script

1. builds a "melody" task: a log-mel spectrogram of ``NOTES`` notes, each a band of two mel bins held for
   ``FRAMES_PER_NOTE`` frames over noise, and as transcript the note names in order. The evidence for generated token
   ``n`` is known: the frames of note ``n``;
2. trains a tiny ``WhisperForConditionalGeneration`` (random weights from a config, float32: model size 32, 2 encoder
   and 2 decoder layers) for a few seconds and reports how many held-out recordings it transcribes exactly;
3. explains every generated token at once with ``lrpfunc.hf.attribute_generation`` (Whisper's ``input_features`` take
   the place of the prompt's ids; one forward pass per recording, ``vmap`` over the generated tokens) under AttnLRP
   and CP-LRP, and draws the spectrogram with each token's relevance over it as ``speech.png``;
4. scores four attributions of the frames (relevance summed over the mel bins) per generated token: AttnLRP, CP-LRP,
   input x gradient and the gradient w.r.t. the features, plus random. The measure: the share of the absolute
   relevance that lies on the token's own note (chance: one in ``NOTES``), and how often the most relevant frame is
   one of that note's;
5. checks that CP-LRP conserves: the frames, the encoder's positions, the decoder's tokens and positions sum to each
   token's logit but for the share the biases take (and to float32 rounding with ``cp_lrp(zero_params="bias")``);
6. prints the table, writes it to ``speech.md`` and returns the numbers.

All attributions start from the generated token's logit and are computed in float32. Whatever the table shows is the
result: the task is not tuned to favour any method.

Run it with ``python examples/speech.py [OUT]`` (default ``./out/speech``); it needs
``pip install lrpfunc[transformers]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

import lrpfunc.hf
import lrpfunc.image
from lrpfunc import composites

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

NOTE_NAMES = ["C", "D", "E", "F", "G", "A", "B", "c"]
SPECIAL = ["<pad>", "<start>", "<end>"]
VOCABULARY = [*SPECIAL, *NOTE_NAMES]
START = VOCABULARY.index("<start>")
NOTES = 3  # notes per recording; the model writes as many tokens
FRAMES_PER_NOTE = 16
MELS = 2 * len(NOTE_NAMES)  # two mel bins per note
FRAMES = NOTES * FRAMES_PER_NOTE


def make_recordings(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, MELS, FRAMES)`` log-mel features and ``(count, NOTES)`` note indices: note ``n`` sounds in frames
    ``n * FRAMES_PER_NOTE`` to ``(n + 1) * FRAMES_PER_NOTE - 1`` on mel bins ``2 p`` and ``2 p + 1`` for pitch ``p``,
    its onset and length jittered by a few frames, over noise."""
    notes = torch.randint(len(NOTE_NAMES), (count, NOTES), generator=generator)
    features = 0.3 * torch.randn(count, MELS, FRAMES, generator=generator)
    for row in range(count):
        for n in range(NOTES):
            onset = n * FRAMES_PER_NOTE + int(torch.randint(0, 4, (), generator=generator))
            length = FRAMES_PER_NOTE - 4 + int(torch.randint(0, 3, (), generator=generator))
            pitch = int(notes[row, n])
            features[row, 2 * pitch: 2 * pitch + 2, onset: onset + length] += 2.0
    return features, notes


def make_model() -> WhisperForConditionalGeneration:
    """A tiny Whisper over :data:`VOCABULARY` with random weights, float32, eager attention."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("speech needs transformers: pip install lrpfunc[transformers]") from error
    config = transformers.WhisperConfig(
        vocab_size=len(VOCABULARY), num_mel_bins=MELS, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=FRAMES // 2, max_target_positions=NOTES + 2, attn_implementation="eager",
        pad_token_id=VOCABULARY.index("<pad>"), bos_token_id=START, eos_token_id=VOCABULARY.index("<end>"),
        decoder_start_token_id=START, suppress_tokens=None, begin_suppress_tokens=None,
    )
    return transformers.WhisperForConditionalGeneration(config)


def transcript(notes: torch.Tensor) -> torch.Tensor:
    """The token ids of the note names, ``(count, NOTES)``."""
    return notes + len(SPECIAL)


def train(model: nn.Module, steps: int, generator: torch.Generator, *, batch_size: int = 64, lr: float = 3e-3) -> float:
    """Cross-entropy of the transcript (teacher forcing) with Adam on fresh recordings; eval mode after."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        features, notes = make_recordings(batch_size, generator)
        labels = transcript(notes)
        decoder = torch.cat([torch.full((batch_size, 1), START), labels[:, :-1]], 1)
        logits = model(input_features=features, decoder_input_ids=decoder, use_cache=False).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(VOCABULARY)), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def gradient_methods(model: nn.Module, features: torch.Tensor, decoder: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input x gradient and the gradient w.r.t. the features for every generated token, ``(B, N, MELS, FRAMES)``
    like ``GenerationAttribution.features``: one backward pass per generated token."""
    count = decoder.shape[1] - 1
    leaf = features.clone().requires_grad_()
    logits = model(input_features=leaf, decoder_input_ids=decoder[:, :-1], use_cache=False).logits
    gradient = torch.zeros(features.shape[0], count, *features.shape[1:])
    for n in range(count):
        target = logits[:, n].gather(1, decoder[:, n + 1, None]).sum()
        (grad,) = torch.autograd.grad(target, leaf, retain_graph=n + 1 < count)
        gradient[:, n] = grad
    return {"input x gradient": gradient * features[:, None], "gradient": gradient}


def main(argv: list[str] | None = None, *, fast: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path.cwd() / "out" / "speech"), help="output folder")
    parser.add_argument("--fast", action="store_true", help="fewer recordings explained (for tests)")
    parser.add_argument("--recordings", type=int, default=128, help="held-out recordings explained and scored")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = 32 if fast or args.fast else args.recordings
    if count < 1:
        parser.error(f"expected --recordings >= 1, got {count}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_model()
    training = time.perf_counter()
    loss = train(model, steps=200, generator=generator)
    train_seconds = time.perf_counter() - training
    model.requires_grad_(False)
    features, notes = make_recordings(count, generator)

    # 1. every generated token explained from one forward pass per recording
    explained = time.perf_counter()
    results = {name: lrpfunc.hf.attribute_generation(model, composite)(features, NOTES)
               for name, composite in (("AttnLRP", composites.attnlrp()), ("CP-LRP", composites.cp_lrp()))}
    explain_seconds = time.perf_counter() - explained
    decoder = results["AttnLRP"].sequences
    transcribed = (decoder[:, 1:] == transcript(notes)).all(1).float().mean().item()

    # 2. CP-LRP conserves: the frames, the positions and the decoder's tokens make up each token's logit, but for what
    # the biases take; without them in the rule (zero_params="bias") to float32 rounding
    def accounted(result: lrpfunc.hf.GenerationAttribution) -> torch.Tensor:
        assert result.positions is not None and result.decoder_relevance is not None
        assert result.decoder_positions is not None
        return (result.relevance.sum(-1) + result.positions.sum(-1) + result.decoder_relevance.sum(-1)
                + result.decoder_positions.sum(-1)) / result.target

    of_logit = accounted(results["CP-LRP"]).mean().item()
    no_bias = lrpfunc.hf.attribute_generation(model, composites.cp_lrp(zero_params="bias"))(features[:16], NOTES)
    conservation = (accounted(no_bias) - 1).abs().max().item()

    # 3. the spectrogram of the first recording (low mel bins at the bottom), and each token's relevance over it
    def picture(values: torch.Tensor) -> Image.Image:
        return lrpfunc.image.heatmap(values.flip(0), cmap="bwr")

    rows = [[picture(features[0])] + [picture(relevance[0, n]) for n in range(NOTES)]
            for relevance in (result.features for result in results.values()) if relevance is not None]
    titles = ["features"] + [f"token {n + 1}: {VOCABULARY[int(decoder[0, n + 1])]}" for n in range(NOTES)]
    png = out / "speech.png"
    figure = lrpfunc.image.labelled_grid(rows, titles=titles, row_labels=list(results), colorbar="bwr",
                                         cell_size=(4 * FRAMES, 8 * MELS))
    figure.save(png)

    # 4. faithfulness: where in time does each token's relevance lie?
    relevance: dict[str, torch.Tensor] = {}
    for name, result in results.items():
        assert result.features is not None  # a speech model's
        relevance[name] = result.features
    relevance.update(gradient_methods(model, features, decoder))
    relevance["random"] = torch.randn(count, NOTES, MELS, FRAMES, generator=torch.Generator().manual_seed(1))
    frame_note = torch.arange(FRAMES) // FRAMES_PER_NOTE  # which note's frames each frame belongs to
    on_note = frame_note[None, None, :] == torch.arange(NOTES)[None, :, None]  # (1, N, FRAMES)
    share: dict[str, float] = {}
    hits: dict[str, float] = {}
    for name, values in relevance.items():
        per_frame = values.sum(2)  # (B, N, FRAMES): summed over the mel bins
        magnitude = per_frame.abs()
        share[name] = ((magnitude * on_note).sum(-1) / magnitude.sum(-1)).mean().item()
        hits[name] = (frame_note[per_frame.argmax(-1)] == torch.arange(NOTES)).float().mean().item()
    seconds = time.perf_counter() - start

    table = ["| method | share of \\|relevance\\| on the token's note | top-1 frame on the token's note |",
             "| --- | --- | --- |"]
    for name in relevance:
        table.append(f"| {name} | {share[name]:.3f} | {hits[name]:.3f} |")
    notes_text = (f"{count} held-out recordings of {NOTES} notes ({transcribed:.3f} transcribed exactly); relevance "
                  f"of the frames, summed over the mel bins; chance: {1 / NOTES:.3f}. CP-LRP: frames + positions + "
                  f"decoder tokens = {of_logit:.3f} of each token's logit on average (the biases take the rest); "
                  f"with zero_params='bias', 1 to {conservation:.1e}")
    (out / "speech.md").write_text("\n".join(table) + "\n\n" + notes_text + "\n", encoding="utf-8")

    print(f"trained in {train_seconds:.1f} s (last loss {loss:.4f}); {transcribed:.3f} of {count} held-out recordings "
          f"transcribed exactly")
    print(f"attribute_generation: {count} recordings x {NOTES} generated tokens, AttnLRP and CP-LRP, in "
          f"{explain_seconds:.1f} s")
    print("\n".join(table))
    print(notes_text)
    print(f"wrote {png} and {out / 'speech.md'} in {seconds:.1f} s")
    return {
        "transcribed": transcribed,
        "recordings": count,
        "share_on_note": share,
        "top1_on_note": hits,
        "of_logit": of_logit,
        "conservation": conservation,
        "png": str(png),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
