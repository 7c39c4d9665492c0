"""The one save path: preflight, plan, produce, write, publish (see run.py)."""
