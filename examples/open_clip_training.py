"""Train an open_clip CLIP model with open_clip's own ClipLoss, record it, and find mismatched pairs.

    pip install 'diffin[clip]'                         # open_clip_torch and torchvision, torch kept
    python examples/open_clip_training.py              # about half a minute on a laptop CPU
    python examples/open_clip_training.py --pairs 64 --epochs 1    # the test suite's tiny run

The model is ``open_clip.CLIP`` built from a small config (no weights are downloaded): a one-layer
ViT on 8×8 images and a one-layer text transformer. The data are synthetic image–caption pairs:
each image shows one of 4 class patterns plus noise, its caption names the class among random
filler tokens; 10% of the captions are swapped for another class's (mismatched pairs). Training is
the usual open_clip step, ``ClipLoss()(*model(images, tokens))``, with diffin's recorder beside it.
Scoring uses ``clip_batch_loss(loss)``: the same ClipLoss with one weight per pair, so removing a
pair also takes it out of its batch mates' softmax denominators. The pairs whose removal would
lower the validation loss most are listed, with how many of them are mismatched.
(The file is not named ``open_clip.py``: a script of that name would shadow the package.)
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

import diffin
from diffin.integrations.open_clip import clip_batch_loss, import_open_clip

CTX, VOCAB, CLASSES = 8, 32, 4


def make_pairs(n: int, rng: np.random.Generator, patterns: torch.Tensor,
               mismatch: float = 0.0) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, np.ndarray]:
    """n pairs ((images (n, 3, 8, 8), tokens (n, CTX)), dummy labels (n,), ids of the mismatched pairs)."""
    cls = rng.integers(0, CLASSES, n)
    images = patterns[cls] + 0.5 * torch.tensor(rng.standard_normal((n, 3, 8, 8)), dtype=torch.float32)
    said = cls.copy()
    bad = rng.choice(n, size=int(mismatch * n), replace=False)
    said[bad] = (said[bad] + rng.integers(1, CLASSES, len(bad))) % CLASSES
    tokens = torch.tensor(rng.integers(CLASSES + 1, VOCAB - 1, (n, CTX)))
    tokens[:, 0] = torch.tensor(1 + said)  # the word for the class
    tokens[:, -1] = VOCAB - 1              # the end token: open_clip pools the text at the highest id
    return (images, tokens), torch.zeros(n), bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    open_clip = import_open_clip()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    patterns = torch.randn(CLASSES, 3, 8, 8)
    (images, tokens), labels, mismatched = make_pairs(args.pairs, rng, patterns, mismatch=0.1)
    val = make_pairs(128, rng, patterns)[:2]

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=4, image_size=8),
            text_cfg=open_clip.CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=64, heads=2, layers=1),
        )

    model = build()
    loss = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    run_dir = tempfile.mkdtemp(prefix="diffin-open-clip-")
    batch = 32
    with diffin.Recorder(run_dir, model, opt, checkpoint_every=10) as rec:
        for _ in range(args.epochs):
            for ids in rng.permutation(args.pairs)[: args.pairs // batch * batch].reshape(-1, batch):
                value = loss(*model(images[ids], tokens[ids]))  # open_clip's own training loss
                opt.zero_grad()
                value.backward()
                opt.step()
                rec.step(ids)

    scores = diffin.influence(run_dir, build(), clip_batch_loss(loss), train=((images, tokens), labels),
                              target=val, progress=False)
    k = max(1, len(mismatched))
    worst = np.argsort(scores)[:k]
    print(f"recorded {diffin.load_run(run_dir).n_steps} steps of open_clip.CLIP trained with ClipLoss; "
          f"most harmful pairs: {worst[:10].tolist()}")
    print(f"{np.isin(worst, mismatched).mean():.0%} of the {k} most harmful pairs are mismatched "
          f"({len(mismatched) / args.pairs:.0%} at random)")


if __name__ == "__main__":
    main()
