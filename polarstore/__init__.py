"""polarstore: a dataframe-native, serverless, time-travel feature store on Polars.

Feature views are Delta Lake tables, historical retrieval is a point-in-time ``join_asof``,
and the online store is an embedded LMDB file synced from the Delta tables.
"""

from polarstore._aggregations import Aggregation, AggregationView
from polarstore._checks import CheckWarning
from polarstore._definitions import Entity, FeatureService, FeatureView
from polarstore._errors import (
    ConflictError,
    NanosecondWarning,
    NotFoundError,
    PolarstoreError,
    SchemaError,
    StorageError,
    ValidationError,
)
from polarstore._ondemand import OnDemandView
from polarstore._store import FeatureStore

__all__ = [
    "Aggregation",
    "AggregationView",
    "CheckWarning",
    "ConflictError",
    "Entity",
    "FeatureService",
    "FeatureStore",
    "FeatureView",
    "NanosecondWarning",
    "NotFoundError",
    "OnDemandView",
    "PolarstoreError",
    "SchemaError",
    "StorageError",
    "ValidationError",
]

__version__ = "0.1.0"
