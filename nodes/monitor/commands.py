"""The monitor's commands: episode start/stop/label over the actuator's control socket (Lazy Pirate REQ),
node restarts and states through supervisord's XML-RPC interface and the readiness files."""

from __future__ import annotations

import os
import threading
import time
from http import HTTPStatus
from typing import Any

from common.config import ConfigError, DeploymentConfig, curve_keys_for
from common.supervisor_client import (
    SupervisorClient,
    SupervisorError,
    SupervisorUnavailable,
    UnknownProcess,
    read_readiness,
)
from common.wire.actuator_client import ActuatorClient
from common.wire.policy_client import PolicyClient
from common.wire.protocol import ProtocolError
from common.wire.transport import (
    PeerUnavailable,
    RemoteError,
    SocketFactory,
)
from nodes.monitor.panel import PanelState

PROGRAM = "monitor"


class CommandError(Exception):
    """A command the monitor refuses or that failed; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: HTTPStatus, message: str, **detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(message)


class Commands:
    def __init__(self, config: DeploymentConfig, factory: SocketFactory, panel: PanelState) -> None:
        self.config = config
        self.panel = panel
        self.factory = factory
        self.control_lock = threading.Lock()  # one REQ socket, one request at a time
        self.control: ActuatorClient | None = None
        # Its own socket factory (CURVE keys); used and closed only by the thread that calls policy_capacity
        # (the monitor's policy poller): a ZeroMQ socket is not thread-safe.
        self.policy: tuple[SocketFactory, PolicyClient] | None = None
        self.supervisor = SupervisorClient(config.monitor.supervisor_url,
                                           ready_dir=config.resolve(config.run_dir) / "ready")

    def actuator(self, op: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Send one control op; returns the reply's meta. Errors become ``CommandError`` with the reason."""
        endpoint = self.config.actuator.control_endpoint
        with self.control_lock:
            if self.control is None:
                self.control = ActuatorClient(self.factory, endpoint, client=PROGRAM,
                                              timeout_s=self.config.monitor.control_timeout_s, retries=1)
            try:
                reply = self.control.send(op, **meta)
            except RemoteError as exc:
                raise CommandError(HTTPStatus.CONFLICT, f"actuator refused {op}: {exc}", field=exc.field,
                                   expected=exc.expected) from exc
            except PeerUnavailable as exc:
                raise CommandError(HTTPStatus.SERVICE_UNAVAILABLE, f"actuator unreachable at {endpoint} "
                                   f"(is it running?): {exc}") from exc
            except ProtocolError as exc:
                raise CommandError(HTTPStatus.BAD_GATEWAY, f"actuator sent a malformed reply: {exc}") from exc
        return {key: value for key, value in reply.meta.items() if not key.startswith("_")}

    def restart(self, program: str) -> dict[str, Any]:
        own = [entry for entry in self.poll_nodes()["programs"] if entry.get("self")]
        if own and program in (own[0]["name"], f"{own[0]['group']}:{own[0]['name']}"):
            # Stopping ourselves would end this request before the start call: nobody would start us again.
            raise CommandError(HTTPStatus.CONFLICT, f"the monitor cannot restart itself ({program}); use "
                               f"`supervisorctl -s {self.config.monitor.supervisor_url.removesuffix('/RPC2')} "
                               f"restart {program}`")
        try:
            status = self.supervisor.restart(program)
        except UnknownProcess as exc:
            raise CommandError(HTTPStatus.NOT_FOUND, str(exc), known=exc.known) from exc
        except SupervisorUnavailable as exc:
            raise CommandError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from exc
        except SupervisorError as exc:
            raise CommandError(HTTPStatus.BAD_GATEWAY, str(exc)) from exc
        return status.to_dict()

    def policy_capacity(self) -> dict[str, Any]:
        """The policy node's capacity figures (its ``ping`` reply's ``capacity``: chunks/s, sessions, batch sizes,
        queue wait over its last ``policy.capacity_period_s``), asked over the policy link, so the policy may run
        on another machine. ``{"endpoint", "figures": dict | None, "error": str, "polled_wall"}``. One thread only
        calls it, and ``close_policy`` when it stops."""
        endpoint = self.config.policy.endpoint
        out: dict[str, Any] = {"endpoint": endpoint, "figures": None, "error": "", "polled_wall": time.time()}
        if self.config.policy.backend != "armpipe":
            out["error"] = f"policy.backend is {self.config.policy.backend}: no armpipe policy node to ask"
            return out
        try:
            if self.policy is None:
                # The robot's own client keys when the link uses CURVE (the actuator's, from the same file).
                factory = SocketFactory(curve=curve_keys_for(self.config, "client"))
                self.policy = (factory, PolicyClient(factory, endpoint, client_id=PROGRAM,
                                                     timeout_s=self.config.monitor.control_timeout_s, retries=1))
            figures = self.policy[1].capacity()
            if figures is not None:
                out["figures"] = figures
            else:
                out["error"] = "the policy node does not report its capacity (an older version)"
        except ConfigError as exc:
            out["error"] = f"cannot ask the policy: {exc}"
        except (PeerUnavailable, RemoteError, ProtocolError, TimeoutError, OSError) as exc:
            out["error"] = f"policy unreachable at {endpoint}: {exc}"
        return out

    def poll_nodes(self) -> dict[str, Any]:
        """supervisord's programs with readiness, plus ready files of nodes it does not run."""
        ready = read_readiness(self.config.resolve(self.config.run_dir) / "ready")
        programs: list[dict[str, Any]] = []
        error = ""
        try:
            programs = [{**status.to_dict(), "self": status.pid == os.getpid()}
                        for status in self.supervisor.processes()]
        except SupervisorUnavailable as exc:
            error = str(exc)
        except Exception as exc:  # a supervisord answering garbage must not stop the poller
            error = f"supervisord at {self.config.monitor.supervisor_url}: {type(exc).__name__}: {exc}"
        supervised = {program["name"] for program in programs}
        unsupervised = [{"name": name, "pid": entry.get("pid"), "alive": entry.get("alive"),
                         "age_s": entry.get("age_s")} for name, entry in ready.items() if name not in supervised]
        return {"programs": programs, "unsupervised": unsupervised, "error": error, "polled_wall": time.time()}

    def close_policy(self) -> None:
        """Close the policy client; from the thread that calls ``policy_capacity`` (a ping to a dead policy may be
        in flight for up to ``monitor.control_timeout_s`` per attempt when the monitor stops, so the shutdown
        cannot close it from another thread)."""
        if self.policy is not None:
            self.policy[1].close()
            self.policy[0].close()
            self.policy = None

    def close(self) -> None:
        """Close the actuator's control client (the policy client is ``close_policy``'s, its poller's)."""
        with self.control_lock:
            if self.control is not None:
                self.control.close()
