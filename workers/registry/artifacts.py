"""Model artifacts: skops files addressed by URI, verified by sha256 before every load.

A fitted estimator is written with :mod:`skops.io` (a zip of JSON and arrays that loads without
executing pickle code) and its sha256 is recorded next to it in the registry (and in a
``<file>.sha256`` sidecar, in ``sha256sum`` format, for offline tools). Loading reads the bytes
once, hashes *those* bytes, refuses a mismatch with :class:`ArtifactTampered`, and only then
hands the same bytes to skops with an explicit ``trusted=`` list: every type skops does not
trust by default must match one of the allowed module prefixes (from settings), otherwise the
load is refused with :class:`UntrustedArtifact`. The file's own ``get_untrusted_types()`` is
never passed back wholesale — that would trust whatever the file holds.

Local paths and ``file://`` URIs are supported; other schemes raise :class:`ArtifactError`
so object storage can be added behind the same two functions.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlparse

import skops.io as sio

ARTIFACT_SUFFIX = ".skops"
SIDECAR_SUFFIX = ".sha256"
COMPRESSION = zipfile.ZIP_DEFLATED
"""Artifacts are deflate-compressed; the gate's ``model_size`` check measures the same bytes."""

NEVER_TRUSTED = frozenset(
    {
        "builtins.eval",
        "builtins.exec",
        "builtins.compile",
        "builtins.__import__",
        "builtins.open",
        "builtins.getattr",
        "builtins.setattr",
        "builtins.breakpoint",
        "builtins.input",
    }
)
"""Types refused even when an allowed prefix (such as ``builtins.``) would match them."""

NEVER_TRUSTED_PREFIXES = ("os.", "posix.", "nt.", "subprocess.", "sys.", "shutil.", "importlib.", "pickle.")


class ArtifactError(Exception):
    """An artifact that cannot be stored or loaded; ``str()`` is one line."""


class ArtifactTampered(ArtifactError):
    """The artifact's bytes do not match the recorded sha256; it was not loaded."""

    def __init__(self, uri: str, expected: str, actual: str):
        super().__init__(f"{uri}: sha256 mismatch (expected {expected[:12]}..., got {actual[:12]}...); refusing to load")
        self.uri = uri
        self.expected = expected
        self.actual = actual


class UntrustedArtifact(ArtifactError):
    """The artifact holds types outside the trusted module prefixes; it was not loaded."""

    def __init__(self, uri: str, types: list[str]):
        shown = ", ".join(types[:5]) + (f" (+{len(types) - 5} more)" if len(types) > 5 else "")
        super().__init__(f"{uri}: untrusted types in artifact: {shown}")
        self.uri = uri
        self.types = types


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact lives and what its bytes hash to (JSON-friendly)."""

    uri: str
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uri_to_path(uri: str | os.PathLike[str]) -> Path:
    """Map a local path or ``file://`` URI to a :class:`~pathlib.Path`.

    Raises
    ------
    ArtifactError
        For any other scheme (``s3://``, ``gs://``...), which is not supported yet.
    """
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ArtifactError(f"{text}: file URIs on another host are not supported")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter = a Windows drive
        raise ArtifactError(f"{text}: unsupported artifact URI scheme '{parsed.scheme}'")
    return Path(text)


def path_to_uri(path: Path) -> str:
    return path.resolve().as_uri()


def artifact_bytes(estimator: Any) -> bytes:
    """Serialize ``estimator`` exactly as :func:`save_artifact` writes it (skops, deflated)."""
    return sio.dumps(estimator, compression=COMPRESSION)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_artifact(estimator: Any, destination: str | os.PathLike[str], *, sidecar: bool = True) -> ArtifactRef:
    """Write a fitted estimator with skops and return its URI and sha256.

    Parameters
    ----------
    estimator
        Any fitted scikit-learn-API estimator or pipeline.
    destination
        A file path / ``file://`` URI ending in ``.skops``, or a directory (``.../``; the file is
        then named after its content hash). skops output is not byte-for-byte reproducible (zip
        times, object ids), so callers wanting idempotent writes name the file themselves, e.g.
        ``<root>/<model>/<version>.skops``.
    sidecar
        Also write ``<file>.sha256`` in ``sha256sum`` format for offline tools.

    Returns
    -------
    ArtifactRef
        ``uri`` (always ``file://``), ``sha256`` and ``size_bytes``.

    Examples
    --------
    >>> ref = save_artifact(model, "file:///tmp/models/")            # doctest: +SKIP
    >>> model = load_artifact(ref.uri, ref.sha256)                      # doctest: +SKIP
    """
    data = artifact_bytes(estimator)
    digest = sha256_hex(data)
    path = uri_to_path(destination)
    if path.is_dir() or os.fspath(destination).endswith(("/", os.sep)):
        path = path / f"{digest[:16]}{ARTIFACT_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename: a reader never sees a half-written artifact.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=ARTIFACT_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sidecar:
        path.with_name(path.name + SIDECAR_SUFFIX).write_text(f"{digest}  {path.name}\n")
    return ArtifactRef(uri=path_to_uri(path), sha256=digest, size_bytes=len(data))


def read_sidecar(uri: str | os.PathLike[str]) -> str | None:
    """The sha256 recorded in ``<file>.sha256`` next to the artifact, or None when absent."""
    path = uri_to_path(uri)
    side = path.with_name(path.name + SIDECAR_SUFFIX)
    try:
        text = side.read_text().strip()
    except FileNotFoundError:
        return None
    digest = text.split()[0].lower() if text else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ArtifactError(f"{side}: not a sha256 sidecar")
    return digest


def is_trusted(type_name: str, prefixes: Iterable[str]) -> bool:
    """Whether a skops type name (``module.Qualname``) falls under one of the allowed prefixes.

    A prefix matches at a dot boundary only (``sklearn`` and ``sklearn.`` both allow
    ``sklearn.tree.DecisionTreeClassifier`` but not ``sklearnx.Evil``); types in
    :data:`NEVER_TRUSTED` / :data:`NEVER_TRUSTED_PREFIXES` are refused regardless.
    """
    if type_name in NEVER_TRUSTED or type_name.startswith(NEVER_TRUSTED_PREFIXES):
        return False
    for prefix in prefixes:
        base = prefix.rstrip(".")
        if base and (type_name == base or type_name.startswith(base + ".")):
            return True
    return False


def default_trusted_prefixes() -> tuple[str, ...]:
    """``settings.trusted_prefixes`` (``RETRAIN_TRUSTED_PREFIXES``), or the safe core without settings."""
    try:
        from config.settings import get_settings

        return tuple(get_settings().trusted_prefixes)
    except Exception:  # settings unavailable (e.g. a bad environment): fall back to the safe core
        return ("sklearn.", "numpy.", "scipy.")


def load_artifact(
    uri: str | os.PathLike[str],
    sha256: str | None,
    trusted_prefixes: Iterable[str] | None = None,
    *,
    allow_unverified: bool = False,
) -> Any:
    """Load an artifact after verifying its hash and the types it holds.

    Parameters
    ----------
    uri
        Local path or ``file://`` URI of a ``.skops`` file.
    sha256
        The hash recorded when the artifact was saved. ``None`` is refused unless
        ``allow_unverified`` (offline tools loading a user's own file with no recorded hash).
    trusted_prefixes
        Module prefixes allowed beyond skops' defaults; ``None`` = ``settings.trusted_prefixes``.

    Raises
    ------
    ArtifactTampered
        The bytes do not hash to ``sha256`` (nothing was deserialized).
    UntrustedArtifact
        The file holds a type outside the allowed prefixes (nothing was deserialized).
    ArtifactError
        Missing/unreadable file, unsupported URI, or a file skops cannot read.
    """
    path = uri_to_path(uri)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{uri}: no such artifact") from None
    except OSError as exc:
        raise ArtifactError(f"{uri}: cannot read artifact ({exc.strerror})") from None
    if sha256 is None:
        if not allow_unverified:
            raise ArtifactError(f"{uri}: no sha256 recorded; refusing to load an unverified artifact")
    else:
        actual = sha256_hex(data)
        if actual != sha256.lower():
            raise ArtifactTampered(str(uri), sha256.lower(), actual)
    prefixes = tuple(trusted_prefixes) if trusted_prefixes is not None else default_trusted_prefixes()
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:
        raise ArtifactError(f"{uri}: not a readable skops artifact ({type(exc).__name__}: {exc})") from None
    refused = [t for t in untrusted if not is_trusted(t, prefixes)]
    if refused:
        raise UntrustedArtifact(str(uri), refused)
    try:
        return sio.loads(data, trusted=list(untrusted))
    except Exception as exc:
        raise ArtifactError(f"{uri}: cannot load artifact ({type(exc).__name__}: {exc})") from None
