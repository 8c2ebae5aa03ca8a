"""The clinical findings of report text: the lexicon, a NegEx parser that finds each
finding with its negation and grade, and counterfactual rewrites of a report.

Python API (the encoder's trainer, the search service and the evaluation use it)::

    parser = FindingParser()
    parser.parse("Severely dilated LV. No LV thrombus.")  # [Mention(...), ...]
    summarise(mentions)                                    # {finding: Statement}
    agreement(summarise(claim), summarise(report))         # 1 bears out, 0 contradicts, -1 silent
    counterfactuals(parser, text, rng, k=2)                # [Counterfactual(...), ...]
"""

from cmr_search.core.lazy import lazy_exports

__all__ = ["FINDINGS", "Counterfactual", "Finding", "FindingParser", "Mention", "Statement",
           "agreement", "counterfactuals", "summarise"]

_HOME = {"FINDINGS": "cmr_search.findings.lexicon", "Finding": "cmr_search.findings.lexicon",
         "FindingParser": "cmr_search.findings.parse", "Mention": "cmr_search.findings.parse",
         "Statement": "cmr_search.findings.parse", "summarise": "cmr_search.findings.parse",
         "agreement": "cmr_search.findings.parse",
         "Counterfactual": "cmr_search.findings.rewrite",
         "counterfactuals": "cmr_search.findings.rewrite"}

__getattr__ = lazy_exports(__name__, _HOME)
