"""Why the actuator holds a tick: the hold reasons, exact strings (the ``hold_reason`` of every ``action`` message,
the ``reason`` of ``hold`` events, the keys of ``loop_stats.holds``; docs/protocol.md, docs/nodes/actuator.md).

``bus_error`` is this node's addition: a bus that cannot be written (port gone) while an episode runs.
"""

HOLD_IDLE = "idle"
HOLD_QUEUE_EMPTY = "queue_empty"
HOLD_POLICY_UNREACHABLE = "policy_unreachable"
HOLD_POLICY_ERROR = "policy_error"
HOLD_STALE_STATE = "stale_state"
HOLD_STALE_FRAME = "stale_frame"
HOLD_MISSING_INPUT = "missing_input"
HOLD_ALL_ROWS_STALE = "all_rows_stale"
HOLD_BAD_ACTION = "bad_action"
HOLD_CONTRACT_MISMATCH = "contract_mismatch"
HOLD_STOPPED = "stopped"
HOLD_BUS_ERROR = "bus_error"
