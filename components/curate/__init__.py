"""Curation: raw LLaVA-format sources -> per-stage training shards (core in `core.py`)."""
