"""Health check of the policy server image: one ``ping`` over the wire with the project's own client.

Docker runs it inside the container (``HEALTHCHECK`` in docker/Dockerfile); exit 0 means the node answered
(it binds its socket only after loading and warming up the model), 1 that it did not within the timeout.
The endpoint is the container's own port: ``tcp://127.0.0.1:$PORT``, or ``HEALTHCHECK_ENDPOINT``.
"""

from __future__ import annotations

import logging
import os
import sys

from common.policy_client import PolicyClient
from common.protocol import ProtocolError
from common.transport import PeerUnavailable, RemoteError, SocketFactory

log = logging.getLogger("healthcheck")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="healthcheck: %(message)s")
    endpoint = os.environ.get("HEALTHCHECK_ENDPOINT") or f"tcp://127.0.0.1:{os.environ.get('PORT', '8000')}"
    timeout_s = float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "5"))
    client = PolicyClient(SocketFactory(), endpoint, client_id="healthcheck", timeout_s=timeout_s, retries=1)
    try:
        round_trip_s = client.ping()
    except (PeerUnavailable, RemoteError, ProtocolError) as exc:
        log.error("policy at %s did not answer ping: %s", endpoint, exc)
        return 1
    finally:
        client.close()
    log.info("policy at %s answered ping in %.1f ms", endpoint, round_trip_s * 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
