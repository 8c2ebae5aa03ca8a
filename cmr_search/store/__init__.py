"""The store: the clip table, the embedding tables, withdrawal, the FAISS indexes, filters
and search."""

from cmr_search.core.lazy import lazy_exports

__all__ = ["ClipConfig", "ClipStore", "EmbeddingStore", "Searcher"]

_HOME = {
    "ClipConfig": "cmr_search.store.config",
    "ClipStore": "cmr_search.store.clip_store",
    "EmbeddingStore": "cmr_search.store.embedding_store",
    "Searcher": "cmr_search.store.search",
}

__getattr__ = lazy_exports(__name__, _HOME)
