"""Gymnasium environments over the serving loop."""
