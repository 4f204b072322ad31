"""Adapters for training frameworks. Each module imports its framework lazily and only there;
``import diffin`` imports none of them."""
