"""Embedding: frozen backbones and handcrafted morphology turn cell crops (from crop folders or cut
out of scans) into one HDF5 bag per slide."""
