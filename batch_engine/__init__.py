"""batch-engine: bulk image edits against GPTProto's prediction API, paced, resumable and reported."""

__version__ = "0.1.0"
