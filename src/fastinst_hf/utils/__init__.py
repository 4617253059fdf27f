"""Helpers shared by the tooling: atomic file writes, errors, devices, image loading, drawing."""
