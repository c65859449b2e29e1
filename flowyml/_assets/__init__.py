"""Typed values a step can return: datasets, feature sets, models, metrics, or any named asset.

- ``_base``      ``Asset`` and ``AssetMetadata``: identity, properties, tags, lineage, cache key
- ``_extract``   what data and models tell about themselves, read without importing their libraries
- ``_kinds``     ``Dataset``, ``FeatureSet``, ``Model``, ``Metrics``
- ``_routing``   annotations to asset kinds and back: wrapping returns, unwrapping arguments
"""

from ._base import Asset, AssetMetadata, asset_class, restore
from ._kinds import Dataset, FeatureSet, Metrics, Model
from ._routing import (
    asset_type_for,
    derive,
    input_assets,
    output_asset_types,
    resolved_annotations,
    return_asset_type,
    runtime_classes,
    unwrap_input,
    wrap_output,
)

__all__ = (
    "Asset",
    "AssetMetadata",
    "Dataset",
    "FeatureSet",
    "Metrics",
    "Model",
    "asset_class",
    "asset_type_for",
    "derive",
    "input_assets",
    "output_asset_types",
    "resolved_annotations",
    "restore",
    "return_asset_type",
    "runtime_classes",
    "unwrap_input",
    "wrap_output",
)
