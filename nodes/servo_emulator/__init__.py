"""The servo emulator room: Feetech STS3215 servos on a pseudo-terminal. ``__main__`` (the serving loop),
``sts3215`` (protocol, registers and the servo model), ``bus`` (packet framing and instructions), ``pty``
(the pseudo-terminal). May import ``common`` and its own modules; no other node imports it."""
