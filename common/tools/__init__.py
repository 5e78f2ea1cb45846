"""Command-line tools people run: status, offline evaluation, demo data, checkpoint maker, CURVE keys.
May import ``common`` (and LeRobot); nodes never import a tool."""
