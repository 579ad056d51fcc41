r"""Reference prompts ``d_t`` for a concept ``c``: what the concept is contrasted with.

* :class:`Parent`: a generic parent prompt (``"bird"``): the map shows what the concept adds to the object.
* :class:`Siblings`: the concept with one attribute word swapped for its alternatives (``"red wing"`` ->
  ``"blue wing"``, ``"black wing"``): the map shows what tells this attribute value from the others.
* :class:`Nearest`: the ``k`` candidate prompts whose (template-ensembled) text embeddings have the highest cosine
  similarity to the concept's, the text-side analogue of the paper's ``weights`` strategy.

Each strategy turns a concept into a list of prompts; :func:`reference_prompts` also accepts plain prompts, and
:func:`nearest_rows` ranks rows of an existing classifier. The concept is never its own reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from finercam.concepts.encoders import CLIPEncoders
from finercam.concepts.zero_shot import check_prompts, encode_prompts, normalise_prompt
from finercam.errors import InvalidArgumentError, InvalidTypeError


@dataclass(frozen=True)
class Parent:
    """A generic parent prompt, e.g. ``Parent("bird")``."""

    prompt: str = "bird"

    def prompts(self, concept: str, encoders: CLIPEncoders | None = None,
                templates: Sequence[str] | None = None) -> list[str]:
        return [self.prompt]


@dataclass(frozen=True)
class Siblings:
    """The concept with its attribute word replaced by each other value, e.g. ``Siblings(("red", "blue", "black"))``
    turns ``"red wing"`` into ``["blue wing", "black wing"]``. The first word of the concept found among the values
    is the one swapped; multi-word values such as ``"light blue"`` are matched as phrases, the longest value first
    (``"blue green wing"`` with values blue, blue green, red swaps ``"blue green"``)."""

    values: tuple[str, ...]

    def __post_init__(self) -> None:
        values = (self.values,) if isinstance(self.values, str) else tuple(self.values)
        values = check_prompts(values, "sibling values")
        if len(values) < 2:
            raise InvalidArgumentError(f"Siblings needs at least two values to swap between; got {list(values)}")
        object.__setattr__(self, "values", values)

    def prompts(self, concept: str, encoders: CLIPEncoders | None = None,
                templates: Sequence[str] | None = None) -> list[str]:
        words = concept.split()
        longest_first = sorted(self.values, key=lambda value: -len(value.split()))
        for start in range(len(words)):
            for value in longest_first:
                size = len(value.split())
                if normalise_prompt(" ".join(words[start : start + size])) == normalise_prompt(value):
                    before, after = words[:start], words[start + size :]
                    return [" ".join([*before, other, *after]) for other in self.values
                            if normalise_prompt(other) != normalise_prompt(value)]
        raise InvalidArgumentError(
            f"concept {concept!r} contains none of the sibling values {list(self.values)}; name the attribute value "
            "to swap (e.g. 'red wing' with values red, blue, black)"
        )


@dataclass(frozen=True)
class Nearest:
    """The ``k`` candidate prompts most similar to the concept in text-embedding space (cosine of the ensembled
    embeddings); the concept itself is skipped if it is among the candidates."""

    candidates: tuple[str, ...]
    k: int = 3

    def __post_init__(self) -> None:
        candidates = (self.candidates,) if isinstance(self.candidates, str) else tuple(self.candidates)
        object.__setattr__(self, "candidates", check_prompts(candidates, "nearest candidates"))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidArgumentError(f"Nearest: k must be an int >= 1; got {self.k!r}")

    def prompts(self, concept: str, encoders: CLIPEncoders | None = None,
                templates: Sequence[str] | None = None) -> list[str]:
        if encoders is None:
            raise InvalidArgumentError("Nearest references need the model's text encoder")
        others = [c for c in self.candidates if normalise_prompt(c) != normalise_prompt(concept)]
        if not others:
            raise InvalidArgumentError(f"Nearest: no candidate besides the concept {concept!r}")
        rows = encode_prompts(encoders, [concept, *others], templates)
        order = nearest_rows(rows, 0, self.k)
        return [others[int(index) - 1] for index in order]


ReferenceSpec = str | Sequence[str] | Parent | Siblings | Nearest


def nearest_rows(rows: Tensor, target: int, k: int) -> Tensor:
    """The ``k`` rows (indices) with the highest cosine similarity to row ``target``, never ``target`` itself; ties
    broken by index."""
    unit = torch.nn.functional.normalize(rows.detach().float(), dim=-1)
    similarity = unit @ unit[target]
    order = torch.sort(similarity, descending=True, stable=True).indices
    return order[order != target][:k]


def reference_prompts(concept: str, versus: ReferenceSpec, encoders: CLIPEncoders | None = None,
                      templates: Sequence[str] | None = None) -> tuple[str, ...]:
    """The reference prompts of ``concept``: ``versus`` as one prompt, a list of prompts, or a strategy.

    Raises:
        InvalidArgumentError: no reference, an empty or repeated prompt, or a reference equal to the concept.
    """
    if isinstance(versus, str):
        prompts: Sequence[str] = [versus]
    elif isinstance(versus, Parent | Siblings | Nearest):
        prompts = versus.prompts(concept, encoders, templates)
    elif isinstance(versus, Sequence):
        prompts = list(versus)
    else:
        raise InvalidTypeError(
            f"versus must be a prompt, a list of prompts, Parent, Siblings or Nearest; got {type(versus).__name__}"
        )
    chosen = check_prompts(prompts, "versus")
    for prompt in chosen:
        if normalise_prompt(prompt) == normalise_prompt(concept):
            raise InvalidArgumentError(
                f"the reference {prompt!r} is the concept itself; a concept cannot be its own reference"
            )
    return chosen
