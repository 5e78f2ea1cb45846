"""Command-line tools people run: status, offline evaluation, demo data, checkpoint maker. May import
``common`` (and LeRobot); nodes never import a tool."""
