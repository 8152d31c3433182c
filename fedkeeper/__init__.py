"""FedKeeper: federated learning on serverless platforms, with the object store as the only state."""

__version__ = "0.1.0"
