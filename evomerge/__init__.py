"""evomerge: search for recipes that merge fine-tuned language models."""

__version__ = "0.1.0"
