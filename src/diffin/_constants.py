"""File names and format constants of everything diffin writes. One place, so readers and
writers never disagree."""

from __future__ import annotations

FORMAT_VERSION = 3
"""Version of the run-folder format written by :class:`diffin.Recorder`.

3: as 2, plus: the manifest's optimizer entry lists every param group (its parameters and
hyper-parameters); the learning-rate log ``GROUP_LRS_LOG`` holds every group's rate at every step
(T×G float64, step-major); checkpoints hold every per-parameter optimizer state tensor
(``OPTIM_PREFIX``) and step count (``OPTIM_STEP_PREFIX``); the manifest records ``clip_grad_norm``.
2: per-step logs are append-only raw little-endian files (``LRS_LOG``, ``BATCH_IDS_LOG``,
``BATCH_OFFSETS_LOG``); the manifest is rewritten atomically at every checkpoint and says how many
entries of each log are valid (with their sha256) and the run's ``status``.
1: logs written once at ``close()`` as ``.npy`` (``V1_*`` names); no manifest before ``close()``.
All three are read."""

MANIFEST = "manifest.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = "step_{step:09d}.safetensors"

# format 2: append-only logs (raw little-endian arrays, no header)
LRS_LOG = "lrs.f64"
"""Format 2: one learning rate per step."""
GROUP_LRS_LOG = "group_lrs.f64"
"""Format 3: every param group's learning rate at every step (T×G, step-major)."""
BATCH_IDS_LOG = "batch_ids.i64"
BATCH_OFFSETS_LOG = "batch_offsets.i64"
LRS_DTYPE = "<f8"
IDS_DTYPE = "<i8"

# run status in the manifest (format 2)
STATUS_RECORDING = "recording"
"""The recorder is running, or its process died (killed) without closing the run."""
STATUS_INTERRUPTED = "interrupted"
"""An exception inside ``with Recorder(...)`` closed the run at its last checkpoint."""
STATUS_COMPLETE = "complete"

# format 1 (read only)
V1_LRS = "lrs.npy"
V1_BATCH_IDS = "batch_ids.npy"
V1_BATCH_OFFSETS = "batch_offsets.npy"
V1_PARTIAL_SUFFIX = ".part"

# keys inside a checkpoint file
PARAM_PREFIX = "param."
BUFFER_PREFIX = "buffer."
MOMENTUM_PREFIX = "momentum."
"""Formats 1 and 2: SGD momentum buffers (read as the optimizer state ``momentum_buffer``)."""
OPTIM_PREFIX = "optim."
"""Format 3: ``optim.<state name>.<parameter name>``, e.g. ``optim.exp_avg.0.weight``."""
OPTIM_STEP_PREFIX = "optim_step."
"""Format 3: ``optim_step.<parameter name>``: the optimizer's step count of that parameter (0-d)."""

# scoring outputs
SCORES_NPY = "scores.npy"
SCORES_JSON = "scores.json"
SCORE_COLUMN = "loss_change_if_removed"
SETUP_JSON = "diffin_setup.json"
"""Written by `diffin train` beside the recording: which built-in setup made the run."""

# training-mode layers (BatchNorm, dropout): per-step RNG states
RNG_LOG = "rng_states.u8"
"""Append-only: at every step whose training forward had dropout in training mode, the RNG state at
the start of that forward: ``torch.get_rng_state()`` (CPU generator) followed, when the model is on
CUDA, by ``torch.cuda.get_rng_state(device)``; fixed bytes per step (the manifest's ``rng_states``
entry gives ``cpu_bytes`` and ``cuda_bytes``). The manifest's ``train_modes`` maps every BatchNorm /
dropout module to the mode it trained in; runs without these entries were recorded before them."""
RNG_DTYPE = "|u1"
GRAD_SCALE_LOG = "grad_scales.f64"
"""Append-only, optional: each step's gradient as a multiple of the mean-over-the-batch gradient
(``Recorder.step(..., grad_scale=)``); absent means 1 at every step."""
FORWARDS_LOG = "forwards.i64"
"""Append-only, beside ``RNG_LOG``: one row (step, rows, sequence length) per training forward with
dropout, flat int64; ``RNG_LOG`` holds one state per such forward (several per step under gradient
accumulation, one per micro-batch). Runs without it have one forward per step."""
