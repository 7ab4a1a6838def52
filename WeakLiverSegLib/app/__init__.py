"""The application on top: cli (weakliverseg), demo, bench, progress (the jsonl protocol).

May import every package below it (data, synth, anatomy, learn, evaluation, recipes); never ``slicer``.
"""
