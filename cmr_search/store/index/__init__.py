"""The FAISS indexes of the embedding tables: one per (table, model_id), persisted, never stale.

``vector_index`` (open, search), ``sync`` (bringing an index to its table's version),
``build`` (which index, on which device), ``files`` (persisted generations),
``torch_exact`` (exact search on a GPU through torch).
"""

from cmr_search.store.index.vector_index import VectorIndex, refresh_indexes

__all__ = ["VectorIndex", "refresh_indexes"]
