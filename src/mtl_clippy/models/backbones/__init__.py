"""Backbones: one module per model family, each mapping (categorical, numerical) to logits.

Every backbone is a :class:`Backbone` (``base.py``): the shared arguments, the input layer,
the towers and the role of each parameter.
"""

from mtl_clippy.models.backbones.aitm import AITM
from mtl_clippy.models.backbones.base import ROLES, Backbone, backbone_of
from mtl_clippy.models.backbones.esmm import ESMM, product_logit
from mtl_clippy.models.backbones.logistic import LogisticRegression
from mtl_clippy.models.backbones.metaheac import MetaHeac
from mtl_clippy.models.backbones.moe import MMoE, OMoE
from mtl_clippy.models.backbones.ncf import NCF
from mtl_clippy.models.backbones.ple import PLE
from mtl_clippy.models.backbones.shared_bottom import SharedBottom
from mtl_clippy.models.backbones.single_task import SingleTask

__all__ = [
    "AITM",
    "ESMM",
    "NCF",
    "PLE",
    "ROLES",
    "Backbone",
    "LogisticRegression",
    "MMoE",
    "MetaHeac",
    "OMoE",
    "SharedBottom",
    "SingleTask",
    "backbone_of",
    "product_logit",
]
