"""Preflight: the checks a pipeline run passes before any GPU step, and the run's pinned recipe."""
