"""The recorder room: the node and its threads (``__main__``), the receiver's tick pairing (``assembler``),
the episode writer and recovery (``writer``), one episode's LeRobot v3 files (``lerobot_v3``), the camera
encoders (``video``) and metrics and plots (``metrics``). May import ``common`` and its own modules; no
other node imports it."""
