"""Conversion of the official FastInst checkpoints and of ImageNet backbone weights."""
