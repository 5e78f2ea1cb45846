"""The recorder room: the node (``__main__``) and its LeRobot v3 episode writer. May import ``common`` and
its own modules; no other node imports it."""
