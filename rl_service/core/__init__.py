"""Domain logic: run lifecycle, algorithm registry, hyperparameter schemas. No gRPC here."""
