"""Attribute labels for tagging: a fixed vocabulary of attributes and their values, and multi-hot targets.

A sample's ``labels`` (a JSONL/WebDataset JSON field or an HF column of that name; the demo source fills it from its
scene) maps each attribute to one value or a list of values: ``{"color": ["red", "blue"], "kind": "circle"}``. An
attribute may be left out (no value of it applies). Targets are one multi-hot vector over every (attribute, value)
pair in vocabulary order. A label that the vocabulary does not know is an error naming the sample's origin
(``file:line`` for JSONL), never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

__all__ = ["AttributeVocab", "read_labels"]


def read_labels(raw: Any, origin: str) -> dict[str, list[str]]:
    """Validate a sample's ``labels`` field into ``{attribute: [values]}``; errors name ``origin``."""
    if raw is None:
        raise ValueError(f"{origin}: the sample has no 'labels' field (attribute tagging needs one per sample)")
    if not isinstance(raw, Mapping):
        raise ValueError(f"{origin}: 'labels' must be an object of attribute -> value(s), got {type(raw).__name__}")
    labels: dict[str, list[str]] = {}
    for attribute, values in raw.items():
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"{origin}: labels[{attribute!r}] must be a string or a list of non-empty strings, "
                             f"got {values!r}")
        labels[str(attribute)] = list(values)
    return labels


@dataclass(frozen=True)
class AttributeVocab:
    """Ordered attributes, each with its ordered values; ``size`` (attribute, value) pairs in all."""

    attributes: dict[str, list[str]]

    def __post_init__(self) -> None:
        if not self.attributes:
            raise ValueError("attribute vocabulary is empty: give at least one attribute with values")
        for attribute, values in self.attributes.items():
            if not values or len(set(values)) != len(values):
                raise ValueError(f"attribute {attribute!r}: values must be a non-empty list without repeats, "
                                 f"got {values!r}")

    @classmethod
    def from_labels(cls, labelled: Iterable[tuple[Any, str]]) -> "AttributeVocab":
        """The vocabulary of every ``(labels, origin)`` seen, attributes and values in order of first appearance."""
        attributes: dict[str, list[str]] = {}
        for raw, origin in labelled:
            for attribute, values in read_labels(raw, origin).items():
                known = attributes.setdefault(attribute, [])
                known.extend(v for v in values if v not in known)
        return cls({a: v for a, v in attributes.items() if v})

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.attributes.values())

    def spans(self) -> dict[str, slice]:
        """Each attribute's slice of the multi-hot vector."""
        out, start = {}, 0
        for attribute, values in self.attributes.items():
            out[attribute] = slice(start, start + len(values))
            start += len(values)
        return out

    def encode(self, raw: Any, origin: str) -> torch.Tensor:
        """Multi-hot float target [size] of a sample's ``labels``; an unknown attribute or value names ``origin``."""
        target = torch.zeros(self.size)
        spans = self.spans()
        for attribute, values in read_labels(raw, origin).items():
            if attribute not in self.attributes:
                raise ValueError(f"{origin}: unknown attribute {attribute!r} in labels (known: "
                                 f"{', '.join(self.attributes)})")
            known = self.attributes[attribute]
            for value in values:
                if value not in known:
                    raise ValueError(f"{origin}: unknown value {value!r} for attribute {attribute!r} (known: "
                                     f"{', '.join(known)})")
                target[spans[attribute].start + known.index(value)] = 1.0
        return target
