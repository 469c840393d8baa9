"""Serving: exported students on Ray Serve (label-only by default, dynamically batched, hardened)."""
