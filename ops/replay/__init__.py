"""``driftserve replay``: replay a labelled stream against a running driftserve, prequentially
(predict over HTTP, then reveal the label as Kafka feedback), and report its quality beside baselines
computed on the same encoder embeddings in the same run.

Modules, one idea each: ``stream`` (the file format), ``transport`` (HTTP predict, Kafka feedback),
``pacing``, ``probes`` (near-duplicates, feedback-to-fix, rollout flip probes), ``runner`` (the
test-then-train loop), ``embeddings`` and ``baselines``, ``metrics``, ``report``, ``cli``.
"""
