"""The evaluation (`cmr eval`): the stages, the random-init baseline, clinical phrase queries, the seed paper's statistics, plots and the report."""
