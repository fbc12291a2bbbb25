"""Sizing a run without hardware: per-block activation footprints measured on fake tensors (footprint.py), the
layout search with its memory and roofline time model (search.py), the printed plan (report.py), and the pre-flight
fit check every run makes before it allocates anything (preflight.py)."""
