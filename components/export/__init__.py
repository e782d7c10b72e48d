"""The export step: a registered checkpoint -> a Triton model repository and KServe manifests."""
