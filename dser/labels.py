"""The canonical emotion vocabulary, attribute scaling, and label sets.

Every corpus reader maps its own codes onto one lowercase vocabulary (``EMOTIONS``) and keeps
the raw code beside it. Training picks a *label set*: an ordered list of classes plus the
canonical emotions that fold into each (the standard 4-class IEMOCAP set merges ``excited``
into ``happy``). Samples whose emotion is outside the set are filtered out by the loader.

Usage::

    ls = get_label_set("4class")
    ls.classes            # ('neutral', 'happy', 'angry', 'sad')
    ls.index("excited")   # 1
"""

from __future__ import annotations

from dataclasses import dataclass

EMOTIONS: tuple[str, ...] = (
    "neutral", "happy", "angry", "sad", "fear", "disgust", "surprise",
    "contempt", "calm", "boredom", "frustrated", "excited", "other",
)

ATTRIBUTES: tuple[str, ...] = ("valence", "arousal", "dominance")

STYLES: tuple[str, ...] = ("acted", "natural")


def rescale_attribute(value: float, low: float, high: float) -> float:
    """Linearly map ``value`` from a corpus's own scale ``[low, high]`` to ``[0, 1]``.

    Raises:
        ValueError: if the value lies outside the scale (a corrupt label row).
    """
    if not low <= value <= high:
        raise ValueError(f"attribute value {value} outside the scale [{low}, {high}]")
    return (value - low) / (high - low)


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of classes and the canonical emotions that map onto each.

    Attributes:
        name: the set's name (``4class``, ``crema6``, …) or ``custom``.
        classes: class names in index order.
        members: for each class, the canonical emotions it absorbs.
    """

    name: str
    classes: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        seen: dict[str, str] = {}
        for cls, emos in zip(self.classes, self.members):
            for e in emos:
                if e not in EMOTIONS:
                    raise ValueError(
                        f"label set {self.name!r}: {e!r} is not a canonical emotion; "
                        f"choose from {', '.join(EMOTIONS)}")
                if e in seen:
                    raise ValueError(f"label set {self.name!r}: {e!r} is in both {seen[e]!r} and {cls!r}")
                seen[e] = cls

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, emotion: str | None) -> int | None:
        """Class index of a canonical emotion, or None when the set does not cover it."""
        for i, emos in enumerate(self.members):
            if emotion in emos:
                return i
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes),
                "members": [list(m) for m in self.members]}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSet":
        return cls(d["name"], tuple(d["classes"]), tuple(tuple(m) for m in d["members"]))


LABEL_SETS: dict[str, LabelSet] = {
    # The standard IEMOCAP protocol: neutral, happy (+excited), angry, sad.
    "4class": LabelSet("4class", ("neutral", "happy", "angry", "sad"),
                       (("neutral",), ("happy", "excited"), ("angry",), ("sad",))),
    # CREMA-D's six emotions.
    "6class": LabelSet("6class", ("neutral", "happy", "angry", "sad", "fear", "disgust"),
                       (("neutral",), ("happy", "excited"), ("angry",), ("sad",), ("fear",), ("disgust",))),
    # MSP-Podcast's eight primary classes (contempt and surprise included).
    "8class": LabelSet("8class",
                       ("neutral", "happy", "angry", "sad", "fear", "disgust", "surprise", "contempt"),
                       (("neutral",), ("happy",), ("angry",), ("sad",), ("fear",), ("disgust",),
                        ("surprise",), ("contempt",))),
}


def get_label_set(spec: str | list[str]) -> LabelSet:
    """Resolve a label set by name (``4class``) or as an explicit list of canonical emotions.

    A list such as ``["neutral", "happy+excited", "angry", "sad"]`` builds a custom set; ``+``
    merges emotions into one class named after the first.

    Raises:
        ValueError: for an unknown name or a non-canonical emotion, naming the allowed values.
    """
    if isinstance(spec, str):
        if spec in LABEL_SETS:
            return LABEL_SETS[spec]
        raise ValueError(f"unknown label set {spec!r}; choose one of {', '.join(LABEL_SETS)} "
                         f"or give a list of emotions ({', '.join(EMOTIONS)})")
    members = tuple(tuple(part.strip() for part in item.split("+")) for item in spec)
    return LabelSet("custom", tuple(m[0] for m in members), members)
