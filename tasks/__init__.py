"""Prefect tasks: thin, retryable wrappers that call picorl and log to MLflow."""
