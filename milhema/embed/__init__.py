"""Embedding: frozen backbones and handcrafted morphology turn cell crops into bag features."""
