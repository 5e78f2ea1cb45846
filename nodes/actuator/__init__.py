"""The actuator room: the control loop (``__main__``) and its private parts (chunk queue, safety filter,
episodes). May import ``common`` and its own modules; no other node imports it."""
