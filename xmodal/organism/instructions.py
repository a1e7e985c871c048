"""The organism's stage-2 instruction data, drawn from its world as LLaVA's mix is from real data.

Three kinds of sample, each one user turn and one short model answer:
- a caption: the image alone, answered by its caption (stage 1's objective, kept);
- a question about an image: the image and a question ("What colour is the shape?"),
  answered by one word ("red");
- the same question about a text description of the scene instead of the image
  ("A small red circle on the left in the snow. What colour is the shape?" -> "red"),
  so that text and image reach the same answers through one model.

Question types: colour, shape, count, background, position (single shapes) and the
rendered word (word scenes). Every answer is a single word of the world's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from xmodal.organism import world

QUESTION_TYPES = ("colour", "shape", "count", "background", "position", "word")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_WORDS = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom", "in the middle": "middle"}
KINDS = ("caption", "image_question", "text_question")


@dataclass(frozen=True)
class Instruction:
    kind: str  # caption | image_question | text_question
    question_type: str  # "caption" for captions, else one of QUESTION_TYPES
    prompt: str  # the user turn's text (after the image, if any)
    answer: str
    scene: world.Scene
    image: Image.Image | None  # None for text questions


def questions(scene: world.Scene) -> list[tuple[str, str, str]]:
    """(question type, question, one-word answer) for everything a scene shows."""
    if scene.kind == "words":
        return [("word", "What word is written?", scene.word)]
    single = scene.count == 1
    asked = [
        ("colour", "What colour is the shape?" if single else "What colour are the shapes?", scene.colour),
        ("shape", "What shape is it?" if single else "What shape are they?", scene.shape),
        ("count", "How many shapes are there?", COUNT_WORDS[scene.count]),
        ("background", "What is the background?", scene.background),
    ]
    if single:
        asked.append(("position", "Where is the shape?", POSITION_WORDS[scene.position]))
    return asked


def description(scene: world.Scene) -> str:
    """The scene in words, as a sentence: its caption, capitalised ("A small red circle on the left.")."""
    caption = scene.caption
    return caption[0].upper() + caption[1:] + "."


def instruction_mix(seed: int, n: int, kind_weights: Sequence[float] = (0.3, 0.35, 0.35), word_fraction: float = 0.15) -> list[Instruction]:
    """`n` samples drawn fresh from the world; the same seed gives the same samples.

    `kind_weights` are the probabilities of a caption, an image question and a text question.
    """
    rng = np.random.default_rng(seed)
    weights = np.asarray(kind_weights, dtype=float) / np.sum(kind_weights)
    samples = []
    for _ in range(n):
        scene = world.random_scene(rng, word_fraction)
        image = world.render(scene, rng)
        kind = KINDS[int(rng.choice(len(KINDS), p=weights))]
        if kind == "caption":
            samples.append(Instruction(kind, "caption", "", scene.caption, scene, image))
            continue
        question_type, question, answer = questions(scene)[int(rng.integers(len(questions(scene))))]
        if kind == "image_question":
            samples.append(Instruction(kind, question_type, question, answer, scene, image))
        else:
            samples.append(Instruction(kind, question_type, f"{description(scene)} {question}", answer, scene, None))
    return samples


def answer_vocabulary(tokenizer: Any) -> set[int]:
    """Every token id a question's answer can contain (captions' tokens are counted elsewhere)."""
    answers = {*world.COLOURS, *world.SHAPES, *COUNT_WORDS.values(), *world.BACKGROUNDS, *POSITION_WORDS.values(), *world.WORDS}
    ids: set[int] = set()
    for answer in answers:
        ids.update(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return ids


def encode_instructions(adapter: Any, samples: Sequence[Instruction]) -> dict[str, torch.Tensor]:
    """Samples that all have an image, or all have none, as one right-padded batch.

    `targets[b, t]` is the token to predict at position t (the answer's tokens and
    <end_of_turn>), -100 elsewhere, so that a loss reads hidden states where targets != -100.
    """
    with_image = samples[0].image is not None
    if any((s.image is not None) != with_image for s in samples):
        raise ValueError("encode_instructions takes samples that all have an image, or all have none")
    processor, tokenizer = adapter.processor, adapter.tokenizer
    processor.tokenizer.padding_side = "right"  # positions then match unpadded inference
    prompts = [adapter.render_prompt(s.prompt, with_image, use_chat_template=True) for s in samples]
    texts = [p + s.answer + "<end_of_turn>" for p, s in zip(prompts, samples)]
    if with_image:
        images = [[s.image] for s in samples]
        encoded = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
        starts = [len(processor(text=[p], images=[[s.image]], add_special_tokens=False)["input_ids"][0]) for p, s in zip(prompts, samples)]
    else:
        tokenizer.padding_side = "right"
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        starts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    ids = encoded["input_ids"]
    targets = torch.full_like(ids, -100)
    lengths = encoded["attention_mask"].sum(dim=1)
    for row, (start, length) in enumerate(zip(starts, lengths.tolist())):
        # position t predicts token t + 1: from the last prompt token to the one before <end_of_turn>
        targets[row, start - 1 : length - 1] = ids[row, start:length]
    return {**encoded, "targets": targets}
