"""Exports of the history for supervised training: prompt-response pairs as JSONL, filtered,
without duplicates, with a manifest that makes them reproducible (service/exports/run.py)."""
