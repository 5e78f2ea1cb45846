"""Who publishes what on the robot computer, and who subscribes to it: the pipeline's streams in one place.

Every stream is a ZeroMQ PUB socket bound by one program; its endpoint is a field of the deployment config.

=========================== ========================================= ==============================================
stream (config field)       publisher                                 subscribers
=========================== ========================================= ==============================================
cameras.<name>.endpoint     camera ``--name <name>``, or the player   actuator, monitor, recorder
arms.<name>.state_endpoint  state-reader ``--name <name>``, or player actuator, monitor, recorder
player.gt_endpoint          dataset-player (ground-truth actions)     monitor, recorder, offline evaluation
actuator.events_endpoint    actuator (ticks, episodes, refusals)      monitor, recorder, offline evaluation,
                                                                      dataset-player (lockstep, follow_episodes)
=========================== ========================================= ==============================================

The actuator's control socket (``actuator.control_endpoint``, a ROUTER) is not a stream but is local too;
the policy link is the one socket that may leave the machine (CURVE, ``common.wire.curve``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this module to check its sockets
    from common.config import DeploymentConfig


def sensor_streams(config: DeploymentConfig) -> dict[str, str]:
    """Field path -> endpoint of each camera's frames and each arm's state: what the actuator reads."""
    streams = {f"cameras.{name}.endpoint": cam.endpoint for name, cam in config.cameras.items()}
    streams |= {f"arms.{name}.state_endpoint": arm.state_endpoint for name, arm in config.arms.items()}
    return streams


def published_streams(config: DeploymentConfig) -> dict[str, str]:
    """Field path -> endpoint of every stream: the sensors, the player's ground truth, the actuator's events."""
    return sensor_streams(config) | {"player.gt_endpoint": config.player.gt_endpoint,
                                     "actuator.events_endpoint": config.actuator.events_endpoint}


def local_sockets(config: DeploymentConfig) -> dict[str, str]:
    """Field path -> endpoint of every socket other than the policy link (all plain TCP, loopback unless
    ``insecure: true``): the streams and the actuator's control socket."""
    return published_streams(config) | {"actuator.control_endpoint": config.actuator.control_endpoint}


def sensor_endpoints(config: DeploymentConfig) -> list[str]:
    """What the actuator (and a baseline client in its place) subscribes to."""
    return list(sensor_streams(config).values())


def pipeline_endpoints(config: DeploymentConfig) -> list[str]:
    """What a subscriber of the whole pipeline (the monitor, the recorder) connects to: every stream."""
    return list(published_streams(config).values())
