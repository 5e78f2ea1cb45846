"""The policy room: the server (``__main__``) and its model work (runtime, checkpoint, io, engines, speed,
sessions). May import ``common`` and its own modules; no other node imports it."""
