"""Linear and attention-MIL heads trained on stored embeddings, and their registry.

Python API (the search service uses it)::

    HeadRegistry(store).load(name).predict(EmbeddingStore.open(store), [study_uid, ...])
    train_head(store, ["lvef"], HeadConfig(kind="mil"))
    evaluate_head(store, name)
"""

from heads.config import HeadConfig
from heads.registry import Head, HeadRegistry, evaluate_head, train_head

__all__ = ["Head", "HeadConfig", "HeadRegistry", "evaluate_head", "train_head"]
