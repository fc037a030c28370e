"""The hair / eye colour classifier of evaluate.py: caption parsing, output shapes, and a fit on
tiny generated pictures whose top half is the hair colour and bottom half the eye colour."""
import math

import pytest
import torch

from features.tags import TagClassifier, caption_tags, classify, fit_tag_classifier

RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 220),
       "white": (240, 240, 240)}


def halves(hair: list[str], eyes: list[str], seed: int) -> torch.Tensor:
    """uint8 (N, 3, 16, 16): top half the hair colour, bottom half the eye colour, plus noise."""
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([RGB[c] for c in hair], dtype=torch.float)[:, :, None, None]
    bottom = torch.tensor([RGB[c] for c in eyes], dtype=torch.float)[:, :, None, None]
    x = torch.cat([top.expand(-1, -1, 8, 16), bottom.expand(-1, -1, 8, 16)], 2)
    return (x + torch.randint(-30, 31, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def draw(n: int, seed: int) -> tuple[list[str], list[str]]:
    g = torch.Generator().manual_seed(seed)
    names = ["red", "green", "blue"]
    return ([names[i] for i in torch.randint(3, (n,), generator=g)],
            [names[i] for i in torch.randint(3, (n,), generator=g)])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a busy 2-core machine one torch thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted():
    """Fit on 200 pictures: 150 captioned 'X hair, Y eyes' (some with extra parts), 50 with white
    hair captioned 'white hair' only (their bottom half is a random colour nobody names)."""
    hair, eyes = draw(150, seed=0)
    white, unnamed = ["white"] * 50, draw(50, seed=1)[1]
    captions = [f"{h} hair, {e} eyes" if i % 3 else f"smile, {e} eyes, {h} hair, looking at viewer"
                for i, (h, e) in enumerate(zip(hair, eyes))] + ["white hair"] * 50
    images = halves(hair + white, eyes + unnamed, seed=2)
    return fit_tag_classifier(images, captions, epochs=8, batch_size=32)


def test_caption_tags_reads_hair_and_eye_colours():
    assert caption_tags("blue hair, red eyes") == {"hair": "blue", "eyes": "red"}
    assert caption_tags("red eyes,blue hair") == {"hair": "blue", "eyes": "red"}
    assert caption_tags(" Gray  Hair , GREEN eyes ") == {"hair": "gray", "eyes": "green"}


def test_caption_tags_ignores_other_parts_and_leaves_missing_attributes_out():
    assert caption_tags("solo, smile, blue hair, open mouth, red eyes") == \
        {"hair": "blue", "eyes": "red"}
    assert caption_tags("green eyes") == {"eyes": "green"}
    assert caption_tags("pink hair, hair ribbon, very long hair") == {"hair": "pink"}
    assert caption_tags("") == {} and caption_tags("smile, eyes closed") == {}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_classifier_gives_one_logit_row_per_image_and_class(size, channels):
    clf = TagClassifier({"hair": list("abcde"), "eyes": list("wxyz")}, channels, width=8)
    out = clf(torch.rand(3, channels, size, size) * 2 - 1)
    assert {a: tuple(v.shape) for a, v in out.items()} == {"hair": (3, 5), "eyes": (3, 4)}


def test_fit_splits_off_the_validation_share(fitted):
    clf, info = fitted
    assert (info["n_train"], info["n_val"]) == (160, 40)
    assert clf.classes == {"hair": ["blue", "green", "red", "white"],
                           "eyes": ["blue", "green", "red"]}
    assert not clf.training


def test_fit_reaches_near_perfect_validation_accuracy_well_above_majority(fitted):
    _, info = fitted
    for a in ("hair", "eyes"):
        assert info["val_acc"][a] >= 0.95
        assert 1 / 4 <= info["majority_acc"][a] <= 0.6  # about balanced classes


def test_classify_names_the_colours_of_fresh_pictures(fitted):
    clf, _ = fitted
    hair, eyes = draw(60, seed=10)
    pred = classify(clf, halves(hair, eyes, seed=11), batch_size=16)
    assert sum(p == h for p, h in zip(pred["hair"], hair)) >= 57
    assert sum(p == e for p, e in zip(pred["eyes"], eyes)) >= 57


def test_pictures_without_an_eyes_tag_still_teach_the_hair_head(fitted):
    # 'white hair' only ever comes with captions that name no eye colour: if such pictures were
    # dropped instead of masked, the hair head could never learn white.
    clf, info = fitted
    _, eyes = draw(30, seed=20)
    pred = classify(clf, halves(["white"] * 30, eyes, seed=21))
    assert pred["hair"].count("white") >= 28
    assert all(math.isfinite(v) for v in info["val_acc"].values())
