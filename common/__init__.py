"""What two or more armpipe programs (nodes, tools, benchmarks) use: the wire (``wire/``), configuration,
readiness, the servo bus, the dataset reader, supervisord access and the tools (``tools/``)."""
