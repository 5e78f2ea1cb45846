"""Health check of the policy server image: one ``ping`` over the wire with the project's own client.

Docker runs it inside the container (``HEALTHCHECK`` in docker/Dockerfile); exit 0 means the node answered
(it binds its socket only after loading and warming up the model), 1 that it did not within the timeout.
The endpoint is the container's own port, ``tcp://127.0.0.1:$PORT``, or ``HEALTHCHECK_ENDPOINT``.

With CURVE on (``CURVE_SECRET_KEY`` set) the ping is a CURVE client like any robot: it needs a key pair of
its own whose public half is in the allowed-clients directory, ``CURVE_HEALTHCHECK_KEY`` (its secret
certificate); the server's public key is read from the server's own certificate. Without that key the
node cannot be pinged (it answers no unknown client), so the check falls back to the node's readiness
file (written once the model is loaded, removed when it stops) and its process being alive.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from common.config import REPO_ROOT
from common.supervisor_client import read_readiness
from common.tools.supervisor_programs import STANDBY_PROGRAM
from common.wire.curve import CurveKeys, KeyFileError, load_certificate_file
from common.wire.policy_client import PolicyClient
from common.wire.protocol import ProtocolError
from common.wire.transport import PeerUnavailable, RemoteError, SocketFactory

log = logging.getLogger("healthcheck")

READY_DIR = REPO_ROOT / "run" / "ready"
POLICY_PROGRAMS = ("policy", STANDBY_PROGRAM)  # STANDBY=1 runs both (docker/standby.py)


def curve_keys() -> CurveKeys | None:
    server_certificate = os.environ.get("CURVE_SECRET_KEY", "")
    own_certificate = os.environ.get("CURVE_HEALTHCHECK_KEY", "")
    if not server_certificate or not own_certificate:
        return None
    server_public, _ = load_certificate_file(Path(server_certificate), secret=False)
    public, secret = load_certificate_file(Path(own_certificate), secret=True)
    return CurveKeys(server_public=server_public, client_public=public, client_secret=secret)


def readiness_alive() -> bool:
    """A live policy process whose readiness file says it serves: ``policy.json``, or with ``STANDBY=1``
    whichever of ``policy.json`` and ``policy-standby.json`` holds the endpoint now."""
    entries = read_readiness(READY_DIR)
    serving = [(name, entry) for name, entry in entries.items()
               if name in POLICY_PROGRAMS and entry["alive"] and entry.get("serving", True)]
    if not serving:
        found = {name: {"pid": entry.get("pid"), "alive": entry["alive"], "serving": entry.get("serving")}
                 for name, entry in entries.items() if name in POLICY_PROGRAMS}
        log.error("policy not ready: no live serving policy in %s (%s)", READY_DIR, found or "no readiness file")
        return False
    name, entry = serving[0]
    log.info("policy ready (%s, pid %d); CURVE is on and CURVE_HEALTHCHECK_KEY is not set, so no ping", name,
             entry["pid"])
    return True


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="healthcheck: %(message)s")
    endpoint = os.environ.get("HEALTHCHECK_ENDPOINT") or f"tcp://127.0.0.1:{os.environ.get('PORT', '8000')}"
    timeout_s = float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "5"))
    try:
        keys = curve_keys()
    except KeyFileError as exc:
        log.error("CURVE key of the health check: %s", exc)
        return 1
    if keys is None and os.environ.get("CURVE_SECRET_KEY"):
        return 0 if readiness_alive() else 1
    client = PolicyClient(SocketFactory(curve=keys), endpoint, client_id="healthcheck", timeout_s=timeout_s, retries=1)
    try:
        round_trip_s = client.ping()
    except (PeerUnavailable, RemoteError, ProtocolError) as exc:
        log.error("policy at %s did not answer ping: %s", endpoint, exc)
        return 1
    finally:
        client.close()
    log.info("policy at %s answered ping in %.1f ms%s", endpoint, round_trip_s * 1000, " (CURVE)" if keys else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
