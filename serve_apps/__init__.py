"""Ray Serve applications: the inference API (FastAPI ingress) and the model deployment."""
