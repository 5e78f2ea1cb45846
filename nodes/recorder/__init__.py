"""The recorder room: the node and its threads (``__main__``), the receiver's tick pairing (``assembler``),
the LeRobot v3 episode writer (``writer``) and metrics and plots (``metrics``). May import ``common`` and
its own modules; no other node imports it."""
