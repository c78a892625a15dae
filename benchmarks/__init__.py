"""Benchmarks: step cost (step_cost.py) and fine-tuning quality (glue_quality.py)."""
