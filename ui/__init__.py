"""The Gradio UI: predictions and feedback, the served model's card, training jobs.

It talks to the inference API (and MLflow's REST API) over HTTP only and never imports model
code, so it runs anywhere the API is reachable.
"""
