"""Datasets (official on-disk layouts and the embedded synthetic set) and loaders."""
