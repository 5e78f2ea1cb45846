"""The wire: message format (protocol), sockets (transport), JPEG (images), the policy contract and its
client. Used by every node and tool; imports only numpy, msgpack, zmq and itself (cv2 lazily for JPEG)."""
