"""The platform kernel: recipe schema, storage, MLflow tracking, the local stack, the project image's name.

PROJECT_IMAGE is the one place that names the image every component, the Kubeflow Trainer TrainJob and
the KServe predictor run on in a cluster (built from infra/images/Dockerfile, see infra/images/README.md;
serving.manifests derives the Triton image from it). It lives in the kernel because both the pipeline steps
(components) and the serving manifests (serving) name it, and serving must not import the steps. Its tag is
the project version in pyproject.toml; YAML that must spell the image out (infra/platform) names exactly
this value, and tests/unit/test_images.py fails on any other reference to the image in the repository. The
local runner ignores it (kfp.local SubprocessRunner).
"""

__version__ = "0.1.0"
PROJECT_IMAGE = "ghcr.io/onevision/platform:0.1.0"
