"""The KFP DAGs, the local runner, compile and submit. Nothing imports this package."""
