"""The serving data plane: the traffic table in Redis, the router library and its HTTP server."""

from workers.router.router import FeatureError, NoProductionVersion, Prediction, PredictionError, Router
from workers.router.traffic import TrafficTable, read_traffic, write_traffic

__all__ = [
    "FeatureError",
    "NoProductionVersion",
    "Prediction",
    "PredictionError",
    "Router",
    "TrafficTable",
    "read_traffic",
    "write_traffic",
]
