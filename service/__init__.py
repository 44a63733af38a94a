"""editserve: serve a language model and edit the facts it knows."""

__version__ = "0.1.0"
