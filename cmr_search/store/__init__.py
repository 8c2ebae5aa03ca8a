"""The store: the clip table, the embedding tables, withdrawal, the FAISS indexes, filters
and search."""

from importlib import import_module

__all__ = ["ClipConfig", "ClipStore", "EmbeddingStore", "Searcher"]

_HOME = {
    "ClipConfig": "cmr_search.store.config",
    "ClipStore": "cmr_search.store.clip_store",
    "EmbeddingStore": "cmr_search.store.embedding_store",
    "Searcher": "cmr_search.store.search",
}


def __getattr__(name: str):
    # Lazy: ingest workers import the store's config without lancedb, whose native runtime
    # must not be inherited by forked processes.
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'cmr_search.store' has no attribute {name!r}")
