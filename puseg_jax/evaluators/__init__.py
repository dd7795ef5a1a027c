"""Evaluation of named evaluators: predict, score, write the reports and panels; per-case
quality control."""
