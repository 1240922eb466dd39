"""Data sets with their own formats: ScienceQA (problems.json / captions.json / pid_splits.json) and a
synthetic science set in the same format whose answers need the picture."""
