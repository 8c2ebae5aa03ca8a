"""Linear and attention-MIL heads trained on stored embeddings, and their registry.

Python API (the search service uses it)::

    predict_head(store, name, [study_uid, ...])
    train_head(store, ["lvef"], HeadConfig(kind="mil"))
    evaluate_head(store, name)
"""

from cmr_search.core.lazy import lazy_exports

__all__ = ["Head", "HeadConfig", "HeadRegistry", "evaluate_head", "predict_head", "train_head"]

_HOME = {"HeadConfig": "cmr_search.heads.config", "Head": "cmr_search.heads.registry",
         "HeadRegistry": "cmr_search.heads.registry", "evaluate_head": "cmr_search.heads.registry",
         "predict_head": "cmr_search.heads.registry", "train_head": "cmr_search.heads.registry"}

__getattr__ = lazy_exports(__name__, _HOME)
