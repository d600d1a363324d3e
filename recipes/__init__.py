"""Research recipes built on the hook points."""
