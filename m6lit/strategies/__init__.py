"""Placement strategies: selective CPU offload of chosen layers, streamed just in time."""
