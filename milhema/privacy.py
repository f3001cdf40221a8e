"""Pseudonyms for patient and slide identifiers: a keyed hash (HMAC-SHA256) with a local secret salt.

The salt lives in a file outside every run folder (default ``~/.config/milhema/salt``), so what is
logged to an experiment tracker cannot be turned back into identifiers by someone who only has
the logs, while the same identifier always gets the same pseudonym on this machine (runs stay
comparable). Whoever holds the salt file can re-identify: keep it private, never commit it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from milhema.errors import TrackingError

SALT_ENV = "MILHEMA_SALT_FILE"
# 32 random bytes = 256 bits, the HMAC-SHA256 block-size-friendly key length.
_SALT_BYTES = 32
_PREFIX = {"patient": "p_", "slide": "s_"}


def salt_path(configured: str | os.PathLike[str] | None = None,
              environ: Mapping[str, str] | None = None) -> Path:
    """Where the salt file is: ``configured`` (``tracking.salt_file``), else ``$MILHEMA_SALT_FILE``,
    else ``$XDG_CONFIG_HOME/milhema/salt`` (``~/.config/milhema/salt``)."""
    env = os.environ if environ is None else environ
    if configured:
        return Path(configured).expanduser()
    if env.get(SALT_ENV):
        return Path(env[SALT_ENV]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "milhema" / "salt"


def load_or_create_salt(path: Path) -> bytes:
    """The salt in ``path`` (hex text); a new random one, readable by the owner only (0600), if missing.

    Raises:
        TrackingError: the file cannot be read or created, or does not hold a valid salt.
    """
    path = Path(path)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_new_salt(path)
        except OSError as exc:
            raise TrackingError(f"pseudonymisation salt {path}: cannot create it ({exc.strerror})") from exc
    try:
        text = path.read_text(encoding="ascii").strip()
        salt = bytes.fromhex(text)
    except OSError as exc:
        raise TrackingError(f"pseudonymisation salt {path}: cannot read it ({exc.strerror})") from exc
    except ValueError as exc:
        raise TrackingError(f"pseudonymisation salt {path}: expected hex text, found something else") from exc
    if len(salt) < 16:
        raise TrackingError(f"pseudonymisation salt {path}: too short ({len(salt)} bytes, at least 16 needed)")
    return salt


def _write_new_salt(path: Path) -> None:
    try:
        # O_EXCL: two processes starting at once never overwrite each other's salt.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # the other process made it; read below
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_hex(_SALT_BYTES) + "\n")


class Pseudonymizer:
    """Maps identifiers to stable pseudonyms, e.g. ``("P017", "patient") -> "p_3fa9c2e1b0d4a6f8"``.

    ``salt=None`` is the identity (``tracking.pseudonymize: false``).
    """

    def __init__(self, salt: bytes | None) -> None:
        self._salt = salt

    @property
    def enabled(self) -> bool:
        return self._salt is not None

    def __call__(self, identifier: str, kind: str = "patient") -> str:
        """Pseudonym of ``identifier``; ``kind`` (patient or slide) separates the two namespaces."""
        if self._salt is None:
            return str(identifier)
        # 64 bits of the HMAC: no collision expected below ~10^9 identifiers.
        digest = hmac.new(self._salt, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()[:16]
        return _PREFIX.get(kind, "x_") + digest
