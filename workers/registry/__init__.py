"""Model registry: versions, aliases and lineage (Redis), and verified skops artifacts."""

from workers.registry.artifacts import (
    ArtifactError,
    ArtifactRef,
    ArtifactTampered,
    UntrustedArtifact,
    load_artifact,
    save_artifact,
)

__all__ = ["ArtifactError", "ArtifactRef", "ArtifactTampered", "UntrustedArtifact", "load_artifact", "save_artifact"]
