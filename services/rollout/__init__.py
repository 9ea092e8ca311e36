"""Safe rollout: shadow and canary rollouts of a challenger and probation after a promotion,
owned by one service whose state lives in PostgreSQL (docs/rollout.md)."""
