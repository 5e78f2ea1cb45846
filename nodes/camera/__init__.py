"""The camera room: the node (``__main__``) and its capture backends (RealSense, OpenCV, synthetic). May
import ``common`` and its own modules; no other node imports it."""
