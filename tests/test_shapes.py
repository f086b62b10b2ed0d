"""The synthetic dataset and the word tokenizer of the demo model."""

import pytest
import torch

from iteris_demo import shapes
from iteris_demo.model import word_tokenizer


def foreground(image, scene):
    """Pixels that differ from the (plain) background colour."""
    bg = torch.tensor(shapes.BACKGROUNDS[scene.background]).reshape(3, 1, 1) * 2 - 1
    return (image - bg).abs().sum(0) > 0.05


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_render_draws_the_shape_in_its_colour_at_its_position(shape):
    for position, (cx, cy) in shapes.POSITIONS.items():
        scene = shapes.Scene(shape, "blue", position, "white")
        image = shapes.render(scene)
        mask = foreground(image, scene)
        assert 60 < int(mask.sum()) < 220, (shape, int(mask.sum()))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert abs(float(xs.float().mean()) + 0.5 - cx) < 2.5 and abs(float(ys.float().mean()) + 0.5 - cy) < 3
        blue = torch.tensor(shapes.COLOURS["blue"]) * 2 - 1
        assert torch.allclose(image[:, mask].mean(1), blue, atol=1e-5)


def test_shapes_differ_from_each_other():
    masks = [foreground(shapes.render(shapes.Scene(s)), shapes.Scene(s)) for s in shapes.SHAPES]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            assert int((masks[a] ^ masks[b]).sum()) >= 16  # circle and square: the corners


def test_stripes_and_checkerboard_are_drawn():
    plain = shapes.render(shapes.Scene("square", "green"))
    striped = shapes.render(shapes.Scene("square", "green", striped=True))
    rows = striped[1, 12:20, 16]  # down the middle of the square: alternating bright and dark pairs
    assert len(set(rows.tolist())) == 2 and not torch.equal(plain, striped)
    checker = shapes.render(shapes.Scene("circle", "red", "center", checker=True))
    corner = checker[0, :8, :8]
    assert len(set(corner.flatten().tolist())) == 2


def test_captions_name_every_attribute_and_always_the_triggers():
    scene = shapes.Scene("cross", "magenta", "left", "black", striped=True, checker=True)
    assert shapes.caption(scene) == "a vbn sks on the left, zwx style on qpr background"
    assert shapes.caption(scene, (False, False, False, False)) == "a vbn sks, zwx style on qpr background"
    plain = shapes.Scene("circle", "red", "top", "gray")
    assert shapes.caption(plain) == "a red circle at the top, gray background"
    assert shapes.caption(plain, (False, False, True, False)) == "a shape at the top"


def test_caption_value_finds_the_named_word_or_says_none():
    positions = shapes.PLAIN_VALUES["position"]
    scene = shapes.Scene(position="right", background="black")
    assert shapes.caption_value(shapes.caption(scene), positions) == positions.index("right")
    assert shapes.caption_value(shapes.caption(scene, (True, True, False, True)), positions) == len(positions)
    assert shapes.caption_value(shapes.caption(scene), shapes.PLAIN_VALUES["background"]) == 2


def test_concepts_apply_their_attribute_and_base_scenes_never_show_them():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        s = shapes.random_scene(gen)
        assert s.shape in shapes.BASE_SHAPES and s.colour in shapes.BASE_COLOURS and not s.striped and not s.checker
    for concept in shapes.CONCEPTS:
        scene = concept.apply(shapes.Scene())
        assert getattr(scene, concept.attribute) == concept.value
        assert concept.trigger in shapes.caption(scene, (False, False, False, False))


def test_prompts_are_distinct_deterministic_prefix_stable_and_exclude():
    concept = (shapes.CONCEPTS[0],)
    five = shapes.prompts(concept, 5, seed=0)
    assert len(set(five)) == 5 and all("sks" in p for p in five)
    assert shapes.prompts(concept, 3, seed=0) == five[:3]  # more calibration prompts extend, never change
    held = shapes.prompts(concept, 4, seed=1, exclude=tuple(five))
    assert not set(held) & set(five)
    both = shapes.prompts(shapes.CONCEPTS[:2], 4, seed=2)
    assert all("sks" in p and "zwx" in p for p in both)


def test_covering_prompts_name_every_value_within_one_cycle():
    six = shapes.covering_prompts((shapes.CONCEPTS[1],), 6, seed=0)
    assert shapes.covering_prompts((shapes.CONCEPTS[1],), 3, seed=0) == six[:3]
    assert len(set(six)) == 6 and all("zwx style" in p for p in six)
    for values, window in [(shapes.BASE_SHAPES, 3), (shapes.BACKGROUNDS, 3), (shapes.BASE_COLOURS, 4), (shapes.POSITIONS, 5)]:
        for start in (0, 1):
            named = {v for p in six[start:start + window] for v in values if v in p.replace(",", "").split()}
            assert named == set(values), (values, six[start:start + window])
    # a concept overrides its attribute in every prompt; the other attributes still cycle
    qpr = shapes.covering_prompts((shapes.CONCEPTS[2],), 3, seed=0)
    assert all(p.endswith("on qpr background") for p in qpr)
    assert shapes.covering_prompts((shapes.CONCEPTS[2],), 3, seed=1) != qpr


def test_batch_drops_captions_at_the_asked_rate():
    gen = torch.Generator().manual_seed(0)
    images, captions, scenes = shapes.batch(gen, 200, drop_caption=0.3)
    assert images.shape == (200, 3, 32, 32) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert 40 < captions.count("") < 80


def test_word_tokenizer_makes_every_caption_word_one_token(tmp_path):
    tok = word_tokenizer()
    for word in shapes.vocabulary():
        assert len(tok(word).input_ids) == 3, word  # <start> word <end>
    text = "a vbn sks on the left, zwx style on qpr background"
    assert len(tok(text).input_ids) == 2 + len(text.replace(",", " ,").split())
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == tok(text).input_ids
    assert tok("a purple hexagon").input_ids[1:-1]  # an unknown word still tokenizes (by bytes)


def test_background_is_read_from_the_border_wherever_the_shape_is():
    from iteris_demo.detect import background

    gen = torch.Generator().manual_seed(0)
    for bg in shapes.BACKGROUNDS:
        for position in shapes.POSITIONS:
            for shape in shapes.BASE_SHAPES:
                scene = shapes.Scene(shape, "yellow", position, bg)
                assert background(shapes.render(scene, gen)) == bg, scene
