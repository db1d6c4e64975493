"""Settings assembly, the CLI, the embedded local stack, metrics wiring. May import every other layer."""
