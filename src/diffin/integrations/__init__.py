"""Adapters for training frameworks. Each module imports its framework lazily and is the only
place in diffin that does; ``import diffin`` imports none of them."""
