"""Receiving a bundle: resumable uploads (uploads.py) and the writer of one stream (writer.py)."""
