"""Asynchronous training requests: job specs, their durable records and the message broker."""
