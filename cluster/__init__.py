"""Running the platform: settings, the `python -m cluster` CLI and infrastructure configs."""
