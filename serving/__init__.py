"""Model runtime, error-memory compensation and the Ray Serve HTTP app. May import ``streams`` only."""
