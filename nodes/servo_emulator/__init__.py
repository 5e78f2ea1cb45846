"""The servo emulator room: Feetech STS3215 servos on a pseudo-terminal (``__main__``). May import
``common``; no other node imports it."""
