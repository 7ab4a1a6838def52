"""Metrics and reports: metrics (per case, global Dice, lesions), evaluate (weakliverseg evaluate), report (HTML).

May import ``data`` and ``errors``.
"""
