"""Monitors: pure statistics that turn data into drift / performance / volume signals."""
