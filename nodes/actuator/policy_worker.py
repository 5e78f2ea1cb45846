"""The actuator's policy worker: a thread that owns the REQ socket to the policy (ZeroMQ sockets are not
thread-safe) and runs one request at a time, so the control loop never blocks on the network. A result wakes
the loop through a pipe it polls with its sockets: a reply is handled when it lands."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from dataclasses import dataclass

import numpy as np

from common.config import DeploymentConfig
from common.wire.contract import PolicyContract
from common.wire.images import JpegImage
from common.wire.policy_client import ChunkReply, PolicyClient
from common.wire.transport import SocketFactory
from nodes.actuator.inputs import Observation
from nodes.actuator.openpi_client import OpenpiPolicyClient


@dataclass
class Job:
    kind: str  # "contract" | "reset" | "infer"
    generation: int = 0
    observation: Observation | None = None
    obs_t: float = 0.0  # the time sent to the policy (lockstep: the frame index)
    rtc_prefix: np.ndarray | None = None  # overlap rtc: rows the chunk must continue (robot units)
    rtc_delay_rows: int = 0
    instruction: str | None = None  # the task in words, for a policy whose contract takes_instruction
    on_frame: bool = False  # sent when its frames arrived (real time): its reply sets the ticks' phase


@dataclass
class JobResult:
    job: Job
    contract: PolicyContract | None = None
    reply: ChunkReply | None = None
    error: Exception | None = None


class PolicyWorker(threading.Thread):
    """Runs policy requests one at a time so the control loop never blocks on the network."""

    def __init__(self, factory: SocketFactory, config: DeploymentConfig, client_id: str) -> None:
        super().__init__(name="policy-worker", daemon=True)
        self.factory = factory
        self.config = config
        self.client_id = client_id
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.results: queue.Queue[JobResult] = queue.Queue()
        self.pending = 0  # jobs submitted whose result has not been taken yet (main thread only)
        # Frames go to the policy as they came: a JPEG camera's bytes as received (never decoded and encoded
        # again), a raw frame raw unless its camera asks for JPEG (then at that camera's jpeg_quality).
        self.jpeg_quality = {name: cam.jpeg_quality for name, cam in config.cameras.items() if cam.encoding == "jpeg"}
        # A byte per result on a pipe the control loop polls with its sockets: a reply is handled when it lands,
        # not at the next tick.
        self.wakeup_fd, self._wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_fd, False)
        os.set_blocking(self._wakeup_w, False)

    def drain_wakeups(self) -> None:
        """Empty the wake-up pipe (the results themselves are in ``results``)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wakeup_fd, 4096):
                pass

    def _put(self, result: JobResult) -> None:
        self.results.put(result)
        with contextlib.suppress(BlockingIOError):  # a full pipe of wake-ups: the loop wakes anyway
            os.write(self._wakeup_w, b"r")

    def submit(self, job: Job) -> None:
        self.pending += 1
        self.jobs.put(job)

    def take(self, timeout_s: float | None = None) -> JobResult | None:
        try:
            result = self.results.get(timeout=timeout_s) if timeout_s else self.results.get_nowait()
        except queue.Empty:
            return None
        self.pending -= 1
        return result

    def close(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        policy = self.config.policy
        client: PolicyClient | OpenpiPolicyClient
        if policy.backend == "openpi":  # an openpi-compatible server (issue 24): same interface, openpi's wire
            client = OpenpiPolicyClient(self.config, client_id=self.client_id)
        else:
            client = PolicyClient(self.factory, policy.endpoint, client_id=self.client_id,
                                  timeout_s=policy.timeout_s, retries=policy.retries)
        try:
            while (job := self.jobs.get()) is not None:
                try:
                    self._put(self._run(client, job))
                except Exception as exc:  # reported to the loop, which holds; the worker keeps serving
                    self._put(JobResult(job=job, error=exc))
        finally:
            client.close()

    def _run(self, client: PolicyClient | OpenpiPolicyClient, job: Job) -> JobResult:
        if job.kind == "contract":
            return JobResult(job=job, contract=client.metadata())
        if job.kind == "reset":
            client.reset()
            return JobResult(job=job)
        observation = job.observation
        assert observation is not None
        images = {camera: JpegImage.of_message(msg) if "image" in msg.jpeg else msg.arrays["image"]
                  for camera, msg in observation.frames.items()}
        return JobResult(job=job, reply=client.infer(images, observation.state, job.obs_t, jpeg=self.jpeg_quality,
                                                     rtc_prefix=job.rtc_prefix, rtc_delay_rows=job.rtc_delay_rows,
                                                     instruction=job.instruction))
