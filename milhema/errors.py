"""milhema's own exception types.

Every error a user can cause is one of these, with a message that names the file, the row and
the value, and says what to do. The CLI prints the message on one line and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MilhemaError(Exception):
    """Base class of every error milhema raises on bad input."""


class ManifestError(MilhemaError):
    """patients.csv or slides.csv is malformed or inconsistent."""


class BagError(MilhemaError):
    """A bag file is missing, unreadable or does not follow the bag format."""


class ConfigError(MilhemaError):
    """A config file or a --set override is invalid."""


class EmbedError(MilhemaError):
    """The backbone, its weights or the cell images cannot be used for embedding."""


class BagSettingsError(EmbedError):
    """A finished bag in the output folder was embedded with other settings (``--overwrite`` redoes it)."""


class TrackingError(MilhemaError):
    """Experiment tracking (W&B, pseudonymisation salt) cannot be set up."""


class TrackingWarning(UserWarning):
    """Tracking failed and was switched off; the run itself goes on."""


def closest(value: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The ``n`` choices most like ``value`` (a case-only difference first), for "did you mean" hints.

    A very long ``value`` is not a typo, and fuzzy matching it would be slow: it gets none.
    """
    choices = list(choices)
    if len(value) > 100:
        return []
    same_letters = [c for c in choices if c.lower() == value.lower() and c != value]
    if same_letters:
        return same_letters[:n]
    return difflib.get_close_matches(value, choices, n=n, cutoff=cutoff)


def did_you_mean(value: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6, prefix: str = "") -> str:
    """``" (did you mean 'x'?)"`` naming the closest of ``choices`` (each written ``prefix + choice``),
    or ``""`` when none is close; the one way every milhema message suggests a name."""
    hints = [repr(prefix + hint) for hint in closest(value, choices, n=n, cutoff=cutoff)]
    if not hints:
        return ""
    listed = hints[0] if len(hints) == 1 else f"{', '.join(hints[:-1])} or {hints[-1]}"
    return f" (did you mean {listed}?)"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
