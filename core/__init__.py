"""The base every process of the platform stands on: settings, logs, traces, the database pool,
health waits and the API-key table. It imports nothing of the platform above it."""
