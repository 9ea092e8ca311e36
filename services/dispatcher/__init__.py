"""The dispatcher: consumes training requests from RabbitMQ and runs them as Ray jobs."""
