"""The register step and promotion: MLflow model versions, aliases, and GitOps endpoint overlays."""
