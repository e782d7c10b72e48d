"""The LLaVA-OneVision model and its training (issue #3/#4): imports `onevision` only."""
