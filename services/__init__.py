"""The platform's long-running services: accepting and dispatching training jobs, recording
predictions and feedback, monitoring live model quality. They use the ML library (jobs/) and
the base (core/); the apps (serve_apps/, ui/) and the operator's CLI (cluster/) sit above."""
