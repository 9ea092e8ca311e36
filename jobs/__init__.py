"""The ML library: config, data, schema, preprocessing, model, training, tuning, evaluation,
registry and promotion. It imports only the base (core/); a registered model version carries
only its inference modules (see jobs/registry.py)."""
