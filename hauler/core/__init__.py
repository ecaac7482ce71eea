"""Foundations shared by every layer: config models, errors, events, resource sampling."""
