"""The monitor room: the web panel node and its threads (``__main__``), the panel state (``panel``), the
commands to the actuator and supervisord (``commands``), the HTTP server (``http``) and the browser files
(``static/``). May import ``common`` and its own modules; no other node imports it."""
