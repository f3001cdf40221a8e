"""Embedding: frozen backbones and handcrafted morphology turn cell crops (from crop folders or cut
out of scans) into one HDF5 bag per slide.

A backbone family is one module registered with ``@register_backbone`` (see
:mod:`milhema.embed.backbone`) plus one name on the import line below, which registers it.
"""

from milhema.embed import dinobloom, timm_backbone  # noqa: F401  (registers the backbone families)
