"""The local federation demo: every role as a real process on 127.0.0.1."""
