"""The monitor room: the web panel node (``__main__``) and its browser files (``static/``). May import
``common`` and its own modules; no other node imports it."""
