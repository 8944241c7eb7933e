"""scaling: MLflow-tracked learning-rate x batch-size scaling studies of small transformers."""

__version__ = "0.1.0"
