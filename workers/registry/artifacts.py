"""Model artifacts: skops files addressed by URI, verified by sha256 before every load.

A fitted estimator is written with :mod:`skops.io` (a zip of JSON and arrays that loads without
executing pickle code) and its sha256 is recorded next to it in the registry (and in a
``<file>.sha256`` sidecar, in ``sha256sum`` format, for offline tools). Loading reads the bytes
once, hashes *those* bytes, refuses a mismatch with :class:`ArtifactTampered`, and only then
hands the same bytes to skops with an explicit ``trusted=`` list: every type skops does not
trust by default must be a *class* under one of the allowed module prefixes (from settings) or
one of the few functions in :data:`TRUSTED_FUNCTIONS`, otherwise the load is refused with
:class:`UntrustedArtifact`. Functions are refused because skops' reduce nodes *call* the named
object with arguments taken from the file (``numpy.testing``'s ``runstring`` is an ``exec``), and
a handful of classes are refused because merely building them runs file data as code or
truncates a file (:data:`NEVER_TRUSTED_CLASSES`). The file's own ``get_untrusted_types()`` is
never passed back wholesale — that would trust whatever the file holds.

Local paths and ``file://`` URIs are supported; other schemes raise :class:`ArtifactError`
so object storage can be added behind the same two functions.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

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

NEVER_TRUSTED_PREFIXES = (
    "os.", "posix.", "nt.", "subprocess.", "sys.", "shutil.", "importlib.", "pickle.",
    # Build and test tooling inside the trusted libraries: full of exec/eval, never part of a model.
    "numpy.f2py.", "numpy.distutils.", "numpy.testing.", "scipy._lib._testutils.", "sklearn.utils._testing.",
)

NEVER_TRUSTED_CLASSES = frozenset(
    {
        # __setstate__ exec()s the ``_parse_arg_template`` string it is given (every scipy.stats
        # distribution), so an ObjectNode runs the file's code.
        "scipy.stats._distn_infrastructure.rv_generic",
        # Constructors that open a file named by their first argument for writing (truncating it).
        "numpy.memmap",
        "scipy.io._fortran.FortranFile",
        "scipy.io._netcdf.netcdf_file",
    }
)
"""Classes (and their subclasses) refused under any prefix: building one from file data is unsafe."""

TRUSTED_FUNCTIONS = frozenset(
    {
        # Default ``score_func`` of SelectKBest / SelectPercentile / SelectFpr / SelectFdr / SelectFwe /
        # GenericUnivariateSelect: kept by reference and only ever called on arrays.
        "sklearn.feature_selection._univariate_selection.f_classif",
        # Default ``pooling_func`` of FeatureAgglomeration.
        "numpy.mean",
    }
)
"""The only non-class names trusted (still subject to the prefixes): pure numeric functions that
scikit-learn estimators hold by default. numpy ufuncs and dtypes are in skops' own defaults and
never reach :func:`is_trusted`; the project's own pipelines need none of these."""


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
    from config.settings import local_path

    try:
        return local_path(uri)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None


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


def _name_allowed(type_name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a dotted name passes the deny lists and falls under an allowed prefix (no import)."""
    if type_name in NEVER_TRUSTED or type_name.startswith(NEVER_TRUSTED_PREFIXES):
        return False
    parts = type_name.split(".")
    # ``__main__`` modules run a program when imported; dunder attributes reach module internals.
    if any(not part or part.startswith("__") or part in ("tests", "conftest") for part in parts):
        return False
    for prefix in prefixes:
        base = prefix.rstrip(".")
        if base and (type_name == base or type_name.startswith(base + ".")):
            return True
    return False


def _resolve(type_name: str) -> Any:
    """The object skops would load for ``type_name``, or None when it cannot be found.

    skops imports ``module`` and takes one attribute from it (``module.Name``); this does the
    same, reading the module's ``__dict__`` so no module ``__getattr__`` or descriptor runs. Only
    names that already passed :func:`_name_allowed` get here, so only allowed modules are imported.
    """
    module_name, _, attr = type_name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # missing module, or one that fails to import: skops could not load it either
        return None
    return vars(module).get(attr)


def is_trusted(type_name: str, prefixes: Iterable[str]) -> bool:
    """Whether skops may load the type named ``type_name`` (``module.Name``) from an artifact.

    The name must fall under one of the allowed prefixes at a dot boundary (``sklearn`` and
    ``sklearn.`` both allow ``sklearn.tree.DecisionTreeClassifier`` but not ``sklearnx.Evil``) and
    must resolve to a **class** whose own module is allowed too — not a function, module or
    missing name, because skops calls what it loads with arguments from the file — unless it is
    in :data:`TRUSTED_FUNCTIONS`. :data:`NEVER_TRUSTED`, :data:`NEVER_TRUSTED_PREFIXES` and
    :data:`NEVER_TRUSTED_CLASSES` (with subclasses) are refused regardless.
    """
    prefixes = tuple(prefixes)
    if not _name_allowed(type_name, prefixes):
        return False
    if type_name in TRUSTED_FUNCTIONS:
        return True
    obj = _resolve(type_name)
    if not isinstance(obj, type) or not _name_allowed(f"{obj.__module__}.{obj.__qualname__}", prefixes):
        return False
    return not any(f"{cls.__module__}.{cls.__qualname__}" in NEVER_TRUSTED_CLASSES for cls in obj.__mro__)


def default_trusted_prefixes() -> tuple[str, ...]:
    """``settings.trusted_prefixes`` (``RETRAIN_TRUSTED_PREFIXES``), or the safe core without settings."""
    try:
        from config.settings import get_settings

        return tuple(get_settings().trusted_prefixes)
    except Exception:  # settings unavailable (e.g. a bad environment): fall back to the safe core
        from config.settings import DEFAULT_TRUSTED_PREFIXES

        return DEFAULT_TRUSTED_PREFIXES


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
        The file names a function, or a type outside the allowed prefixes (nothing was deserialized).
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
