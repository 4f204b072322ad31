"""The real-text setups (issue 20, item 6): Python's documentation topics as sentences and passages,
tokenizers trained on them, BERT / GPT-2 from small configs trained by the Hugging Face Trainer and
recorded by DiffinCallback, benchmarked against replayed removal. Tiny sizes, float64."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from diffin.bench import BenchConfig  # noqa: E402
from diffin.bench.builtin import text  # noqa: E402
from diffin.bench.builtin.text_setups import TEXT_SETUPS  # noqa: E402
from diffin.bench.text import run_text  # noqa: E402


def test_topic_sentences_cover_every_class_and_tokenize_as_bert_does():
    texts, labels = text.topic_sentences()
    assert len(texts) == len(labels) > 1000
    assert set(np.unique(labels)) == set(range(len(text.TOPIC_CLASSES)))
    s = text.load_topic_sentences(60, 12, 12, max_length=24, vocab_size=300)
    assert s.sizes() == {"train": 60, "val": 12, "test": 12}
    ids, mask = s.x_train["input_ids"], s.x_train["attention_mask"]
    assert ids.shape == mask.shape == (60, 24) and ids.dtype == torch.long
    assert (ids[:, 0] == s.tokenizer.token_to_id("[CLS]")).all()
    assert ((ids == 0) == (mask == 0)).all() and int(ids.max()) < s.vocab_size  # [PAD] = 0 exactly where masked
    unk = s.tokenizer.token_to_id("[UNK]")
    enc = torch.tensor(s.tokenizer.encode(s.texts[0][0]).ids)
    assert torch.equal(torch.where(ids[0] == unk, unk, enc), ids[0])  # the tokenizer's ids, rare ones [UNK]
    rows = torch.stack([torch.bincount(r, minlength=s.vocab_size) > 0 for r in ids]).sum(0)
    assert ((rows == 0) | (rows >= text.MIN_SEQUENCES))[torch.arange(s.vocab_size) != unk].all()
    again = text.load_topic_sentences(60, 12, 12, max_length=24, vocab_size=300)
    assert torch.equal(again.x_train["input_ids"], ids) and torch.equal(again.y_train, s.y_train)  # seeded


def test_passages_are_consecutive_tokens_of_the_documentation():
    p = text.load_passages(20, 4, 0, length=16, vocab_size=300)
    assert p.x_train["input_ids"].shape == (20, 16) and bool(p.x_train["attention_mask"].all())
    assert torch.equal(p.y_train, p.x_train["input_ids"])
    topics = text.documentation_topics()
    eos, unk = p.tokenizer.token_to_id(text.EOS), p.tokenizer.token_to_id(text.GPT_UNK)
    stream = torch.tensor([i for k in sorted(topics) for i in p.tokenizer.encode(topics[k]).ids + [eos]])
    chunks = stream[: len(stream) // 16 * 16].reshape(-1, 16)
    for row in torch.cat([p.x_train["input_ids"], p.x_val["input_ids"]]):  # a passage of the stream, rare ones unknown
        assert ((chunks == row) | (row == unk)).all(1).any()
    assert (p.x_train["input_ids"] == unk).any()  # 20 passages: most tokens are rare


def _tiny(name: str):
    s = TEXT_SETUPS[name]
    if name == "text-bert":
        return s.with_changes(
            load=lambda: text.load_topic_sentences(48, 16, 16, max_length=16, vocab_size=200),
            build=lambda d: text.bert_classifier(d.vocab_size, d.n_classes, 16, hidden=16, layers=1, intermediate=32),
            recipe=replace(s.recipe, epochs=2, batch_size=4, checkpoint_every=3), n_ground_truth=8)
    return s.with_changes(
        load=lambda: text.load_passages(32, 4, 0, length=12, vocab_size=257),
        build=lambda d: text.gpt2_lm(d.vocab_size, 12, hidden=16, layers=1),
        recipe=replace(s.recipe, epochs=1, batch_size=4, checkpoint_every=2), n_ground_truth=8)


@pytest.mark.parametrize("name", ["text-bert", "text-gpt"])
def test_text_setup_trains_with_the_trainer_and_scores_against_replayed_removal(tmp_path, name):
    setup = _tiny(name)
    cfg = BenchConfig(methods="diffin,tracin", lds_subsets=0)
    r = run_text(setup, cfg, tmp_path, log=lambda *a: None)
    tr = r["trainer"]
    assert tr["theta_recorded_vs_plain"] == 0.0  # recording does not change what the Trainer does
    # the recorded run replays the Trainer's (float64, dropout 0.1, SDPA), to rounding; Hugging Face's causal LM
    # loss casts the logits to float32 (loss_utils.ForCausalLMLoss), so the Trainer's GPT-2 gradients are rounded
    # to float32 and the float64 replay drifts by about float32's epsilon
    assert tr["replay_drift"] < (1e-12 if name == "text-bert" else 1e-6)
    rows = {row["method"]: row for row in r["results"]}
    assert rows["diffin"]["variant"] == "diffin-exact" and rows["diffin"]["x_trainer"] > 0
    if name == "text-bert":
        assert rows["diffin"]["pearson"] > 0.95  # short float64 run: the linearisation holds
    mg = r["linearisation_ceiling"]["metagradient"]
    assert mg["max_rel_diff_vs_diffin"] < 1e-6  # the sweep is the float64 metagradient through the run
    if name == "text-bert":
        det = r["detection"]
        assert det["n_flipped"] == round(0.1 * 48)
        assert {"diffin", "tracin", "loss", "cleanlab"} <= set(det["methods"])
        assert all(0.0 <= v["auc"] <= 1.0 for v in det["methods"].values())
    else:
        pt = r["per_token"]
        assert pt["n_tokens"] == 16 and {row["method"] for row in pt["results"]} == {"diffin", "tracin"}
        assert all(np.isfinite(row["pearson"]) for row in pt["results"])
