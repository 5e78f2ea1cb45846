"""One room per armpipe node: a module, or a package whose ``__main__.py`` is run as ``python -m nodes.<node>``."""
