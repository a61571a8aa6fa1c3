"""MLflow, and only MLflow: the layer between the Prefect tasks (tasks/) and the library (picorl/).

    runs.py       where runs live, parent and stage runs, exactly-once metric logging, export
    delivery.py   bringing MLflow up to date with a run folder, riding out an outage
    registry.py   a run's final weights as a registered MLflow model, and back

Nothing here imports prefect; picorl/ imports nothing here (tests/test_layers.py).
"""
