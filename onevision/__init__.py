"""The platform kernel: recipe schema, storage, MLflow tracking, the local stack and the `onevision` CLI."""

__version__ = "0.1.0"
