"""Synthetic cohorts with known truth: phantom (weakliverseg phantom), preview (PNG montages).

May import ``data`` and ``errors``.
"""
