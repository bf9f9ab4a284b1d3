"""The demo corpus (data) and the drift demo (drift)."""
