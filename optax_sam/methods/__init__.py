"""One file per method: each a thin composition of the mechanism and its pieces."""
