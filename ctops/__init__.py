"""ctops: what the dispatcher, agents, trainer and console share (wire models, config, auth, keys)."""

__version__ = "0.1.0"
