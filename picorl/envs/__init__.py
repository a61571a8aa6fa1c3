"""Task environments."""
