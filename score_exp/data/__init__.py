"""Data: the file registry (URL, sha256, cache, mirror) and task-specific readers."""

from score_exp.data.registry import REGISTRY, DataFile, data_dir, fetch

__all__ = ["REGISTRY", "DataFile", "data_dir", "fetch"]
