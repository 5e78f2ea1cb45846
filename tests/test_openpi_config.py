"""The ``openpi`` config section (issue 24): each bad field named, and the gateway's supervisord program on the
server role only when enabled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, write_config
from test_supervisor_programs import load_in_supervisor, summary

from common.config import ConfigError, load_config
from common.wire.openpi import ObservationKeys, unpack
from common.wire.protocol import ProtocolError

LIFT = REPO_ROOT / "configs" / "lift.yaml"


@pytest.mark.parametrize(("override", "field"), [
    ("--policy.backend=grpc", "policy.backend"),
    ("--openpi.gateway.layouts=[flat, deep]", "openpi.gateway.layouts"),
    ("--openpi.server.layout=deep", "openpi.server.layout"),
    ("--openpi.gateway.flat.images={observation/image: side}", "openpi.gateway.flat.images.observation/image"),
    ("--openpi.server.keys.state=[a, b]", "openpi.server.keys.state"),
    ("--openpi.gateway.tls_cert_file=cert.pem", "openpi.gateway.tls_key_file"),
    ("--openpi.server.endpoint=tcp://127.0.0.1:8000", "openpi.server.endpoint"),
    ("--openpi.server.chunk_length=-1", "openpi.server.chunk_length"),
    ("--openpi.gateway.port=0", "openpi.gateway.port"),
])
def test_a_bad_openpi_field_is_named(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(LIFT, [override])
    assert error.value.field == field


@pytest.mark.parametrize("enabled", [False, True])
def test_the_gateway_runs_on_the_server_role_when_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          enabled: bool) -> None:
    config_path = write_config(tmp_path, "lift", {"openpi": {"gateway": {"enabled": enabled}}})
    server = summary(load_in_supervisor("server", config_path, tmp_path / "run", monkeypatch))
    robot = summary(load_in_supervisor("robot", config_path, tmp_path / "run", monkeypatch))
    gateway = ("server", "openpi_gateway", 25)
    assert (gateway in server) is enabled and ("server", "policy", 20) in server
    assert not any(name == "openpi_gateway" for _, name, _ in robot)


def test_default_keys_of_both_layouts_and_a_round_trip() -> None:
    config = load_config(REPO_ROOT / "configs" / "sort.yaml")
    flat = ObservationKeys.from_config(config, "flat", config.openpi.server.keys)
    nested = ObservationKeys.from_config(config, "nested", config.openpi.server.keys)
    assert flat.images == {f"observation/{name}": name for name in config.cameras}
    assert flat.state == ["observation/state"] and flat.state_sizes == [12]
    assert nested.state == list(config.arms) and nested.state_sizes == [6, 6]
    shapes = {name: [4, 5, 3] for name in config.cameras}
    images = {name: np.full((4, 5, 3), i, np.uint8) for i, name in enumerate(config.cameras)}
    state = np.arange(12, dtype=np.float32)
    from openpi_client import msgpack_numpy

    for keys in (flat, nested):
        obs = unpack(msgpack_numpy.packb(keys.build(images, state, "sort the cubes")))
        got_images, got_state, prompt = keys.parse(obs, shapes)
        assert prompt == "sort the cubes" and np.array_equal(got_state, state)
        assert all(np.array_equal(got_images[name], images[name]) for name in images)


@pytest.mark.parametrize("dtype", ["|O", "|V8", "<U4", "O,i4", ">f4"])
def test_unpack_refuses_dtypes_numpy_would_build_objects_or_structures_from(dtype: str) -> None:
    import msgpack

    data = msgpack.packb({"a": {"b": {b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": dtype, b"shape": [1]}}})
    with pytest.raises(ProtocolError) as error:
        unpack(data)
    assert error.value.field == "a/b.dtype"


def test_unpack_bounds_sizes_and_names_the_key() -> None:
    import msgpack

    short = msgpack.packb({"x": {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [2]}})
    with pytest.raises(ProtocolError, match=r"x\.data: expected 8 bytes"):
        unpack(short)
    huge = msgpack.packb({"x": {b"__ndarray__": True, b"data": b"", b"dtype": "<f8", b"shape": [1 << 20, 1 << 20]}})
    with pytest.raises(ProtocolError, match=r"x\.data"):
        unpack(huge)
    with pytest.raises(ProtocolError, match="one msgpack map"):
        unpack(b"\xc1")
