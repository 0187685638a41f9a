"""The data stages: ingest (images -> shards), spectra (per-image statistics), schedules."""
