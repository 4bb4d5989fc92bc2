"""Facts read back from captions, the quality metrics, and the teacher's targets (no models)."""

import random

from veclip.world import facts, teacher
from veclip.world.alt_text import alt_text
from veclip.world.scene import describe


def test_the_reference_description_states_exactly_the_scene_facts():
    for index in range(300):
        scene, _ = teacher.scene(0, index)
        assert facts.parse(describe(scene)) == facts.scene_facts(scene), describe(scene)


def test_fact_accuracy_scores_by_what_a_caption_states():
    scene, _ = teacher.scene(0, 3)
    truth = facts.scene_facts(scene)
    perfect = facts.fact_accuracy([(truth, describe(scene))])
    assert perfect["recall"] == 1.0 and perfect["precision"] == 1.0
    assert facts.fact_accuracy([(truth, "x\ufffd\x07 qwv zzk")])["recall"] == 0.0  # random models' byte soup
    group = scene.groups[0]
    partial = facts.fact_accuracy([(truth, f"A {group.size} {group.color} {group.shape}, on a grey background.")])
    assert 0 < partial["recall"] < 1 and partial["by_kind"]["object"] > 0


def test_retention_counts_names_and_facts_kept():
    alt = "Acme Prints | Lisbon collection"
    visual = "A large red star at the top, on a grey background."
    kept = facts.retention([(alt, teacher.fused(alt, visual))])
    assert kept["entities"] == 1.0 and kept["names_seen"] == 2
    assert facts.retention([(alt, visual)])["entities"] == 0.0
    assert facts.retention([(visual, teacher.fused(alt, visual))])["facts"] == 1.0


def test_diversity_and_meaning_retention_of_rewrites():
    same = facts.diversity([("red star poster", ["A red star poster.", "A red star poster."])])
    assert same["distinct"] == 0.5 and same["pairwise_distance"] == 0.0
    varied = facts.diversity([("red star poster", ["A picture of a red star poster.", "Red star poster, pictured."])])
    assert varied["distinct"] == 1.0 and varied["pairwise_distance"] > 0 and varied["meaning_retention"] == 1.0


def test_teacher_targets_keep_the_alt_texts_names_and_every_visual_fact():
    for index in range(200):
        scene, rng = teacher.scene(0, index)
        alt, kind = alt_text(scene, rng)
        fused = teacher.fused(alt, describe(scene))
        assert facts.parse(fused) == facts.scene_facts(scene)
        if kind == "brand":  # brand, product and place all kept
            assert facts.entities(alt) <= facts.entities(fused), (alt, fused)
        rewrite = teacher.paraphrase(alt or "x", random.Random(index))
        assert facts.entities(alt) <= facts.entities(rewrite), (alt, rewrite)


def test_model_scenes_are_their_own_stream():
    """The models learn from split "models": never the rows of the train or eval split."""
    from veclip.world.generate import SampleConfig, make_row

    config = SampleConfig(rows=50, eval_rows=50)
    sample_facts = {make_row(split, i, config)["ref_facts"] for split in ("train", "eval") for i in range(50)}
    model_facts = {__import__("json").dumps(teacher.scene(0, i)[0].to_dict()) for i in range(50)}
    assert not sample_facts & model_facts
