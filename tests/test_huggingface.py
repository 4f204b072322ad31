"""Hugging Face Trainer and PEFT/LoRA (issue 20): a default-config BERT (SDPA attention, dropout 0.1
everywhere, attention dropout included) trained by the Trainer with AdamW, linear warmup,
max_grad_norm=1 and gradient_accumulation_steps=2, recorded by DiffinCallback alone; LoRA runs whose
checkpoints hold the adapters only. Float64 where exactness is claimed."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import diffin
from diffin._data import DataSource
from diffin._errors import UnsupportedTrainingError
from diffin.groundtruth import replay_removal
from diffin.trajectory import ReplayDriftWarning

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
hf = pytest.importorskip("diffin.integrations.huggingface")

N, V = 32, 40


# The tiny BERT, its rows, collator and Trainer recipe are the benchmark's (benchmarks/hf_tiny.py), so the
# bench measures exactly what these tests check.
_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_tiny.py"
_spec = importlib.util.spec_from_file_location("hf_tiny", _BENCH)
_hf_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_hf_tiny)
_rows, _bert, _collate, _train = _hf_tiny._rows, _hf_tiny._bert, _hf_tiny._collate, _hf_tiny._train


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    torch.set_default_dtype(torch.float64)
    try:
        tmp = tmp_path_factory.mktemp("bert")
        ds = datasets.Dataset.from_list(_rows(N, 1))
        model = _bert()
        run = _train(tmp, model, ds)
    finally:
        torch.set_default_dtype(torch.float32)
    val = datasets.Dataset.from_list(_rows(8, 2))
    return run, model, ds, val


def test_the_callback_alone_records_what_the_trainer_did(bert_run):
    run_dir, model, ds, _ = bert_run
    run = diffin.load_run(run_dir, model)
    assert run.n_steps == 8 and run.optimizer.kind == "AdamW"
    assert [g["hyper"]["weight_decay"] for g in run.optimizer.groups] == [0.01, 0.0]  # the Trainer's groups
    assert any("LayerNorm" in n for n in run.optimizer.groups[1]["params"])
    np.testing.assert_allclose(run.group_lrs[:3, 0], [0.0, 2.5e-4, 5e-4])  # linear warmup over 2 steps
    assert run.clip_grad_norm == 1.0
    # each step: 2 micro-batches of 4 ids, the Trainer's shuffled order, every sample once per epoch
    ids = np.concatenate([run.batch(t) for t in range(4)])
    assert sorted(ids.tolist()) == list(range(N)) and ids.tolist() != list(range(N))
    assert all(len(run.forwards(t)) == 2 for t in range(run.n_steps))  # one RNG state per micro-batch
    # BERT's classification loss ignores num_items_in_batch: the Trainer sums the two micro-batch means
    np.testing.assert_array_equal(run.grad_scales, 2.0)
    assert all(m for m in run.train_modes.values())


def test_default_bert_replays_exactly(bert_run):
    """Attention dropout inside SDPA, hidden dropout, accumulation, warmup, clipping: replaying the Trainer's
    steps from each checkpoint lands on the next one to rounding. (The float64 metagradient reference is NaN
    here: AdamW's √v has no derivative at the embedding rows no batch touches; the LoRA test checks it.)"""
    run_dir, model, ds, val = bert_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReplayDriftWarning)
        got = diffin.score(run_dir, model, hf.sequence_classification_loss, train=ds, target=val,
                           method="diffin-exact", progress=False)
    assert got.diagnostics["replay_drift"] < 1e-12


def test_default_bert_scores_track_replayed_removal(bert_run):
    run_dir, model, ds, val = bert_run
    loss = hf.sequence_classification_loss
    truth = replay_removal(run_dir, model, loss, train=ds, target=val, remove=list(range(N)), progress=False)
    s = diffin.influence(run_dir, model, loss, train=ds, target=val, progress=False)
    assert np.corrcoef(s, truth)[0, 1] > 0.99  # measured 0.998 (float64)
    for method in ("tracin", "grad-dot", "if-cg"):
        assert np.isfinite(diffin.influence(run_dir, model, loss, train=ds, target=val, method=method,
                                            progress=False)).all()


@pytest.mark.parametrize("method", ["diffin", "tracin", "grad-dot"])
def test_self_influence_on_dict_inputs(bert_run, method):
    run_dir, model, ds, _ = bert_run
    s = diffin.influence(run_dir, model, hf.sequence_classification_loss, train=ds, target="self", method=method,
                         progress=False)
    assert s.shape == (N,) and np.isfinite(s).all()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["val", "self"])
def test_every_method_scores_bert_on_dict_inputs_or_refuses_by_name(bert_run, target):
    """BERT's forward branches on its masks in Python (`if mask.all():`), which fails under vmap over
    samples: every estimator still scores it (or refuses for a reason of its own, e.g. the SGD-only
    closed form on this AdamW run)."""
    run_dir, model, ds, val = bert_run
    for method in diffin.methods():
        try:
            s = diffin.influence(run_dir, model, hf.sequence_classification_loss, train=ds,
                                 target=val if target == "val" else "self", method=method, progress=False)
        except diffin.DiffinError as e:
            assert method in ("diffin-closed-form", "grad-cos"), (method, e)
            assert "SGD" in str(e) or "self-influence" in str(e)
            continue
        assert s.shape == (N,) and np.isfinite(s).all(), method


def test_closed_form_self_influence_without_vmap_over_samples(tmp_path):
    torch.set_default_dtype(torch.float64)
    try:
        ds = datasets.Dataset.from_list(_rows(16, 1))
        model = _bert()
        run = _train(tmp_path, model, ds, optim="sgd", learning_rate=0.05)
    finally:
        torch.set_default_dtype(torch.float32)
    s = diffin.influence(run, model, hf.sequence_classification_loss, train=ds, target="self",
                         method="diffin-closed-form", progress=False)
    assert np.isfinite(s).all()


def test_with_ids_takes_dict_items_and_datasource_pads_like_the_collator():
    rows = _rows(6, 3)
    w = diffin.with_ids(datasets.Dataset.from_list(rows))
    i, x, y = w[2]
    assert i == 2 and y == rows[2]["labels"] and "labels" not in x
    src = DataSource(datasets.Dataset.from_list(rows), torch.float64, torch.device("cpu"))
    x, y = src.get([0, 1, 2])
    want = _collate(rows[:3])
    assert set(x) == {"input_ids", "attention_mask"}  # the string column is left out
    for k in x:
        assert torch.equal(x[k], want[k])
    assert torch.equal(y, want["labels"])


@pytest.mark.parametrize("setting, match", [
    (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
    (dict(gradient_checkpointing=True), "gradient checkpointing"),
    (dict(torch_compile=True), "torch.compile"),
])
def test_unreplayable_settings_are_refused_when_training_starts(tmp_path, setting, match):
    ds = datasets.Dataset.from_list(_rows(8, 1))
    with pytest.raises(UnsupportedTrainingError, match=match):
        _train(tmp_path, _bert(torch.float32), ds, **setting)


def test_recorder_unwraps_acceleratores_optimizer(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = torch.nn.Linear(3, 2)
    opt = accelerate.optimizer.AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with diffin.Recorder(tmp_path / "r", model, opt, checkpoint_every=1) as rec:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step([0, 1, 2, 3])
    assert diffin.load_run(tmp_path / "r").optimizer.kind == "SGD"


def test_loss_helpers_mean_over_non_ignored_tokens():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100], [0, 3, 4, 1]])
    got = hf.token_classification_loss(logits, labels)
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(got[0], ce(logits[0, :2], labels[0, :2]))
    assert torch.allclose(got[1], ce(logits[1], labels[1]))
    causal = hf.causal_lm_loss(logits, labels)
    assert torch.allclose(causal[0], ce(logits[0, :1], labels[0, 1:2]))
    inputs, lab = hf.token_targets(labels.clamp_min(0), torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]]).bool())
    assert lab.tolist() == [[-100, 2, 0, -100], [-100, -100, -100, 1]]


@pytest.mark.parametrize("script, expect", [("huggingface_trainer.py", "most harmful"), ("lora.py", "scores (32, 3)")])
def test_examples_run(script, expect, tmp_path):
    import subprocess
    import sys

    pytest.importorskip("peft")
    path = Path(__file__).resolve().parents[1] / "examples" / script
    res = subprocess.run([sys.executable, str(path), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert expect in res.stdout


# ------------------------------------------------------------------ GPT-2 through the Trainer (causal LM)
def _f64_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **_):
    """Hugging Face's ``ForCausalLMLoss`` without its cast of the logits to float32: the Trainer's
    gradients of a float64 GPT-2 then carry float64 rounding only."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _gpt2_run(tmp_path, f64_loss: bool, max_grad_norm: float):
    """A tiny default-config GPT-2 (tied embeddings, Conv1D, SDPA, dropout 0.1 everywhere) trained by the
    Trainer (AdamW groups, warmup, accumulation 2) in float64 on 24 sequences of 12 tokens, recorded by
    DiffinCallback; returns the run, the trained model, train and held-out (inputs, labels)."""
    from diffin.bench.builtin.text_setups import TrainerRecipe, train_with_trainer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (32, 12), generator=g)
    x = {"input_ids": ids[:24], "attention_mask": torch.ones_like(ids[:24])}
    val = ({"input_ids": ids[24:], "attention_mask": torch.ones_like(ids[24:])}, ids[24:].clone())
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=60, n_positions=12, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).double()
    if f64_loss:
        model.loss_function = _f64_causal_lm_loss
    recipe = TrainerRecipe(epochs=2, batch_size=4, grad_accum=2, lr=1e-3, max_grad_norm=max_grad_norm,
                           checkpoint_every=2)
    run = tmp_path / "run"
    train_with_trainer(model, x, ids[:24].clone(), recipe, tmp_path / "out",
                       callbacks=[hf.DiffinCallback(run, checkpoint_every=recipe.checkpoint_every)])
    return run, model, (x, ids[:24].clone()), val


def _exact_scores(run_dir, model, train, val):
    """diffin-exact's scores of the GPT-2 run against ``val``, its warnings ignored (the tests check numbers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffin.score(run_dir, model, hf.causal_lm_loss, train=train, target=val, method="diffin-exact",
                            progress=False)


def _replayed_theta_T(run_dir, model, train):
    """θ_T of the recorded run replayed from θ_0 by diffin (float64 per-sample loss), and the Trainer's."""
    from diffin._functional import FlatModel
    from diffin.trajectory import Trajectory

    run = diffin.load_run(run_dir)
    fm = FlatModel(model, hf.causal_lm_loss, run.trainable)
    traj = Trajectory(run, fm, DataSource(train, torch.float64, torch.device("cpu")))
    st = traj.state(0)
    for t in range(run.n_steps):
        st, _ = traj.step(st, t)
    params = dict(model.named_parameters())
    return st.theta, torch.cat([params[n].detach().reshape(-1) for n in run.trainable])


def test_gpt2_trainer_replays_exactly_and_the_sweep_is_the_metagradient(tmp_path):
    """The Trainer normalises GPT-2's summed token loss by the tokens it counts in the accumulated batch: it
    counts every label of GPT2LMHeadModel (L per sequence) while the loss sums the L − 1 shifted ones, so
    its step gradient is (L − 1)/L of the mean per-sequence loss's. The callback records that weight
    (``grad_scale``); replayed from each checkpoint with the recorded Adam moments, a wrong weight left each
    step 1e-2 (relative) off the Trainer's, and the sweep 1e-8 off the metagradient through the run."""
    from diffin._functional import FlatModel
    from diffin._reference import metagradient

    run_dir, model, train, val = _gpt2_run(tmp_path, f64_loss=True, max_grad_norm=1.0)
    tol = 1e4 * torch.finfo(torch.float64).eps
    run = diffin.load_run(run_dir)
    assert run.n_steps == 6 and run.clip_grad_norm == 1.0 and len(set(run.grad_scales.tolist())) == 1
    replayed, trainer = _replayed_theta_T(run_dir, model, train)
    assert float((replayed - trainer).norm() / trainer.norm()) < tol
    got = _exact_scores(run_dir, model, train, val)
    assert got.diagnostics["replay_drift"] < tol
    fm = FlatModel(model.eval(), hf.causal_lm_loss, run.trainable)
    mg = metagradient(run, fm, DataSource(train, torch.float64, torch.device("cpu")),
                      lambda th: fm.batch_loss(th, *val)).numpy()
    assert np.abs(got.scores - mg).max() < tol * np.abs(mg).max()


def test_gpt2_trainer_with_its_float32_loss_replays_to_float32_rounding(tmp_path):
    """Hugging Face's causal-LM loss casts the logits to float32, so the float64 replay differs from the
    Trainer by float32 rounding only (without clipping every step's gradient scale counts)."""
    run_dir, model, train, val = _gpt2_run(tmp_path, f64_loss=False, max_grad_norm=0.0)
    tol = 1e2 * torch.finfo(torch.float32).eps
    replayed, trainer = _replayed_theta_T(run_dir, model, train)
    assert float((replayed - trainer).norm() / trainer.norm()) < tol
    got = _exact_scores(run_dir, model, train, val)
    assert got.diagnostics["replay_drift"] < tol


# ------------------------------------------------------------------ losses the callback cannot weigh
def _ce_outside(outputs, labels, num_items_in_batch=None):
    """A ``compute_loss_func``: the micro-batch's mean cross-entropy, ignoring ``num_items_in_batch``."""
    return torch.nn.functional.cross_entropy(outputs.logits, labels)


@pytest.mark.parametrize("accum", [1, 2])
def test_a_loss_computed_outside_the_model_is_refused_under_accumulation(tmp_path, accum):
    """With ``compute_loss_func`` the Trainer does not divide by the accumulation steps, so this mean loss
    makes each step's gradient twice the mean one at accumulation 2: the callback cannot see the loss and
    refuses; at accumulation 1 the mean is what diffin replays."""
    ds = datasets.Dataset.from_list(_rows(8, 1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=accum, num_train_epochs=1, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=_bert(torch.float32), args=args, train_dataset=ds, data_collator=_collate,
                                   compute_loss_func=_ce_outside,
                                   callbacks=[hf.DiffinCallback(tmp_path / "run", checkpoint_every=1)])
    if accum > 1:
        with pytest.raises(UnsupportedTrainingError, match="computed no loss"):
            trainer.train()
    else:
        trainer.train()
        assert diffin.load_run(tmp_path / "run").n_steps == 2


@pytest.mark.parametrize("padded", [True, False])
def test_a_token_mean_without_num_items_over_padded_samples_is_refused(tmp_path, padded):
    """A causal LM that takes no loss kwargs averages over its micro-batch's tokens: with padding, samples
    of more tokens weigh more than in diffin's per-sample mean, so the callback refuses; unpadded it records."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (8, 12), generator=g)
    lengths = [12, 7, 12, 9, 12, 12, 5, 12] if padded else [12] * 8
    rows = []
    for i, n in enumerate(lengths):
        mask = (torch.arange(12) < n).long()
        rows.append({"input_ids": ids[i].tolist(), "attention_mask": mask.tolist(),
                     "labels": torch.where(mask.bool(), ids[i], -100).tolist()})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=60, n_positions=12, n_embd=16,
                                                                 n_layer=1, n_head=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          num_train_epochs=1, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                   data_collator=transformers.default_data_collator,
                                   callbacks=[hf.DiffinCallback(tmp_path / "run", checkpoint_every=1)])
    trainer.model_accepts_loss_kwargs = False  # as for a model whose forward takes no num_items_in_batch
    if padded:
        with pytest.raises(UnsupportedTrainingError, match="number of tokens"):
            trainer.train()
    else:
        trainer.train()
        assert diffin.load_run(tmp_path / "run").n_steps == 2
