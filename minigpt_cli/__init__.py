"""minigpt: train a small GPT from scratch on a laptop, every stage measured."""

__version__ = "0.1.0"
