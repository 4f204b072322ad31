"""Real English text for the language benchmarks: Python's own documentation topics.

Every Python ships ``pydoc_data.topics`` (the text ``help("if")`` shows: 79 topics, about 465,000
characters of the language reference). From it, with fixed seeds and no downloads:

* :func:`topic_sentences`: its sentences, each labelled by which of six groups of topics it comes
  from (:data:`TOPIC_CLASSES`: data model, statements, expressions, built-in types, strings and
  numbers, execution and debugging), for a sequence-classification task;
* :func:`bert_tokenizer` / :func:`byte_bpe_tokenizer`: a BERT-style and a GPT-2-style (byte-level BPE)
  tokenizer trained on that text with the ``tokenizers`` package;
* :func:`load_topic_sentences`: a :class:`~diffin.bench.builtin.data.DataSplit` of token ids (inputs are
  dicts ``{"input_ids", "attention_mask"}``, (N, L) int64) and topic-group labels;
* :func:`load_passages`: the documentation's token stream cut into passages of L tokens for a causal
  language model (labels = the input ids: every token after the first is predicted);
* :func:`bert_classifier` / :func:`gpt2_lm`: ``BertForSequenceClassification`` and ``GPT2LMHeadModel``
  from small configs (no weights), in the library's default configuration (SDPA attention, dropout
  0.1) unless asked otherwise.

``transformers`` and ``tokenizers`` (the ``hf`` extra) are imported inside the functions that need
them; this module is part of the benchmark layer, which the library never imports.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..._errors import ConfigError
from ..._optional import require
from .data import DataSplit

TOPIC_CLASSES: dict[str, tuple[str, ...]] = {
    "data model": ("specialnames", "customization", "attribute-access", "numeric-types", "sequence-types",
                   "callable-types", "context-managers", "specialattrs", "objects", "types"),
    "statements": ("compound", "if", "while", "for", "try", "with", "function", "class", "async", "assignment",
                   "augassign", "import", "raise", "return", "del", "pass", "break", "continue", "global",
                   "nonlocal", "assert", "else"),
    "expressions": ("atom-identifiers", "atom-literals", "attribute-references", "subscriptions", "slicings",
                    "calls", "await", "power", "unary", "binary", "shifting", "bitwise", "comparisons", "booleans",
                    "lambda", "exprlists", "operator-summary", "in", "conversions", "yield"),
    "built-in types": ("typesseq", "typesseq-mutable", "typesmapping", "typesfunctions", "typesmethods",
                       "typesmodules", "truth", "dict", "lists", "bltin-code-objects", "bltin-ellipsis-object",
                       "bltin-null-object", "bltin-type-objects"),
    "strings and numbers": ("strings", "string-methods", "formatstrings", "integers", "floating", "imaginary",
                            "numbers", "identifiers", "id-classes"),
    "execution and debugging": ("debugger", "execmodel", "naming", "exceptions", "dynamic-features"),
}
"""The six classes of the sentence task: groups of ``pydoc_data.topics`` keys (every topic of Python
3.10–3.13 is in one group; topics a Python lacks are skipped, new ones are left out)."""

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
EOS = "<|endoftext|>"
GPT_UNK = "<|unk|>"
MIN_SEQUENCES = 4
"""A token must occur in at least this many training sequences; rarer ones become the unknown token.
Under Adam, the embedding row of a token that only one sample carries moves by about the learning rate
per step whatever that sample's weight (Adam's step is scale-free), so its removal is not a small
perturbation and no first-order method can follow it; rare tokens make a few removals chaotic."""
_RULE = re.compile(r"\s*[*=\-~^]{3,}\s*")  # reST heading underlines
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def documentation_topics() -> dict[str, str]:
    """``pydoc_data.topics.topics``: topic name → its text (the language reference, as ``help()`` shows it)."""
    from pydoc_data.topics import topics

    return dict(topics)


def split_sentences(text: str, min_words: int = 5) -> list[str]:
    """The sentences of one topic's text: heading underlines dropped, each paragraph's whitespace
    collapsed, split after ``.``/``!``/``?`` before a capital, a quote or a parenthesis; kept when they
    have at least ``min_words`` words and letters make at least 60% of their characters (no tables of
    code or operators)."""
    lines = [line for line in text.splitlines() if not _RULE.fullmatch(line)]
    out = []
    for para in re.split(r"\n\s*\n", "\n".join(lines)):
        for s in _SENTENCE_END.split(" ".join(para.split())):
            if len(s.split()) >= min_words and sum(c.isalpha() for c in s) >= 0.6 * len(s):
                out.append(s)
    return out


def topic_sentences() -> tuple[list[str], np.ndarray]:
    """Every sentence of the topics of :data:`TOPIC_CLASSES` with its class (index into the dict's
    order): ``(sentences, labels (S,) int64)``, in topic order."""
    topics = documentation_topics()
    texts: list[str] = []
    labels: list[int] = []
    for c, names in enumerate(TOPIC_CLASSES.values()):
        for name in names:
            for s in split_sentences(topics.get(name, "")):
                texts.append(s)
                labels.append(c)
    return texts, np.asarray(labels, dtype=np.int64)


def bert_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> Any:
    """A BERT-style tokenizer (``tokenizers.Tokenizer``) trained on ``texts``: BERT's normalizer
    (lower case, accents stripped) and pre-tokenizer, subwords of a BPE vocabulary of ``vocab_size``
    tokens with :data:`BERT_SPECIALS` (``[PAD]`` = 0), ``[CLS] … [SEP]`` around each sequence,
    truncated and padded to ``max_length``. BPE rather than WordPiece subwords because the
    ``tokenizers`` WordPiece trainer is not deterministic (its continuing-subword tokens are numbered in
    hash-map order, huggingface/tokenizers#1794); its BPE trainer is."""
    tk = require("tokenizers", "tokenizers", "the text setups", "hf")
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    tok = tk.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS),
                                                             show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                               ("[SEP]", sep)])
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=max_length)
    return tok


def byte_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A GPT-2-style tokenizer trained on ``texts``: byte-level BPE of ``vocab_size`` tokens (the 256
    bytes included) with the end-of-text token :data:`EOS` and an unknown token :data:`GPT_UNK` (for
    :func:`rare_to_unknown`)."""
    tk = require("tokenizers", "tokenizers", "the text setups", "hf")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, GPT_UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def rare_to_unknown(ids: Sequence[Tensor], unknown: int, min_sequences: int = MIN_SEQUENCES) -> None:
    """Replace, in place, in every (N, L) tensor of ``ids`` (the training split first), the tokens that
    occur in fewer than ``min_sequences`` rows of the training split by ``unknown``
    (:data:`MIN_SEQUENCES`)."""
    train = ids[0]
    rows = torch.zeros(max(int(t.max()) for t in ids if t.numel()) + 1, dtype=torch.long)
    for r in train:
        rows[r.unique()] += 1
    rare = rows < min_sequences
    for t in ids:
        t[rare[t]] = unknown


def load_topic_sentences(n_train: int, n_val: int, n_test: int, max_length: int = 48, vocab_size: int = 1024,
                         seed: int = 0, dtype: torch.dtype = torch.float64) -> DataSplit:
    """The sentence-classification split: which group of documentation topics a sentence comes from.

    Up to ``(n_train + n_val + n_test) / 6`` sentences per class (rounded up) are drawn with ``seed``
    (the classes are about balanced), shuffled and split; the tokenizer (:func:`bert_tokenizer`) is
    trained on the training sentences only, and tokens in fewer than :data:`MIN_SEQUENCES` training
    sentences become ``[UNK]`` (:func:`rare_to_unknown`). Inputs are
    ``{"input_ids", "attention_mask"}`` (N, ``max_length``) int64; labels (N,) int64 in 0…5.
    ``dtype`` is unused (token ids are integers) and kept for the setups' signature.
    """
    del dtype
    texts, labels = topic_sentences()
    total = n_train + n_val + n_test
    n_classes = len(TOPIC_CLASSES)
    if min(n_val, n_test) < 0 or n_train < 1:
        raise ConfigError("split sizes must be >= 0 and n_train >= 1")
    rng = np.random.default_rng(seed)
    per = -(-total // n_classes)
    picked = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(n_classes)])
    if len(picked) < total:
        raise ConfigError(f"the documentation topics give {len(picked)} sentences at most {per} per class; "
                          f"cannot split {n_train}+{n_val}+{n_test}={total}")
    picked = rng.permutation(picked)[:total]
    parts = np.split(picked, [n_train, n_train + n_val])
    tok = bert_tokenizer([texts[i] for i in parts[0]], vocab_size, max_length)

    def encode(ids: np.ndarray) -> dict[str, Tensor]:
        enc = tok.encode_batch([texts[i] for i in ids])
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long).reshape(len(ids), max_length),
                "attention_mask": torch.tensor([e.attention_mask for e in enc],
                                               dtype=torch.long).reshape(len(ids), max_length)}

    xs = [encode(p) for p in parts]
    rare_to_unknown([x["input_ids"] for x in xs], tok.token_to_id("[UNK]"))
    ys = [torch.as_tensor(labels[p]) for p in parts]
    split = DataSplit("doc-topic-sentences", xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], n_classes, (max_length,))
    split.texts = [[texts[i] for i in p] for p in parts]  # type: ignore[attr-defined]
    split.vocab_size = tok.get_vocab_size()  # type: ignore[attr-defined]
    split.tokenizer = tok  # type: ignore[attr-defined]
    return split


def load_passages(n_train: int, n_val: int, n_test: int = 0, length: int = 32, vocab_size: int = 1024,
                  seed: int = 0, dtype: torch.dtype = torch.float64) -> DataSplit:
    """Passages of the documentation for a causal language model.

    Every topic's text, followed by :data:`EOS`, in sorted topic order, makes one token stream
    (byte-level BPE, :func:`byte_bpe_tokenizer`, trained on the whole text: a vocabulary, no labels);
    it is cut into consecutive passages of ``length`` tokens, of which ``n_train + n_val + n_test``
    are drawn with ``seed`` and split; tokens in fewer than :data:`MIN_SEQUENCES` training passages become
    :data:`GPT_UNK` (:func:`rare_to_unknown`). Inputs ``{"input_ids", "attention_mask"}`` (N, ``length``)
    int64 (no padding: the mask is ones); labels = the input ids (the model predicts tokens 2…L from
    those before them; ``-100`` marks tokens a target leaves out). ``n_classes`` is the vocabulary
    size. ``dtype`` is unused (token ids are integers).
    """
    del dtype
    topics = documentation_topics()
    texts = [topics[k] for k in sorted(topics)]
    tok = byte_bpe_tokenizer(texts, vocab_size)
    eos = tok.token_to_id(EOS)
    stream = np.concatenate([np.asarray(e.ids + [eos], dtype=np.int64) for e in tok.encode_batch(texts)])
    n_chunks = len(stream) // length
    total = n_train + n_val + n_test
    if total > n_chunks or n_train < 1 or min(n_val, n_test) < 0:
        raise ConfigError(f"the documentation gives {n_chunks} passages of {length} tokens; cannot split "
                          f"{n_train}+{n_val}+{n_test}={total}")
    chunks = torch.from_numpy(stream[: n_chunks * length].reshape(n_chunks, length))
    picked = torch.from_numpy(np.random.default_rng(seed).permutation(n_chunks)[:total])
    parts = [p.clone() for p in torch.split(chunks[picked], [n_train, n_val, n_test])]
    rare_to_unknown(parts, tok.token_to_id(GPT_UNK))
    xs = [{"input_ids": p, "attention_mask": torch.ones_like(p)} for p in parts]
    split = DataSplit("doc-passages", xs[0], parts[0].clone(), xs[1], parts[1].clone(), xs[2], parts[2].clone(),
                      tok.get_vocab_size(), (length,))
    split.vocab_size = tok.get_vocab_size()  # type: ignore[attr-defined]
    split.tokenizer = tok  # type: ignore[attr-defined]
    return split


def bert_classifier(vocab_size: int, n_classes: int, max_length: int, hidden: int = 64, layers: int = 2,
                    heads: int = 2, intermediate: int = 128, **config: Any) -> nn.Module:
    """``BertForSequenceClassification`` from a small ``BertConfig`` (random initialisation, no
    weights); ``config`` overrides any other field (e.g. ``attention_probs_dropout_prob=0.0``).
    Defaults are the library's: SDPA attention, dropout 0.1, GELU."""
    tf = require("transformers", "transformers", "the text setups", "hf")
    cfg = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_length, num_labels=n_classes, pad_token_id=0, **config)
    return tf.BertForSequenceClassification(cfg)


def gpt2_lm(vocab_size: int, length: int, hidden: int = 64, layers: int = 2, heads: int = 2,
            **config: Any) -> nn.Module:
    """``GPT2LMHeadModel`` from a small ``GPT2Config`` (random initialisation, no weights); ``config``
    overrides any other field. Defaults are the library's: SDPA attention, dropout 0.1 (residual,
    embedding and attention), ``gelu_new``, tied input/output embeddings."""
    tf = require("transformers", "transformers", "the text setups", "hf")
    cfg = tf.GPT2Config(vocab_size=vocab_size, n_positions=length, n_embd=hidden, n_layer=layers, n_head=heads,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, **config)
    return tf.GPT2LMHeadModel(cfg)

