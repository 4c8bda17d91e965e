"""Models: the shared input layer, the multitask backbones and the LightningModule."""

from mtl_clippy.models.backbones import (
    AITM,
    ESMM,
    NCF,
    PLE,
    ROLES,
    Backbone,
    LogisticRegression,
    MetaHeac,
    MMoE,
    OMoE,
    SharedBottom,
    SingleTask,
    product_logit,
)
from mtl_clippy.models.layers import MLP, FeatureEmbedding
from mtl_clippy.models.module import MultiTaskModule, split_metrics
from mtl_clippy.models.schedules import WarmupCosineLR

__all__ = [
    "AITM",
    "ESMM",
    "MLP",
    "NCF",
    "PLE",
    "ROLES",
    "Backbone",
    "FeatureEmbedding",
    "LogisticRegression",
    "MMoE",
    "MetaHeac",
    "MultiTaskModule",
    "OMoE",
    "SharedBottom",
    "SingleTask",
    "WarmupCosineLR",
    "product_logit",
    "split_metrics",
]
