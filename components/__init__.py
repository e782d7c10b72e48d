"""One package per pipeline step: a plain `run(...)` core and a thin KFP component.

PROJECT_IMAGE is the one place that names the image every component runs on in a cluster
(built from infra/images/Dockerfile); the local runner ignores it (kfp.local SubprocessRunner).
"""

PROJECT_IMAGE = "ghcr.io/onevision/platform:0.1.0"
