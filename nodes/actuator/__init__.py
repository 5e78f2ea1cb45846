"""The actuator room: the control loop (``loop``, started by ``__main__``) over its pacer (``pacer``), the decisions
(``core``) and hold reasons (``holds``), the validated inputs (``inputs``), the policy link and its worker thread
(``policy_link``, ``policy_worker``), the bus writers (``bus_writer``), the control socket's handler (``control``),
what is published (``publishing``), and the chunk queue, refill, safety filter and episodes. May import ``common``
and its own modules; no other node imports it. The map is in ``__main__``'s docstring and docs/nodes/actuator.md."""

PROGRAM = "actuator"  # the name on every message, readiness file and log of this node
