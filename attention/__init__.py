"""Plain-torch attention addressing, capture and map handling (never imports the host)."""
