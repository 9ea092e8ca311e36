"""Predictions and their true labels, stored in PostgreSQL: the source of live accuracy."""
