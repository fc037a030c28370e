"""tags.py: a small hair / eye colour classifier, trained on the captioned training images, that
checks whether a text-conditioned model draws what its prompt says (--eval-prompts).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import data
from ui import task_bar

TAG_ATTRIBUTES = ("hair", "eyes")


def caption_tags(caption: str) -> dict[str, str]:
    """'blue hair, red eyes' -> {'hair': 'blue', 'eyes': 'red'}; a part that is not '<colour> hair'
    or '<colour> eyes' is ignored; missing attributes are absent from the dict."""
    tags = {}
    for part in caption.lower().split(","):
        words = part.split()
        if len(words) == 2 and words[1] in TAG_ATTRIBUTES:
            tags[words[1]] = words[0]
    return tags


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (stride 2 halves H and W), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class TagClassifier(nn.Module):
    """Small CNN: images (B, C, H, W) float in [-1, 1] -> {attribute: logits (B, n_classes)} for
    each attribute in `classes` (e.g. {'hair': ['aqua', 'black', ...], 'eyes': [...]})."""

    def __init__(self, classes: dict[str, list[str]], channels: int = 3, width: int = 32):
        super().__init__()
        self.config = {"classes": {a: list(names) for a, names in classes.items()},
                       "channels": channels, "width": width}  # TagClassifier(**config) rebuilds it
        self.classes, w = self.config["classes"], width
        self.features = nn.Sequential(  # H -> H/8; the pooled features are (B, 4w)
            conv_bn_relu(channels, w), conv_bn_relu(w, 2 * w, 2), conv_bn_relu(2 * w, 2 * w),
            conv_bn_relu(2 * w, 4 * w, 2), conv_bn_relu(4 * w, 4 * w),
            conv_bn_relu(4 * w, 4 * w, 2), conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(n)) for a, n in self.classes.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, C, H, W) float in [-1, 1] -> {attribute: logits (B, n_classes)}."""
        assert x.ndim == 4 and x.shape[1] == self.config["channels"] and min(x.shape[2:]) >= 16, \
            f"want (B, {self.config['channels']}, H, W) with H, W >= 16, got {tuple(x.shape)}"
        h = self.features(x)
        return {a: head(h) for a, head in self.heads.items()}


@torch.no_grad()
def classify(clf: TagClassifier, images: Tensor, batch_size: int = 256) -> dict[str, list[str]]:
    """uint8 (N, C, H, W) -> {attribute: predicted colour name per image}."""
    assert images.dtype == torch.uint8 and images.ndim == 4, \
        f"want uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
    device, was_training = next(clf.parameters()).device, clf.training
    clf.eval()  # BatchNorm with running statistics: a prediction must not depend on the batch
    picks = {a: [] for a in clf.classes}
    for i in range(0, len(images), batch_size):
        for a, logits in clf(data.to_model(images[i:i + batch_size].to(device))).items():
            picks[a] += logits.argmax(1).tolist()
    clf.train(was_training)
    return {a: [clf.classes[a][j] for j in p] for a, p in picks.items()}


def fit_tag_classifier(images: Tensor, captions: list[str], *, epochs: int = 15, seed: int = 0,
                       val_fraction: float = 0.2, batch_size: int = 128, device="cpu",
                       progress=None) -> tuple[TagClassifier, dict]:
    """Train a TagClassifier on uint8 (N, C, H, W) images and their captions (one each).

    Classes are the sorted colours seen per attribute. A seeded val_fraction is held out; training
    is Adam (one-cycle learning rate) with random horizontal flips, and an image contributes
    only to the heads of the attributes its caption names. Returns the classifier in eval mode and
    {'val_acc': {attr: float}, 'n_train', 'n_val', 'majority_acc': {attr: share of the most
    frequent class in val}} (accuracies over val images that name the attribute; nan if none).
    progress: a rich Progress to add a task to, a description for a bar of its own, or None.
    """
    assert images.dtype == torch.uint8 and images.ndim == 4, \
        f"want uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
    assert len(images) == len(captions), f"{len(images)} images but {len(captions)} captions"
    tags = [caption_tags(c) for c in captions]
    classes = {a: sorted({t[a] for t in tags if a in t}) for a in TAG_ATTRIBUTES}
    classes = {a: names for a, names in classes.items() if names}
    assert classes, "no caption names a '<colour> hair' or '<colour> eyes'"
    labels = {a: torch.tensor([names.index(t[a]) if a in t else -1 for t in tags])  # -1: absent
              for a, names in classes.items()}

    # Seeded split and initialisation; the global RNG is left as it was.
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    n_val = min(round(len(images) * val_fraction), len(images) - 1)
    val, train = order[:n_val], order[n_val:]
    train = train[torch.tensor([bool(tags[i]) for i in train.tolist()], dtype=torch.bool)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = TagClassifier(classes, images.shape[1]).to(device)
    steps = epochs * -(-len(train) // batch_size)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=max(steps, 1))

    with task_bar(progress, steps, "tag classifier") as advance:
        clf.train()
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train), generator=g)].split(batch_size):
                x = data.to_model(images[idx]).to(device)
                flip = (torch.rand(len(idx), generator=g) < 0.5).to(device)[:, None, None, None]
                x = torch.where(flip, x.flip(3), x)  # random horizontal flip
                loss = 0.0
                for a, logits in clf(x).items():
                    y = labels[a][idx].to(device)
                    if (y >= 0).any():  # mask: only images whose caption names this attribute
                        loss = loss + F.cross_entropy(logits[y >= 0], y[y >= 0])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance()
    clf.eval()

    return clf, {**validation_accuracy(clf, images[val], {a: y[val] for a, y in labels.items()}),
                 "n_train": len(train), "n_val": n_val}


def validation_accuracy(clf: TagClassifier, images: Tensor, labels: dict[str, Tensor]) -> dict:
    """Accuracy and the majority-class baseline per attribute over the images whose caption names
    it (label >= 0) -> {'val_acc': {attr: float}, 'majority_acc': {attr: float}} (nan if none)."""
    pred = classify(clf, images)
    val_acc, majority_acc = {}, {}
    for a, names in clf.classes.items():
        y, p = labels[a], torch.tensor([names.index(c) for c in pred[a]], dtype=torch.long)
        has = y >= 0
        val_acc[a] = (p[has] == y[has]).float().mean().item() if has.any() else float("nan")
        majority_acc[a] = (torch.bincount(y[has]).max().item() / has.sum().item()
                           if has.any() else float("nan"))
    return {"val_acc": val_acc, "majority_acc": majority_acc}
