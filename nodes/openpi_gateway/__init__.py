"""The openpi gateway room: openpi's WebSocket wire in front of the policy node (``__main__``: start-up and checks;
``gateway``: the connections). May import ``common`` and its own modules."""
