"""Structured pruning engine: architectures and their cost, importance, masking, slicing, metrics."""

from pruning.architecture import Architecture, ArchitectureError, LayerShape, ModelSpec

__all__ = ["Architecture", "ArchitectureError", "LayerShape", "ModelSpec"]
