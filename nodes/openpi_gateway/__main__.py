"""openpi gateway: openpi clients get action chunks from armpipe's policy node.

    python -m nodes.openpi_gateway --config configs/lift.yaml [--openpi.gateway.port=8765 ...]

Speaks openpi's WebSocket wire (docs/protocol.md, "openpi's wire") as ``openpi-client``'s
``WebsocketClientPolicy`` expects it, on ``openpi.gateway.host:port``, and forwards each observation to the
policy node at ``policy.endpoint`` over armpipe's own wire, each connection its own session. At start it asks
the policy for its contract and checks the configured key layouts against it (a camera no key maps to, a
state of the wrong length: refused, exit 2). Beyond loopback it serves only wss:// with an API key, unless the
config says ``insecure: true`` (warned loudly).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import websockets.asyncio.server

from common.config import ConfigError, DeploymentConfig
from common.node import StartedNode, start_node
from common.wire.contract import PolicyContract
from common.wire.curve import is_loopback
from common.wire.openpi import ObservationKeys, read_api_key
from common.wire.policy_client import PolicyClient
from common.wire.transport import PeerUnavailable, SocketFactory
from nodes.openpi_gateway.gateway import Gateway, check_layouts

PROGRAM = "openpi_gateway"
CONTRACT_RETRY_S = 1.0

log = logging.getLogger(PROGRAM)


def layouts_of(config: DeploymentConfig) -> dict[str, ObservationKeys]:
    gateway = config.openpi.gateway
    return {name: ObservationKeys.from_config(config, name, getattr(gateway, name), gateway.prompt_key)
            for name in gateway.layouts}


def security(config: DeploymentConfig) -> tuple[str, ssl.SSLContext | None]:
    """The API key ("" for none) and TLS context the gateway serves with; ``ConfigError`` where the config
    leaves a non-loopback gateway open without ``insecure: true``."""
    gateway = config.openpi.gateway
    api_key = read_api_key(gateway.api_key_file, "openpi.gateway.api_key_file", config) if gateway.api_key_file else ""
    context: ssl.SSLContext | None = None
    if gateway.tls_cert_file:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(config.resolve(gateway.tls_cert_file), config.resolve(gateway.tls_key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("openpi.gateway.tls_cert_file", f"cannot load the certificate "
                                                              f"{gateway.tls_cert_file!r} with key "
                                                              f"{gateway.tls_key_file!r}: {exc}") from exc
    where = f"{gateway.host}:{gateway.port}"
    if not is_loopback(f"tcp://{where}"):
        missing = [name for name, value in (("openpi.gateway.tls_cert_file", context),
                                            ("openpi.gateway.api_key_file", api_key)) if not value]
        if missing and not config.insecure:
            raise ConfigError(missing[0], f"the gateway listens beyond loopback ({where}): expected TLS "
                                          "(tls_cert_file, tls_key_file) and an API key (api_key_file), or "
                                          "`insecure: true` for a closed lab network")
        if missing:
            log.warning("INSECURE: `insecure: true`: the openpi gateway listens on %s without %s. Anyone on the "
                        "network can ask this policy for actions%s. Set openpi.gateway.tls_cert_file, tls_key_file "
                        "and api_key_file, and remove `insecure: true`.", where, " and ".join(missing),
                        " and read every observation in clear" if context is None else "")
    return api_key, context


def wait_for_contract(node: StartedNode, factory: SocketFactory) -> PolicyContract | None:
    """The policy's contract, asked until it answers (the policy may still be loading) or the node stops."""
    config = node.config
    client = PolicyClient(factory, config.policy.endpoint, client_id=f"{PROGRAM}-contract", timeout_s=2.0, retries=1)
    said = False
    try:
        while not node.stop.is_set():
            try:
                return client.metadata()
            except PeerUnavailable as exc:
                if not said:
                    log.info("waiting for the policy node at %s (%s)", config.policy.endpoint, exc)
                    said = True
                node.stop.wait(CONTRACT_RETRY_S)
        return None
    finally:
        client.close()


async def serve(node: StartedNode, gateway: Gateway) -> None:
    settings = node.config.openpi.gateway
    async with websockets.asyncio.server.serve(
            gateway.handler, settings.host, settings.port, ssl=gateway.ssl_context, compression=None,
            max_size=settings.max_message_mib << 20, process_request=gateway.process_request) as server:
        scheme = "wss" if gateway.ssl_context is not None else "ws"
        log.info("serving openpi clients on %s://%s:%d (layouts %s, API key %s) -> policy %s", scheme, settings.host,
                 settings.port, ", ".join(keys.describe() for keys in gateway.layouts.values()),
                 "required" if gateway.api_key else "not required", node.config.policy.endpoint)
        node.readiness.ready(url=f"{scheme}://{settings.host}:{settings.port}", policy=node.config.policy.endpoint,
                             checkpoint_id=gateway.contract.checkpoint_id, layouts=list(gateway.layouts))
        await asyncio.get_running_loop().run_in_executor(None, node.stop.wait)
        server.close()
    log.info("stopped after %d chunk(s), %d connection(s) refused for their API key", gateway.served, gateway.refused)


def main(argv: list[str] | None = None) -> None:
    node = start_node(PROGRAM, __doc__ or PROGRAM, argv, curve_side="client")
    config = node.config
    try:
        layouts = layouts_of(config)
        api_key, context = security(config)
    except ConfigError as exc:
        node.refuse(str(exc))
    factory = SocketFactory(curve=node.curve)
    started = time.monotonic()
    contract = wait_for_contract(node, factory)
    if contract is None:
        return
    problems = check_layouts(contract, layouts, config)
    if problems:
        node.refuse("the openpi key layouts do not fit the policy's contract:\n  " + "\n  ".join(problems))
    log.info("policy %s (checkpoint %s) answered in %.1f s: cameras %s, %d state values -> %d x %d actions",
             contract.policy_type, contract.checkpoint_id, time.monotonic() - started, contract.cameras,
             len(contract.state_names), contract.chunk_length, len(contract.action_names))
    gateway = Gateway(config, factory, contract, layouts, api_key, context)
    try:
        asyncio.run(serve(node, gateway))
    except OSError as exc:
        node.refuse(f"openpi.gateway: cannot listen on {config.openpi.gateway.host}:{config.openpi.gateway.port}: "
                    f"{exc}")
    finally:
        node.readiness.clear()


if __name__ == "__main__":
    main()
