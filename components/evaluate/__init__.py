"""The evaluate step: LMMs-Eval on our checkpoints, a gate, and comparison tables."""
