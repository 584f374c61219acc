"""`lsl`: the command-line client for an LSL server (HTTP + websockets only, never Django)."""

__version__ = "0.1.0"
