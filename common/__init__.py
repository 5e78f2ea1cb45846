"""Code that two or more armpipe nodes share: wire protocol, sockets, configuration."""
