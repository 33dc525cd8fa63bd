"""Network adapters. Method code sees only :class:`Backbone` (DESIGN §2 conventions)."""

from .base import Backbone, Conditioning
from .zimage import ZIMAGE_TURBO_CONFIG, ZImageBackbone

__all__ = ["Backbone", "Conditioning", "ZImageBackbone", "ZIMAGE_TURBO_CONFIG"]
