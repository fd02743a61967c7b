"""Model registry: versions, aliases and lineage in Redis (``store``), and verified skops
artifacts (``artifacts``). Import the submodules directly; this package imports nothing heavy so
the CLI's read-only commands start fast."""
