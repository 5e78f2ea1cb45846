"""``python -m common.tools.keys --out DIR --name NAME``: a CURVE key pair for one machine.

Writes pyzmq's certificate pair (``zmq.auth.create_certificates``): ``DIR/NAME.key``, the public
certificate to copy to the other machine, and ``DIR/NAME.key_secret``, the secret one (mode 0600) that
never leaves this machine. Make one pair on the GPU server (``--name server``) and one on each robot
computer (``--name robot-1``, ...); docs/operations.md, "Keys", says where each file goes. An existing
pair is never overwritten.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import zmq.auth

log = logging.getLogger("armpipe.keys")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def make_key_pair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Create ``out_dir/name.key`` and ``out_dir/name.key_secret``; returns (public, secret) paths.

    ``ValueError`` for a name that is not a plain file name, ``FileExistsError`` if either file exists.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--name: expected 1-64 letters, digits, '_', '.', '-' (a file name), got {name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    public, secret = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; keep it, or remove it yourself to make a new pair")
    # The secret file is created unreadable to others from the start: umask 077 while pyzmq writes it.
    previous = os.umask(0o077)
    try:
        public_text, secret_text = zmq.auth.create_certificates(out_dir, name)
    finally:
        os.umask(previous)
    Path(public_text).chmod(0o644)
    Path(secret_text).chmod(0o600)
    return Path(public_text), Path(secret_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory for NAME.key and NAME.key_secret")
    parser.add_argument("--name", required=True, help="this machine's name, e.g. server or robot-1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        public, secret = make_key_pair(args.out, args.name)
    except (ValueError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    public_key, _ = zmq.auth.load_certificate(public)
    log.info("public certificate (copy it to the other machine): %s\n"
             "secret certificate (keep it here, mode 0600):       %s\n"
             "public key (Z85): %s", public, secret, public_key.decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
