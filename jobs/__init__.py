"""Ray jobs: data, model, training, evaluation, registry and promotion."""
