"""Tasks: a model plus its objective and metrics, in the form the federated engine trains."""
