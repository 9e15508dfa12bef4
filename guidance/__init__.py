"""Plain-torch losses, inversions and sampler maths of the three papers (never imports the host)."""
