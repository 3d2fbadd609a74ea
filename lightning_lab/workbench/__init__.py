"""The researcher's side of a run: Jupyter widgets (``widgets``) and W&B tracking (``tracking``).

Both attach to a trainer as callbacks and read ``StepState``; the trainer never imports them.
"""
