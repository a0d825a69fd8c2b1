"""Swin Transformer training system."""
