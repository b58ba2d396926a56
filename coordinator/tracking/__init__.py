"""Recording in MLflow: the durable call queue, its replay, the names, the model cards."""
