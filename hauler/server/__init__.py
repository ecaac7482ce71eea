"""The server process: site registry, heartbeats, transfers, job store and runner."""

from hauler.server.app import Server

__all__ = ["Server"]
