"""Prefect flows: train (the pipeline) and evaluate."""
