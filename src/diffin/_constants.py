"""File names and format constants of everything diffin writes. One place, so readers and
writers never disagree."""

from __future__ import annotations

FORMAT_VERSION = 1
"""Version of the run-folder format written by :class:`diffin.Recorder`."""

MANIFEST = "manifest.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = "step_{step:09d}.safetensors"
LRS = "lrs.npy"
BATCH_IDS = "batch_ids.npy"
BATCH_OFFSETS = "batch_offsets.npy"
PARTIAL_SUFFIX = ".part"

# keys inside a checkpoint file
PARAM_PREFIX = "param."
BUFFER_PREFIX = "buffer."
MOMENTUM_PREFIX = "momentum."

# scoring outputs
SCORES_NPY = "scores.npy"
SCORES_JSON = "scores.json"
SCORE_COLUMN = "loss_change_if_removed"
SETUP_JSON = "diffin_setup.json"
"""Written by `diffin train` beside the recording: which built-in setup made the run."""
