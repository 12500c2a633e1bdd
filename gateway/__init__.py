"""Scopegate: a scoped-token authorization gateway in front of a hosting platform's API."""

__version__ = "0.1.0"
