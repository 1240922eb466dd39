"""Data sets with their own formats: ScienceQA (problems.json / captions.json / pid_splits.json), a
synthetic science set in the same format whose answers need the picture, and a synthetic captioned-shapes
set (colours, shapes, counts, positions; captions and questions) for vision-language and text-to-image."""
