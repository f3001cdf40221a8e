"""milhema's own exception types.

Every error a user can cause is one of these, with a message that names the file, the row and
the value, and says what to do. The CLI prints the message on one line and exits with status 2.
"""


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


class TrackingError(MilhemaError):
    """Experiment tracking (W&B, pseudonymisation salt) cannot be set up."""


class TrackingWarning(UserWarning):
    """Tracking failed and was switched off; the run itself goes on."""
