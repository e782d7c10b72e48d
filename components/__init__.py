"""One package per pipeline step: a plain `run(...)` core and a thin KFP component."""
