"""burrow: tunnels between serverless functions, private databases and local services."""

__version__ = "0.1.0"
