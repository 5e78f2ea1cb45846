"""``policy.standby``: two real policy processes on one endpoint; one serves, the other waits loaded and
takes over the moment the first ends (kill -9 included), so a client loses one request, not a start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, NodeProcess, free_port, wait_for, write_config
from test_policy_node import observation

from bench.harness import Supervised
from common.config import load_config
from common.supervisor_client import SupervisorClient, read_readiness
from common.tools.supervisor_programs import STANDBY_PROGRAM, programs, render
from common.wire.policy_client import PolicyClient
from common.wire.transport import PeerUnavailable, SocketFactory

STANDBY_ENV = {"SUPERVISOR_PROCESS_NAME": STANDBY_PROGRAM}  # as supervisord names the second program


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def ready_detail(node: NodeProcess) -> dict:
    return json.loads(node.ready_path.read_text()) if node.ready_path.exists() else {}


def next_chunk(policy: PolicyClient, images: dict, state: Any, message: str, timeout_s: float = 30.0,
               instruction: str | None = None) -> Any:
    """The first chunk served within ``timeout_s``, asking again while no policy process serves."""
    def chunk() -> Any:
        try:
            return policy.infer(images, state, obs_t=time.monotonic(), instruction=instruction)
        except PeerUnavailable:
            return None

    return wait_for(chunk, timeout_s=timeout_s, message=message)


def test_the_standby_program_is_generated_only_when_asked_for(tmp_path) -> None:
    plain = load_config(write_config(mkdir(tmp_path / "plain"), "lift"))
    standby = load_config(write_config(mkdir(tmp_path / "standby"), "lift", {"policy": {"standby": True}}))
    assert [p.name for p in programs("server", plain)] == ["policy"]
    assert [(p.name, p.node) for p in programs("server", standby)] == [("policy", "policy"),
                                                                         (STANDBY_PROGRAM, "policy")]
    text = render("server", standby)
    assert f"[program:{STANDBY_PROGRAM}]" in text and "programs=policy,policy-standby" in text


@pytest.mark.parametrize(("stop_signal", "policy_type"), [(signal.SIGKILL, "diffusion"), (signal.SIGTERM, "diffusion"),
                                                         (signal.SIGKILL, "smolvla")],
                         ids=["sigkill-diffusion", "sigterm-diffusion", "sigkill-smolvla"])
def test_a_loaded_standby_takes_over_when_the_serving_process_ends(stop_signal, policy_type, tiny_checkpoint,
                                                                   tmp_path) -> None:
    # A language policy (tiny SmolVLA) too: the standby loads its VLM and tokenizer offline like the first, warms up
    # with an instruction, and serves the robot's instruction the moment it takes over.
    checkpoint = tiny_checkpoint("lift", policy_type)
    instruction = "pick up the red cube" if policy_type == "smolvla" else None
    rows = 50 if policy_type == "smolvla" else 8
    config_path = write_config(tmp_path, "lift", {"policy": {"checkpoint": str(checkpoint), "cpu_threads": 1,
                                                             "warmup": 1, "standby": True}})
    config = load_config(config_path)
    first = NodeProcess("policy", config_path).start()
    second = NodeProcess("policy", config_path, program=STANDBY_PROGRAM, env=STANDBY_ENV)
    policy = PolicyClient(SocketFactory(), config.policy.endpoint, client_id="robot", timeout_s=30.0, retries=1)
    try:
        first.wait_ready(timeout_s=180)
        second.start().wait_ready(timeout_s=180)
        assert ready_detail(first)["serving"] is True
        assert ready_detail(second)["serving"] is False and ready_detail(second)["standby"] is True
        assert "loaded and waiting to take over" in second.log()
        images, state = observation(config, 0)
        served_by_first = policy.infer(images, state, obs_t=time.monotonic(), instruction=instruction)
        assert served_by_first.actions.shape == (rows, 6)
        assert policy.metadata().takes_instruction is (instruction is not None)

        assert first.proc is not None
        first.proc.send_signal(stop_signal)
        assert first.proc.wait(timeout=30) in (0, -signal.SIGKILL)
        ended = time.monotonic()

        reply = next_chunk(policy, images, state, "the standby never served", instruction=instruction)
        taken_over_s = time.monotonic() - ended
        assert reply.actions.shape == (rows, 6)
        # Loaded already: well under one start of this node (~10-40 s on this CPU), inference included.
        assert taken_over_s < 8.0, taken_over_s
        assert "taking over" in second.log()
        assert ready_detail(second).get("serving") is True
    finally:
        policy.close()
        for node in (first, second):
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


def test_under_supervisord_a_restart_or_kill_of_the_serving_policy_is_taken_over(tiny_checkpoint, tmp_path) -> None:
    """Role server with policy.standby under the real supervisord: both programs run, `make status`'s data
    says which serves, and `supervisorctl restart` or kill -9 of the serving one costs a client well under
    a start, while supervisord brings the ended program back as the next standby."""
    checkpoint = tiny_checkpoint("lift", "diffusion")
    port = free_port()
    config_path = write_config(tmp_path, "lift", {
        "policy": {"checkpoint": str(checkpoint), "cpu_threads": 1, "warmup": 1, "standby": True},
        "monitor": {"supervisor_url": f"http://127.0.0.1:{port}/RPC2"}})
    config = load_config(config_path)
    stack = Supervised("server", "lift", config_path, tmp_path / "run", port).start()
    policy = PolicyClient(SocketFactory(), config.policy.endpoint, client_id="robot", timeout_s=30.0, retries=1)
    images, state = observation(config, 1)

    try:
        stack.wait_all_ready(timeout_s=240)
        for way in ("restart", "kill -9"):
            stack.wait_all_ready(timeout_s=240)
            roles = {proc.name: proc.role for proc in stack.processes()}
            assert sorted(roles.values()) == ["serving", "standby"], roles
            serving = next(name for name, role in roles.items() if role == "serving")
            assert policy.infer(images, state, obs_t=time.monotonic()).actions.shape == (8, 6)
            old_pid = stack.process(serving).pid
            started = time.monotonic()
            if way == "restart":
                stack.ctl("restart", f"server:{serving}", check=True)
            else:
                stack.kill9(serving)
            assert next_chunk(policy, images, state, f"no chunk after {way}").actions.shape == (8, 6)
            assert time.monotonic() - started < 8.0, (way, time.monotonic() - started)
            back = stack.wait_ready(serving, other_pid=old_pid, timeout_s=240)  # the next standby
            roles_now = [(proc.name, proc.role, proc.pid) for proc in stack.processes()]
            assert wait_for(lambda name=serving: stack.process(name).role == "standby", timeout_s=10,
                            message=f"{way}: {roles_now}\n{stack.log_tails()}"), back
    finally:
        policy.close()
        stack.shutdown()


def test_the_images_standby_wrapper_takes_over_stops_on_sigterm_and_exits_2_on_a_refusal(tiny_checkpoint,
                                                                                        tmp_path) -> None:
    """docker/standby.py (``STANDBY=1`` in the policy server image) as a real process, outside the image: its
    own supervisord runs both policy programs, a kill -9 of the serving one is taken over and the killed
    one comes back as the standby, SIGTERM (``docker stop``) ends everything with 0, and a refusal ends
    the wrapper with exit code 2, as the image without a standby does."""
    checkpoint = tiny_checkpoint("lift", "diffusion")
    config_path = write_config(tmp_path, "lift", {"policy": {"checkpoint": str(checkpoint), "cpu_threads": 1,
                                                             "warmup": 1}})
    config = load_config(config_path)
    run_dir = Path(config.run_dir)
    ready_dir = run_dir / "ready"

    def wrapper(*args: str) -> tuple[subprocess.Popen, Path]:
        log_path = tmp_path / f"wrapper-{len(list(tmp_path.glob('wrapper-*.log')))}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "docker" / "standby.py"), "--config",
                                     str(config_path), *args], cwd=REPO_ROOT, stdout=log_file,
                                    stderr=subprocess.STDOUT, env={**os.environ, "ARMPIPE_RUN": str(run_dir)},
                                    start_new_session=True)  # a failed test kills the whole group
        return proc, log_path

    def serving_and_standby() -> tuple[dict, dict] | None:
        entries = read_readiness(ready_dir)
        both = [entries.get(name) for name in ("policy", STANDBY_PROGRAM)]
        if not all(entry and entry["alive"] for entry in both):
            return None
        by_role = {entry["serving"]: entry for entry in both if entry}
        return (by_role[True], by_role[False]) if len(by_role) == 2 else None

    proc, log_path = wrapper()
    policy = PolicyClient(SocketFactory(), config.policy.endpoint, client_id="robot", timeout_s=30.0, retries=1)
    images, state = observation(config, 2)

    try:
        def pair_or_exit() -> tuple[dict, dict] | None:
            assert proc.poll() is None, f"the wrapper exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            return serving_and_standby()

        serving, standby = wait_for(pair_or_exit, timeout_s=240, message="no serving + standby pair")
        # supervisorctl in the container reaches this supervisord through its socket under the run dir.
        supervisor = SupervisorClient(f"unix://{run_dir}/supervisor.sock")
        assert {p.name: p.state for p in supervisor.processes()} == {"policy": "RUNNING", STANDBY_PROGRAM: "RUNNING",
                                                                       "refusals": "RUNNING"}  # the listener
        assert policy.infer(images, state, obs_t=time.monotonic()).actions.shape == (8, 6)
        killed = time.monotonic()
        os.kill(serving["pid"], signal.SIGKILL)
        assert next_chunk(policy, images, state, "the standby never served").actions.shape == (8, 6)
        assert time.monotonic() - killed < 8.0, time.monotonic() - killed
        now_serving, now_standby = wait_for(pair_or_exit, timeout_s=240, message="the killed one never came back")
        assert now_serving["pid"] == standby["pid"] and now_standby["pid"] != serving["pid"]

        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-4000:]
        for entry in (now_serving, now_standby):
            assert not Path(f"/proc/{entry['pid']}").exists(), "a policy process outlived the wrapper"
        output = log_path.read_text()
        assert "taking over" in output and "spawned: 'policy-standby'" in output  # both nodes' logs on stdout
    finally:
        policy.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # supervisord and both nodes too, not only the wrapper
            proc.wait()

    # A refusal (an unknown device): not restarted, and the wrapper's exit code says so.
    refused, refused_log = wrapper("--policy.device=gpu")
    try:
        assert refused.wait(timeout=120) == 2, refused_log.read_text()[-4000:]
    finally:
        if refused.poll() is None:
            os.killpg(refused.pid, signal.SIGKILL)
            refused.wait()
    output = refused_log.read_text()
    assert "REFUSED" in output and "policy.device" in output
