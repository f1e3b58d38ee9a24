"""MacTuner pipelines: the work behind every stage, in plain Python (no gradio import).

Each module is usable from a notebook, the CLI (`mactuner ...`) or the studio's handlers.
"""

__version__ = "0.1.0"
