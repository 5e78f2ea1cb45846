"""The policy room: the server (``__main__``) and its model work (runtime, checkpoint, lerobot_import, io,
engines, speed, sessions, standby). May import ``common`` and its own modules; no other node imports it."""
