"""The actuator room: the two control loops (``__main__``), the decisions and hold reasons (``core``), the
validated inputs (``inputs``), the policy worker and bus writers (``workers``), what both loops share
(``node``), the control socket's operations (``control``), and the chunk queue, safety filter and
episodes. May import ``common`` and its own modules; no other node imports it."""

PROGRAM = "actuator"  # the name on every message, readiness file and log of this node
