"""Linear and attention-MIL heads trained on stored embeddings, their registry, and
zero-shot labels from prompt pairs.

Python API (the search service uses it)::

    predict_head(store, name, [study_uid, ...])
    train_head(store, ["lvef"], HeadConfig(kind="mil"))
    evaluate_head(store, name)
    zero_shot(store, "lv_thrombus", labels_path="labels.csv")   # scores, AUROC [DeLong CI]
"""

from cmr_search.core.lazy import lazy_exports

__all__ = ["Head", "HeadConfig", "HeadRegistry", "ZeroShot", "evaluate_head", "predict_head", "train_head",
           "zero_shot"]

_HOME = {"HeadConfig": "cmr_search.heads.config", "Head": "cmr_search.heads.registry",
         "HeadRegistry": "cmr_search.heads.registry", "evaluate_head": "cmr_search.heads.registry",
         "predict_head": "cmr_search.heads.registry", "train_head": "cmr_search.heads.registry",
         "ZeroShot": "cmr_search.heads.zeroshot", "zero_shot": "cmr_search.heads.zeroshot"}

__getattr__ = lazy_exports(__name__, _HOME)
