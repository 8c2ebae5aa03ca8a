"""Evaluation code: metrics, statistics, plots, reports and the synthetic benchmark cohort."""
