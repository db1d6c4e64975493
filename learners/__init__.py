"""Background learners: replay buffers, LoRA + head training, evaluation with serving's Predictor,
artifact export. May import ``serving`` and ``streams``."""
