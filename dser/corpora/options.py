"""Reader options: the typed ``KEY=VALUE`` settings a corpus reader accepts.

``dser shard CORPUS ROOT --option include_song=true`` hands every value to the reader as a
string; Python callers may pass real values (``include_song=True``). Each reader declares its
options as a table of ``Option``s and calls ``parse_options`` first thing, so an unknown key or
a bad value fails at once with the option's name and the allowed ones.

Usage::

    OPTIONS = {"include_song": Option(parse_bool, False, "also read sung clips")}

    def read(root, **options):
        opts = parse_options("ravdess", options, OPTIONS)
        opts["include_song"]      # True / False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class Option:
    """One reader option.

    Attributes:
        parse: turns the given value (a CLI string, or already the right type) into the typed
            value; raises ValueError saying what was expected.
        default: the value used when the option is not given.
        help: one line on what the option does.
    """

    parse: Callable[[Any], Any]
    default: Any
    help: str


def parse_options(corpus: str, given: dict[str, Any], allowed: dict[str, Option]) -> dict[str, Any]:
    """Check and type a reader's options, filling in defaults.

    Args:
        corpus: the reader's CLI name, for the error message.
        given: the options as passed (``{"n_folds": "5"}``).
        allowed: the reader's option table.

    Returns:
        Every allowed option mapped to its typed value (given or default).

    Raises:
        ValueError: an unknown option or a value its parser refuses, naming the option and the
            allowed options.
    """
    names = ", ".join(allowed) if allowed else "none"
    for key in given:
        if key not in allowed:
            raise ValueError(f"{corpus}: unknown option {key!r}; allowed options: {names}")
    out = {}
    for key, option in allowed.items():
        if key not in given:
            out[key] = option.default
            continue
        try:
            out[key] = option.parse(given[key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{corpus}: bad value {given[key]!r} for option {key}: {e} "
                             f"(allowed options: {names})") from None
    return out


def parse_bool(value: Any) -> bool:
    """``true/false/1/0/yes/no`` (any case), or a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def parse_fold_count(value: Any) -> int:
    """An integer >= 2 (the number of speaker-independent folds)."""
    if isinstance(value, bool):
        raise ValueError("expected an integer >= 2")
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError("expected an integer >= 2") from None
    if n < 2:
        raise ValueError("expected an integer >= 2")
    return n


# The fold count of the readers whose corpora have no official split (``assign_folds``).
N_FOLDS = Option(parse_fold_count, 5, "number of speaker-independent folds fold0 … fold{n-1}")


def parse_scale(value: Any) -> tuple[float, float]:
    """``LOW,HIGH`` with LOW < HIGH (a corpus's attribute scale, e.g. ``1,5``), or a pair."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError("expected LOW,HIGH, e.g. 1,5") from None
    if not low < high:
        raise ValueError(f"expected LOW < HIGH, got {low} and {high}")
    return low, high
