"""Deployment configuration: one YAML file per deployment, decoded into typed dataclasses.

Every node starts the same way::

    python -m nodes.<node> --config configs/<task>.yaml [--name <instance>] [--<field>.<sub>=<value> ...]

Overrides use the YAML field path (``--policy.device=cuda``, ``--cameras.front.encoding=jpeg``); the
value is parsed as YAML, so ``--actuator.dry_run=true`` is a bool and ``--player.episodes=[0,2]`` a
list. Decoding uses draccus (LeRobot's config library), whose errors name the field; ``validate``
then checks what types alone cannot, again naming the field.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import draccus
import yaml

from common.streams import local_sockets
from common.wire.curve import (
    KEYS_COMMAND,
    CurveKeys,
    KeyFileError,
    check_allowed_clients,
    is_loopback,
    load_certificate_file,
)
from common.wire.protocol import INSTRUCTION_KEY, ProtocolError, check_instruction

SO101_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
CAMERA_BACKENDS = ("synthetic", "opencv", "realsense")
ENCODINGS = ("raw", "jpeg")
OVERLAP_RULES = ("replace", "blend", "rtc")
INSTRUCTION_SOURCES = ("config", "dataset")
POLICY_ROWS = ("n_action_steps", "horizon")
MAX_POLICY_BATCH = 64  # policy.max_batch: the largest batch (and CUDA graph bucket) the policy node runs
RTC_GUIDANCE = ("exp", "linear")  # policy.rtc_guidance: how the soft prefix rows' weight falls
PLAYER_MODES = ("realtime", "lockstep")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("fp32", "bf16")
POLICY_BACKENDS = ("armpipe", "openpi")  # policy.backend: the policy node, or a server speaking openpi's WebSocket wire
OPENPI_LAYOUTS = ("flat", "nested")  # openpi's flat "observation/..." keys, or the seed's {"images", "states"}
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_repo_path(path: str) -> Path:
    """A path from the config: ``~`` expanded, relative paths taken from the repository root."""
    candidate = Path(os.path.expanduser(path))
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


class ConfigError(ValueError):
    """A configuration that cannot be used; ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"config field `{field}`: {message}")


@dataclass
class CameraConfig:
    # Where this camera's frames are published (the camera node binds it; subscribers connect).
    endpoint: str = "tcp://127.0.0.1:5551"
    backend: str = "synthetic"  # synthetic | opencv | realsense
    width: int = 640  # image size the camera delivers (and the policy must accept)
    height: int = 480
    fps: int = 30  # capture rate
    encoding: str = "raw"  # raw | jpeg: what goes on the wire
    jpeg_quality: int = 90  # 1..100, with encoding: jpeg
    serial_number: str = ""  # realsense: which device (empty: the only one)
    device: str = ""  # opencv: index ("0") or path ("/dev/video2")
    max_age_s: float = 0.25  # the actuator holds when this camera's newest frame is older
    retry_s: float = 2.0  # a missing device is retried this often instead of crash-looping


@dataclass
class ArmConfig:
    port: str = "/dev/ttyACM0"  # the servo bus; the emulator links its pseudo-terminal here
    state_endpoint: str = "tcp://127.0.0.1:5560"  # where this arm's joint states are published (state-reader binds)
    prefix: str = ""  # joint-name prefix: "" for one arm, "left_" / "right_" for two
    robot_id: str = "so101"  # LeRobot calibration id: <calibration_dir>/<robot_id>.json
    calibration_dir: str = ""  # empty: LeRobot's default calibration directory
    read_hz: float = 60.0  # state-reader sampling rate
    max_state_age_s: float = 0.15  # the actuator holds when this arm's newest state is older
    # Joint limits and the largest move per control tick, in robot units (degrees; gripper 0..100).
    lower_limits: list[float] = field(default_factory=lambda: [-110.0, -100.0, -100.0, -100.0, -150.0, 0.0])
    # Per joint, robot units.
    upper_limits: list[float] = field(default_factory=lambda: [110.0, 100.0, 100.0, 100.0, 150.0, 100.0])
    max_step: list[float] = field(default_factory=lambda: [3.0, 3.0, 3.0, 3.0, 5.0, 5.0])  # per joint, per control tick
    rest_pose: list[float] = field(default_factory=list)  # empty: stop only holds
    lock_file: str = ""  # empty: derived from the port (one OS lock per bus)
    # LeRobot norm mode of the five body joints: degrees (LeRobot >= 0.3 default) or the -100..100 range of
    # older calibrations/datasets. The gripper is always 0..100.
    use_degrees: bool = True
    retry_s: float = 2.0  # state-reader: a missing port / failing bus is reopened this often

    def joint_names(self) -> list[str]:
        return [f"{self.prefix}{joint}.pos" for joint in SO101_JOINTS]

    def bus_lock_path(self) -> str:
        if self.lock_file:
            return self.lock_file
        # The real device, so that two spellings of one port (/dev/serial/by-id/..., /dev/ttyACM0, the
        # emulator's link to /dev/pts/N) share one lock. Resolved at connect time: the target can change.
        device = os.path.realpath(resolve_repo_path(self.port))
        return f"/tmp/armpipe-bus-{device.strip('/').replace('/', '_')}.lock"


# What a joint's value can be in each of LeRobot's norm modes (arms.<arm>.use_degrees): the body joints in
# degrees (-180..180: a full turn around the calibrated middle) or in the -100..100 range mode (the calibrated
# range); the gripper is 0..100 in both.
UNIT_BOUNDS = {True: (-180.0, 180.0), False: (-100.0, 100.0)}
GRIPPER_BOUNDS = (0.0, 100.0)
UNITS_DOC = "docs/configuration.md, \"Units\""


def check_arm_units(where: str, arm: ArmConfig) -> None:
    """Limits and rest_pose must be numbers the arm's declared units can hold, and the rest pose lie within the
    limits; a ``ConfigError`` naming the field and the joint otherwise (a rest pose of -150 cannot be in range
    mode). max_step is any positive step (a huge one switches the step limit off, as some tests do)."""
    units = "degrees (use_degrees: true)" if arm.use_degrees else "LeRobot's -100..100 range mode (use_degrees: false)"
    other = ("-100..100 range mode: set use_degrees: false" if arm.use_degrees
             else "degrees: set use_degrees: true")
    for key in ("lower_limits", "upper_limits", "rest_pose"):
        for joint, value in zip(SO101_JOINTS, getattr(arm, key), strict=False):
            low, high = GRIPPER_BOUNDS if joint == "gripper" else UNIT_BOUNDS[arm.use_degrees]
            if not low <= value <= high:
                what = "the gripper is 0..100 in both units" if joint == "gripper" else f"the arm is in {units}"
                raise ConfigError(f"{where}.{key}", (
                    f"{joint} is {value:g}, which cannot be in the arm's units: {what}, so {low:g}..{high:g}. Give "
                    f"lower_limits, upper_limits, max_step and rest_pose in the arm's units, or, if these numbers "
                    f"are in {other} ({UNITS_DOC}; configs/<task>-range.yaml are the tasks in range mode)"))
    if arm.rest_pose:
        for index, (joint, value) in enumerate(zip(SO101_JOINTS, arm.rest_pose, strict=False)):
            if not arm.lower_limits[index] <= value <= arm.upper_limits[index]:
                raise ConfigError(f"{where}.rest_pose", f"{joint} rests at {value:g}, outside its limits "
                                  f"{arm.lower_limits[index]:g}..{arm.upper_limits[index]:g}; give rest_pose in the "
                                  f"arm's units ({units}; {UNITS_DOC})")


@dataclass
class PolicyConfig:
    # A pretrained_model dir, or a lerobot-train run folder (its last checkpoint).
    checkpoint: str = "checkpoints/lift-tiny/pretrained_model"
    # The policy node binds this. Loopback keeps the link plain (the one-machine demo); anything else
    # (tcp://*:8000, an address) turns CURVE on: see the key fields below and docs/operations.md, "Keys".
    bind: str = "tcp://127.0.0.1:8000"
    endpoint: str = "tcp://127.0.0.1:8000"  # clients connect here; not loopback: CURVE on
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "fp32"  # fp32 | bf16
    num_inference_steps: int = 0  # diffusion only; 0 keeps the checkpoint's
    noise_scheduler: str = ""  # diffusion only: "" keeps the checkpoint's; DDIM or DDPM
    compile: bool = False  # torch.compile the model (GPU)
    cuda_graphs: bool = False  # replay the whole chunk as one CUDA graph (GPU)
    # diffusion: the UNet restructured for batch 1 (convolutions as matrix products, FiLM for all steps at
    # once, one compiled step function); fast on GPUs, not bit-exact
    fast_unet: bool = False
    cpu_threads: int = 0  # torch intra-op threads on a cpu device; 0 keeps torch's default (one per core)
    warmup: int = 1  # inference passes before reporting ready
    # torch.compile's on-disk caches (Inductor's FX graph and AOTAutograd caches, Triton kernels), so a restarted
    # node with policy.compile reuses what an earlier start compiled; "" = <run_dir>/compile-cache
    compile_cache: str = ""
    # A second policy process, loaded and warmed up, that takes over the socket when the serving one stops
    # (restart, crash, kill -9): a restart then costs the client one lost request instead of a whole start.
    # Costs a second copy of the model in (GPU) memory and a second start-up. docs/operations.md, "Standby"
    standby: bool = False
    max_sessions: int = 64  # client sessions kept (least recently used dropped)
    # Cross-session batching: requests of different sessions waiting for the model run as one batch of up to
    # this many (1 = one request at a time). docs/nodes/policy.md, "Many robots: batching"
    max_batch: int = 16
    # How long the first waiting request may wait for others to join its batch, milliseconds; 0 = none: a
    # batch is whatever waits when the model comes free (requests that arrive while it is busy batch anyway).
    batch_window_ms: float = 0.0
    # The period of the node's capacity figures (chunks/s, batch sizes, queue wait): logged once per period, kept
    # in the readiness file (make status) and in every ping reply (the panel asks for them). Seconds, 1..600
    capacity_period_s: float = 10.0
    seed: int = 0  # diffusion noise is seeded per session from this, so a replay is reproducible
    # Rows per reply. n_action_steps: what LeRobot executes of a prediction. horizon (DiffusionPolicy): every
    # predicted row from the newest observation on, a longer chunk that covers a longer round trip.
    rows: str = "n_action_steps"
    # rtc: the weight of the soft prefix rows (after the frozen ones) falls to 0 over the prefix: exp (the
    # exponential decay of Black et al. 2025, real-time chunking) or linear. docs/nodes/policy.md
    rtc_guidance: str = "exp"
    # SmolVLA / pi0 / pi0.5: where the VLM's config and tokenizer files are (nothing is downloaded at run time).
    # "" = the checkpoint's own path (SmolVLA's vlm_model_name when it is a directory), then the local Hugging
    # Face cache. A directory holding the files, or one subfolder per hub id (<vlm_dir>/<org>/<name>/).
    # docs/nodes/policy.md, "Vision-language-action policies"
    vlm_dir: str = ""
    timeout_s: float = 2.0  # client side: per-attempt reply timeout
    retries: int = 1  # client side: attempts before the policy counts as unreachable
    # Robot side: where chunks come from. armpipe: the policy node at policy.endpoint; openpi: a server that
    # speaks openpi's WebSocket wire (openpi's serve_policy, armpipe's openpi gateway, ...), set up under
    # openpi.server. docs/operations.md, "Using armpipe with openpi"
    backend: str = "armpipe"
    # CURVE keys of the policy link, made with `python -m common.tools.keys --out DIR --name NAME` (a
    # NAME.key public certificate and a NAME.key_secret secret one). Paths; relative to the repository.
    # Server: its own secret certificate.
    server_secret_key_file: str = ""
    # Server: the directory of the allowed clients' public certificates (each robot's NAME.key); re-read
    # at most every 5 s, so a robot is let in by copying its file there.
    allowed_clients_dir: str = ""
    server_public_key_file: str = ""  # robot (client): the server's public certificate (server.key)
    client_secret_key_file: str = ""  # robot (client): its own secret certificate (robot.key_secret: its key pair)

    def crosses_hosts(self) -> bool:
        """Whether the policy link can leave this machine (its bind or its endpoint is not loopback)."""
        return not (is_loopback(self.bind) and is_loopback(self.endpoint))

    def curve_keys_set(self) -> bool:
        return any((self.server_secret_key_file, self.allowed_clients_dir, self.server_public_key_file,
                    self.client_secret_key_file))


@dataclass
class ActuatorConfig:
    control_endpoint: str = "tcp://127.0.0.1:5571"  # start / stop / label / status / instruction (REQ -> ROUTER)
    events_endpoint: str = "tcp://127.0.0.1:5570"  # executed actions, events, loop stats (PUB)
    dry_run: bool = False  # publish commands but never write them to the bus
    # Ask for the next chunk when this many rows remain queued; None (the default): when the rows left cover
    # the measured round trip (running p90), which is what a hand-set count approximates.
    refill_rows: int | None = None
    overlap: str = "blend"  # replace | blend | rtc
    blend_old_weight: float = 0.5  # blend: weight of the already queued row on overlapping ticks
    # rtc: rows sent after the frozen ones as soft guidance (queued rows, then the rows the policy predicted
    # after the chunk; their weight falls to 0, policy.rtc_guidance); the request also goes out this many
    # rows earlier than replace would send it
    rtc_soft_rows: int = 8
    max_chunk_age_s: float = 1.0  # chunk older than this on arrival (from its observation) is dropped
    auto_start: bool = False  # start an episode as soon as the contract checks out
    # ... and once these programs are ready (only those supervisord runs here), at most auto_start_wait_s
    auto_start_after: list[str] = field(default_factory=lambda: ["recorder"])
    auto_start_wait_s: float = 60.0
    rest_step: float = 1.0  # stop with rest_pose: max move per tick towards it
    contract_wait_s: float = 0.0  # 0: wait for the policy forever (retrying) before the first episode
    # Lockstep (offline evaluation with the dataset player): tick once per new observation instead of
    # on the wall clock, wait for each chunk, and treat the observation's time as "now".
    lockstep: bool = False
    # Scheduling priority of the actuator process (Unix nice value, -20..19; 0 leaves it alone). A negative
    # value lets the control loop run before other work on a busy robot computer; it needs root or
    # CAP_SYS_NICE, and without them the node logs a warning and runs at the default priority.
    nice: int = 0
    # Capture times more than this ahead of the actuator's own clock (same host: the same monotonic clock)
    # are refused: a future stamp would make a frame or state look fresh for as long as it lies.
    max_future_s: float = 0.05
    # Episode start (and restart): the step limit starts from the position the bus reports; when the
    # subscribed state differs from it by more than this (robot units, any joint), an anchor_mismatch
    # event says so and the arm moves at rest_step per tick until it has caught up with the policy.
    anchor_tolerance: float = 5.0
    # The checkpoint's dataset stats are checked against the arms' units (degrees or -100..100) and joint
    # limits before moving; true accepts a disagreement that is intended (logged and published, not refused).
    units_mismatch_intended: bool = False
    # The task in words for a language policy (its contract says takes_instruction: SmolVLA, pi0, pi0.5), sent
    # with every infer request (UTF-8, 1..512 bytes); the control socket's instruction op changes it between
    # episodes. A language policy with none is refused at the contract check.
    instruction: str = ""
    # Where the instruction comes from: config (actuator.instruction, or what the control socket set) or dataset
    # (the task the dataset player sends with each state, meta.task; actuator.instruction until one arrives)
    instruction_source: str = "config"


@dataclass
class PlayerConfig:
    dataset: str = "data/lift-demo"  # a local LeRobot v3 dataset root
    repo_id: str = "armpipe/lift-demo"  # the dataset's LeRobot repo id (local only; nothing is downloaded)
    episodes: list[int] = field(default_factory=list)  # empty: all
    mode: str = "realtime"  # realtime | lockstep
    loop: bool = True  # start again after the last selected episode
    gt_endpoint: str = "tcp://127.0.0.1:5580"  # ground-truth actions and episode events (PUB)
    video_backend: str = "pyav"  # pyav (the player's fast sequential reader) or a LeRobot backend
    follow_episodes: bool = False  # start/stop episodes on the actuator's episode events
    prefetch_frames: int = 30  # frames decoded ahead per camera (a decoder thread per camera)
    tolerance_s: float = 1e-4  # a video frame must lie this close to its parquet timestamp (LeRobot's default)
    lockstep_timeout_s: float = 5.0  # lockstep: re-send a frame not acknowledged by the actuator within this


@dataclass
class EmulatorConfig:
    speed_deg_s: float = 180.0  # present position follows the goal at this speed
    lag_s: float = 0.02  # before the present position starts following a new goal
    # Log every Goal_Position write (time, servo, goal before and after, torque) to
    # <run_dir>/stats/servo_emulator-<arm>-goals.jsonl: what the servos received, for tests and audits
    record_goals: bool = False


@dataclass
class MonitorConfig:
    host: str = "127.0.0.1"  # loopback only by default; 0.0.0.0 serves the panel to the network
    port: int = 9000  # the panel's HTTP port
    supervisor_url: str = "http://127.0.0.1:9001/RPC2"  # supervisord XML-RPC (status, restart buttons)
    frame_hz: float = 10.0  # at most this many JPEG frames per camera pushed to the page (encoded here)
    max_width: int = 640  # camera views wider than this are downscaled before JPEG encoding
    jpeg_quality: int = 70  # of the JPEG frames pushed to the page
    series_hz: float = 10.0  # joint/action/timing batches pushed to the page per second
    history_s: float = 30.0  # plot history kept for a page that connects late
    control_timeout_s: float = 2.0  # actuator control socket: per-attempt reply timeout


@dataclass
class RecorderConfig:
    output_dir: str = "recordings"  # one LeRobot dataset per episode, plus metrics.jsonl, summary.json, plots/
    vcodec: str = "h264"  # LeRobot video codec of recorded cameras: h264 (fast to encode) | libsvtav1 | hevc
    queue_ticks: int = 300  # ticks waiting for the writer at most (10 s at 30 fps); beyond, ticks are dropped
    video_preset: str = "ultrafast"  # h264/hevc speed preset of the encoders that run during the episode
    frame_buffer: int = 60  # recent frames kept per camera to match each tick's inputs by sequence number
    input_wait_s: float = 0.5  # how long a tick waits for the frames and states it names before using the newest


@dataclass
class OpenpiKeys:
    """Which keys of an openpi observation carry which camera and the state (docs/protocol.md, "openpi")."""

    # Observation key -> camera name. Empty: flat layout "observation/<camera>", nested layout "<camera>" (under
    # "images").
    images: dict[str, str] = field(default_factory=dict)
    # Keys whose values, concatenated in this order, are the state vector: one key (the whole vector) or one key
    # per arm in arm order. Empty: flat layout ["observation/state"], nested layout the arm names (under "states").
    state: list[str] = field(default_factory=list)


@dataclass
class OpenpiGatewayConfig:
    """Door 1: openpi clients get chunks from the policy node through nodes.openpi_gateway (role server)."""

    enabled: bool = False  # run the gateway under supervisord with the policy (roles server and demo)
    host: str = "127.0.0.1"  # beyond loopback (0.0.0.0, an address): TLS and an API key, or insecure: true
    port: int = 8765
    api_key_file: str = ""  # a file holding the key clients send as "Authorization: Api-Key <key>"
    tls_cert_file: str = ""  # PEM certificate (chain) for wss://; with tls_key_file
    tls_key_file: str = ""  # PEM private key of tls_cert_file
    layouts: list[str] = field(default_factory=lambda: ["flat", "nested"])  # accepted key layouts (flat | nested)
    flat: OpenpiKeys = field(default_factory=OpenpiKeys)  # openpi's flat "observation/..." keys
    nested: OpenpiKeys = field(default_factory=OpenpiKeys)  # the seed's {"images": {...}, "states": {...}}
    prompt_key: str = "prompt"  # the instruction's key (a language policy only)
    max_connections: int = 16  # more are answered HTTP 503
    max_message_mib: int = 64  # a bigger observation closes the connection (1009)
    timeout_s: float = 10.0  # per request to the policy node


@dataclass
class OpenpiServerConfig:
    """Door 2 (policy.backend: openpi): the robot side asks an openpi-compatible server for chunks."""

    endpoint: str = "ws://127.0.0.1:8765"  # ws://host:port[/path] or wss://...
    api_key_file: str = ""  # a file holding the key, sent as "Authorization: Api-Key <key>"
    ca_file: str = ""  # wss: a PEM CA bundle to verify the server with (empty: the system's)
    layout: str = "flat"  # flat | nested: how observations are sent
    keys: OpenpiKeys = field(default_factory=OpenpiKeys)
    prompt_key: str = "prompt"
    # Rows per chunk the server returns, when its metadata has no "action_horizon" (openpi's servers usually
    # send none): the contract needs it before moving, and a reply with another row count is refused.
    chunk_length: int = 0
    connect_timeout_s: float = 5.0  # opening the WebSocket (replies: policy.timeout_s)


@dataclass
class OpenpiConfig:
    gateway: OpenpiGatewayConfig = field(default_factory=OpenpiGatewayConfig)
    server: OpenpiServerConfig = field(default_factory=OpenpiServerConfig)


def validate_openpi(config: DeploymentConfig) -> None:
    """The ``openpi`` section's checks, each naming its field."""
    _one_of("policy.backend", config.policy.backend, POLICY_BACKENDS)
    gateway, server = config.openpi.gateway, config.openpi.server
    for value in gateway.layouts:
        _one_of("openpi.gateway.layouts", value, OPENPI_LAYOUTS)
    if not gateway.layouts:
        raise ConfigError("openpi.gateway.layouts", f"expected at least one of {list(OPENPI_LAYOUTS)}")
    _one_of("openpi.server.layout", server.layout, OPENPI_LAYOUTS)
    if not 0 < gateway.port < 65536:
        raise ConfigError("openpi.gateway.port", f"expected a TCP port 1..65535, got {gateway.port}")
    if bool(gateway.tls_cert_file) != bool(gateway.tls_key_file):
        raise ConfigError("openpi.gateway.tls_key_file" if gateway.tls_cert_file else "openpi.gateway.tls_cert_file",
                          "expected both tls_cert_file and tls_key_file (or neither)")
    for where, keys in (("openpi.gateway.flat", gateway.flat), ("openpi.gateway.nested", gateway.nested),
                        ("openpi.server.keys", server.keys)):
        for key, camera in keys.images.items():
            if camera not in config.cameras:
                raise ConfigError(f"{where}.images.{key}", f"expected one of the cameras {sorted(config.cameras)}, "
                                                           f"got {camera!r}")
        if keys.state and len(keys.state) not in (1, len(config.arms)):
            raise ConfigError(f"{where}.state", f"expected one key (the whole state) or one per arm "
                                                f"({len(config.arms)}: {list(config.arms)}), got {keys.state}")
    if gateway.max_connections < 1:
        raise ConfigError("openpi.gateway.max_connections", f"expected 1 or more, got {gateway.max_connections}")
    if not 0 < gateway.max_message_mib <= 1024:
        raise ConfigError("openpi.gateway.max_message_mib", f"expected 1..1024, got {gateway.max_message_mib}")
    if not gateway.timeout_s > 0:
        raise ConfigError("openpi.gateway.timeout_s", f"expected a positive time, got {gateway.timeout_s}")
    if not server.endpoint.startswith(("ws://", "wss://")):
        raise ConfigError("openpi.server.endpoint", f"expected ws://host:port or wss://host:port, got "
                                                    f"{server.endpoint!r}")
    if server.chunk_length < 0:
        raise ConfigError("openpi.server.chunk_length", f"expected rows >= 0, got {server.chunk_length}")
    if not server.connect_timeout_s > 0:
        raise ConfigError("openpi.server.connect_timeout_s", f"expected a positive time, got "
                                                             f"{server.connect_timeout_s}")


@dataclass
class DeploymentConfig:
    task: str = "lift"  # lift / stack / sort (names the layout; free text)
    fps: int = 30  # control rate of the actuator; must match the policy's contract
    # Camera name -> camera; names become observation.images.<name>.
    cameras: dict[str, CameraConfig] = field(default_factory=dict)
    # Arm name -> arm; the state/action vector is the arms' joints in this order.
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    actuator: ActuatorConfig = field(default_factory=ActuatorConfig)
    player: PlayerConfig = field(default_factory=PlayerConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    recorder: RecorderConfig = field(default_factory=RecorderConfig)
    # openpi's WebSocket wire: the gateway for openpi clients, and the robot side's openpi server (policy.backend)
    openpi: OpenpiConfig = field(default_factory=OpenpiConfig)
    run_dir: str = "run"  # readiness files and sockets that are not TCP
    # Plain TCP where CURVE would be on (the policy link off loopback), and streams bound beyond loopback;
    # the nodes log a loud warning at start. For a closed lab network only.
    insecure: bool = False

    # ------------------------------------------------------------------ derived views
    def state_names(self) -> list[str]:
        """The state (and action) vector: each arm's joints in config order (left before right)."""
        return [name for arm in self.arms.values() for name in arm.joint_names()]

    def action_names(self) -> list[str]:
        return self.state_names()

    def lower_limits(self) -> list[float]:
        return [v for arm in self.arms.values() for v in arm.lower_limits]

    def upper_limits(self) -> list[float]:
        return [v for arm in self.arms.values() for v in arm.upper_limits]

    def max_step(self) -> list[float]:
        return [v for arm in self.arms.values() for v in arm.max_step]

    def image_shapes(self) -> dict[str, list[int]]:
        return {name: [cam.height, cam.width, 3] for name, cam in self.cameras.items()}

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the repository root unless absolute."""
        return resolve_repo_path(path)

    def policy_curve(self) -> bool:
        """Whether the policy link uses CURVE: it leaves the machine or keys are configured, and the config
        does not say ``insecure: true``. Server and robot read the same file, so they agree."""
        return not self.insecure and (self.policy.crosses_hosts() or self.policy.curve_keys_set())

    # ------------------------------------------------------------------ checks
    def validate(self) -> DeploymentConfig:
        if self.fps <= 0 or self.fps > 1000:
            raise ConfigError("fps", f"expected 1..1000 ticks per second, got {self.fps}")
        if not self.arms:
            raise ConfigError("arms", "expected at least one arm")
        for name, cam in self.cameras.items():
            where = f"cameras.{name}"
            _one_of(f"{where}.backend", cam.backend, CAMERA_BACKENDS)
            _one_of(f"{where}.encoding", cam.encoding, ENCODINGS)
            if not (0 < cam.width <= 8192 and 0 < cam.height <= 8192):
                raise ConfigError(f"{where}.width", f"expected 1..8192 pixels, got {cam.width}x{cam.height}")
            if not 1 <= cam.jpeg_quality <= 100:
                raise ConfigError(f"{where}.jpeg_quality", f"expected 1..100, got {cam.jpeg_quality}")
        for name, arm in self.arms.items():
            where = f"arms.{name}"
            for key in ("lower_limits", "upper_limits", "max_step"):
                values = getattr(arm, key)
                if len(values) != len(SO101_JOINTS):
                    raise ConfigError(f"{where}.{key}", f"expected {len(SO101_JOINTS)} values "
                                      f"(one per joint {list(SO101_JOINTS)}), got {len(values)}")
            if arm.rest_pose and len(arm.rest_pose) != len(SO101_JOINTS):
                raise ConfigError(f"{where}.rest_pose", f"expected {len(SO101_JOINTS)} values or none")
            for index, (low, high) in enumerate(zip(arm.lower_limits, arm.upper_limits, strict=True)):
                if not low < high:
                    raise ConfigError(f"{where}.lower_limits", f"expected lower < upper for joint "
                                      f"{SO101_JOINTS[index]}, got {low} >= {high}")
            if any(step <= 0 for step in arm.max_step):
                raise ConfigError(f"{where}.max_step", "expected positive steps")
            check_arm_units(where, arm)
            if arm.read_hz <= 0:
                raise ConfigError(f"{where}.read_hz", f"expected a positive rate, got {arm.read_hz}")
        if len(set(self.state_names())) != len(self.state_names()):
            raise ConfigError("arms", "expected distinct joint names: give each arm its own prefix")
        _one_of("policy.device", self.policy.device, DEVICES)
        _one_of("policy.dtype", self.policy.dtype, DTYPES)
        _one_of("actuator.overlap", self.actuator.overlap, OVERLAP_RULES)
        _one_of("actuator.instruction_source", self.actuator.instruction_source, INSTRUCTION_SOURCES)
        if self.actuator.instruction:
            try:
                check_instruction({INSTRUCTION_KEY: self.actuator.instruction}, required=True)
            except ProtocolError as exc:
                raise ConfigError("actuator.instruction", f"expected {exc.expected}; got {exc.got}") from None
        _one_of("player.mode", self.player.mode, PLAYER_MODES)
        _one_of("recorder.video_preset", self.recorder.video_preset, X264_PRESETS)
        if not 0.0 <= self.actuator.blend_old_weight <= 1.0:
            raise ConfigError("actuator.blend_old_weight", "expected a weight in 0..1")
        if self.actuator.refill_rows is not None and self.actuator.refill_rows < 0:
            raise ConfigError("actuator.refill_rows", "expected a non-negative row count, or null to schedule "
                              "from the measured round trip")
        if self.actuator.rtc_soft_rows < 0:
            raise ConfigError("actuator.rtc_soft_rows", f"expected a non-negative row count, got "
                              f"{self.actuator.rtc_soft_rows}")
        _one_of("policy.rows", self.policy.rows, POLICY_ROWS)
        _one_of("policy.rtc_guidance", self.policy.rtc_guidance, RTC_GUIDANCE)
        if not 1 <= self.policy.max_batch <= MAX_POLICY_BATCH:
            raise ConfigError("policy.max_batch", f"expected a batch size in 1..{MAX_POLICY_BATCH} (1: no batching), "
                              f"got {self.policy.max_batch}")
        if self.policy.warmup < 0:
            raise ConfigError("policy.warmup", f"expected passes >= 0, got {self.policy.warmup}")
        if self.policy.cuda_graphs and self.policy.warmup == 0:
            # The warm-up records every graph (a VLA: one per instruction-length bucket, pi0.5 seven); without it
            # the first robot's request would wait for all the recording.
            raise ConfigError("policy.warmup", "expected at least 1 pass with policy.cuda_graphs: true (the warm-up "
                              "records the CUDA graphs; with 0 the first robot's request would record them all)")
        if not 1.0 <= self.policy.capacity_period_s <= 600.0:
            raise ConfigError("policy.capacity_period_s", f"expected seconds in 1..600, got "
                              f"{self.policy.capacity_period_s}")
        if not 0.0 <= self.policy.batch_window_ms <= 100.0:
            raise ConfigError("policy.batch_window_ms", f"expected milliseconds in 0..100, got "
                              f"{self.policy.batch_window_ms}")
        if not self.actuator.max_future_s >= 0:
            raise ConfigError("actuator.max_future_s",
                              f"expected a non-negative time, got {self.actuator.max_future_s}")
        if not self.actuator.anchor_tolerance > 0:
            raise ConfigError("actuator.anchor_tolerance", f"expected a positive tolerance, got "
                              f"{self.actuator.anchor_tolerance}")
        if self.actuator.auto_start_wait_s < 0:
            raise ConfigError("actuator.auto_start_wait_s",
                              f"expected seconds >= 0, got {self.actuator.auto_start_wait_s}")
        if not -20 <= self.actuator.nice <= 19:
            raise ConfigError("actuator.nice", f"expected a nice value in -20..19, got {self.actuator.nice}")
        for field_path, endpoint in local_sockets(self).items():
            if not self.insecure and not is_loopback(endpoint):
                raise ConfigError(field_path, f"expected a loopback endpoint (tcp://127.0.0.1:PORT), got {endpoint!r}: "
                                  "only the policy link is authenticated (CURVE); this socket would be plain TCP "
                                  "on the network (set `insecure: true` to allow it anyway)")
        validate_openpi(self)
        return self


def _one_of(field_path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(field_path, f"expected one of {list(allowed)}, got {value!r}")


def apply_override(raw: dict[str, Any], dotted: str, value_text: str) -> None:
    """Set ``raw[a][b][c] = yaml(value_text)`` for ``dotted == "a.b.c"``, creating maps as needed."""
    keys = dotted.split(".")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: depth + 1]), f"cannot override inside a {type(child).__name__}")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise ConfigError(dotted, f"override value {value_text!r} is not valid YAML: {exc}") from exc


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> DeploymentConfig:
    """Read a deployment YAML, apply ``key.path=value`` overrides, decode and validate."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConfigError("--config", f"no such file: {config_path}")
    with config_path.open() as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "expected a YAML map")
    for item in overrides or []:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ConfigError(item, "expected an override of the form --field.sub=value")
        apply_override(raw, key, value)
    try:
        config = draccus.decode(DeploymentConfig, raw)
    except draccus.utils.DecodingError as exc:
        raise ConfigError(str(exc).split("`")[1] if "`" in str(exc) else "(config)", str(exc)) from exc
    return config.validate()


@dataclass
class NodeArgs:
    config: DeploymentConfig
    name: str
    config_path: Path
    # The policy link's CURVE keys for this node's side (``curve_side``), or None when CURVE is off.
    curve: CurveKeys | None = None


def parse_node_args(description: str, argv: list[str] | None = None, *, default_name: str = "",
                    instance_of: str = "", curve_side: str = "", prog: str | None = None) -> NodeArgs:
    """The shared command line of every node: --config, --name, then any --field.path=value.

    ``instance_of`` ("arm" or "camera") makes ``--name`` select one of the config's arms or cameras
    (the first when omitted). ``curve_side`` ("server" for the policy, "client" for its clients) loads
    that side's CURVE keys of the policy link when CURVE is on. ``prog`` is the command the usage line
    names (``python -m nodes.camera``; argparse alone would say ``__main__.py``). A bad config, instance
    or key file exits with code 2 after logging the field (and the file).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", required=True, help="deployment YAML, e.g. configs/lift.yaml")
    parser.add_argument("--name", default=default_name, help="instance name (camera or arm name)")
    args, overrides = parser.parse_known_args(argv)
    bad = [item for item in overrides if not (item.startswith("--") and "=" in item)]
    if bad:
        parser.error(f"overrides must look like --field.sub=value; got {bad}")
    try:
        config = load_config(args.config, overrides)
        name = args.name
        if instance_of:
            instances = {"arm": config.arms, "camera": config.cameras}[instance_of]
            name, _ = select_instance(instances, args.name, instance_of)
        curve = curve_keys_for(config, curve_side) if curve_side else None
    except ConfigError as exc:
        # Exit code 2, once: a restart cannot fix a bad config (common.refusal says how supervisord is kept
        # from retrying it). The config did not load, so its run_dir is read from the raw YAML if it can be.
        from common.refusal import refuse

        refuse(str(exc), run_dir=raw_run_dir(args.config))
    warn_insecure_streams(config)
    return NodeArgs(config=config, name=name, config_path=Path(args.config).resolve(), curve=curve)


def warn_insecure_streams(config: DeploymentConfig) -> None:
    """The loud start-up warning for streams that ``insecure: true`` lets leave the machine in plain TCP."""
    exposed = {path: endpoint for path, endpoint in local_sockets(config).items() if not is_loopback(endpoint)}
    if exposed:
        logging.getLogger("armpipe.config").warning(
            "INSECURE: `insecure: true` lets these sockets take plain TCP beyond this machine, where anyone on the "
            "network can read or inject them: %s", ", ".join(f"{path}={url}" for path, url in exposed.items()))


def _key_file(path_text: str, field: str, *, secret: bool) -> tuple[bytes, bytes]:
    if not path_text:
        kind = "secret certificate (<name>.key_secret)" if secret else "public certificate (<name>.key)"
        raise ConfigError(field, f"expected the path of a CURVE {kind} (CURVE is on: see docs/operations.md, "
                                 f"'Keys'); make one with {KEYS_COMMAND}")
    try:
        return load_certificate_file(resolve_repo_path(path_text), secret=secret)
    except KeyFileError as exc:
        raise ConfigError(field, str(exc)) from exc


def curve_keys_for(config: DeploymentConfig, side: str) -> CurveKeys | None:
    """The CURVE keys of the policy link for ``side`` ("server": the policy node; "client": whoever asks
    it for chunks), or None when CURVE is off. Logs which it is; a loud warning for ``insecure: true``
    on a link that leaves the machine. A missing or unreadable key is a ``ConfigError`` naming the field
    and the file."""
    log = logging.getLogger("armpipe.curve")
    policy = config.policy
    if config.insecure:
        if policy.crosses_hosts():
            log.warning("INSECURE: `insecure: true` in the config: the policy link (bind %s, endpoint %s) is plain "
                        "TCP. Anyone on the network can ask this policy for actions, fill its sessions, or pose "
                        "as the server to the robot. Set up CURVE keys (docs/operations.md, 'Keys') and remove "
                        "`insecure: true`.", policy.bind, policy.endpoint)
        return None
    if not config.policy_curve():
        log.info("CURVE off: the policy link stays on loopback (bind %s, endpoint %s)", policy.bind, policy.endpoint)
        return None
    if side == "server":
        public, secret = _key_file(policy.server_secret_key_file, "policy.server_secret_key_file", secret=True)
        field_name = "policy.allowed_clients_dir"
        if not policy.allowed_clients_dir:
            raise ConfigError(field_name, "expected the directory of the allowed clients' public certificates "
                                          "(<name>.key files); CURVE is on: see docs/operations.md, 'Keys'")
        allowed = resolve_repo_path(policy.allowed_clients_dir)
        try:
            count = check_allowed_clients(allowed)
        except KeyFileError as exc:
            raise ConfigError(field_name, str(exc)) from exc
        log.info("CURVE on: server key %s, allowed clients: %d certificate(s) in %s", public.decode(), count, allowed)
        return CurveKeys(server_public=public, server_secret=secret, allowed_clients_dir=str(allowed))
    if side == "client":
        server_public, _ = _key_file(policy.server_public_key_file, "policy.server_public_key_file", secret=False)
        public, secret = _key_file(policy.client_secret_key_file, "policy.client_secret_key_file", secret=True)
        log.info("CURVE on: talking to server key %s as client key %s", server_public.decode(), public.decode())
        return CurveKeys(server_public=server_public, client_public=public, client_secret=secret)
    raise ValueError(f"side must be 'server' or 'client', got {side!r}")


def raw_run_dir(path: str | os.PathLike[str]) -> Path | None:
    """The ``run_dir`` a deployment YAML names, read without validating the rest (for a config that does
    not load: where its nodes record their refusal and the status tool looks for it); None if unreadable."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    run_dir = raw.get("run_dir", DeploymentConfig.run_dir) if isinstance(raw, dict) else None
    return resolve_repo_path(run_dir) if isinstance(run_dir, str) and run_dir else None


def select_instance[T](instances: dict[str, T], name: str, what: str) -> tuple[str, T]:
    """The ``--name`` instance among ``instances`` (the first when no name is given).

    An unknown or missing instance is a ``ConfigError`` naming ``--name`` and the choices.
    """
    if not instances:
        raise ConfigError(f"{what}s", f"expected at least one {what} in the config")
    chosen = name or next(iter(instances))
    if chosen not in instances:
        raise ConfigError("--name", f"expected one of the {what}s {list(instances)}, got {chosen!r}")
    return chosen, instances[chosen]
