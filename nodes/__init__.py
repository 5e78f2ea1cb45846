"""One module per armpipe node; each has a ``main()`` run as ``python -m nodes.<node>``."""
