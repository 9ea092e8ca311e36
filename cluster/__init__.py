"""Operating the platform: the `python -m cluster` CLI (up, down, status, keys, demo) and one config
folder per infrastructure component. It may import every other package; nothing imports it."""
