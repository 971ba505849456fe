"""The store: one Zarr v3 group of units, their provenance, chunk manifests and locks.

- ``core``: ``Store`` (units, arrays, caches, chunk manifests)
- ``io``: durable writes, provenance and checksum records, opening local/zip/fsspec roots
- ``locks``: per-unit write locks
- ``layout``: every unit's path and the arrays it holds
- ``chunks``: writing one chunk (data, fsync, marker)
- ``checkpoint``: the one way stages save and load resumable state
- ``reader`` / ``sparse``: reading activations and sparse features back
- ``verify``: checking a store against what each unit promises
"""

from pipeline.store.core import Store

__all__ = ["Store"]
