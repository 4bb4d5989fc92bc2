"""Caption choice: deterministic per (seed, epoch, key), the papers' mixes, fallbacks."""

import numpy as np
import pytest

from veclip.train.captions import CaptionConfig, choose, choose_several, key_hash, trainable

N = 6000
KEYS = np.array([key_hash(f"train-{i:08d}") for i in range(N)])


def _rows(n=N, alt=True, vecap=True, rewrites=0, slots=7):
    present = np.zeros((n, slots), bool)
    present[:, 0], present[:, 1] = alt, vecap
    present[:, 3 : 3 + rewrites] = True
    return present, present.copy()


def test_mix_share_is_binomial():
    config = CaptionConfig("mix", p_vecap=0.5)
    present, usable = _rows()
    chosen = choose(KEYS, present, usable, config.slot_weights(), seed=0, epoch=0)
    share = (chosen == 1).mean()
    assert set(np.unique(chosen)) == {0, 1}
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / N)  # 4 sigma
    p30 = (choose(KEYS, present, usable, CaptionConfig("mix", p_vecap=0.3).slot_weights(), 0, 0) == 1).mean()
    assert abs(p30 - 0.3) < 4 * np.sqrt(0.21 / N)


def test_deterministic_and_independent_of_how_rows_are_split():
    weights = CaptionConfig("mix").slot_weights()
    present, usable = _rows()
    whole = choose(KEYS, present, usable, weights, 3, 1)
    # two workers, shuffled blocks: each key still gets the same caption
    order = np.random.default_rng(0).permutation(N)
    halves = [order[: N // 2], order[N // 2 :]]
    parts = np.empty(N, int)
    for idx in halves:
        parts[idx] = choose(KEYS[idx], present[idx], usable[idx], weights, 3, 1)
    assert (parts == whole).all()
    assert (choose(KEYS, present, usable, weights, 3, 1) == whole).all()
    other_epoch = choose(KEYS, present, usable, weights, 3, 2)
    assert 0.4 < (other_epoch != whole).mean() < 0.6  # a fresh draw per epoch
    assert (choose(KEYS, present, usable, weights, 4, 1) != whole).any()  # and per seed


def test_missing_or_unusable_vecap_falls_back_to_alt_text():
    weights = CaptionConfig("mix").slot_weights()
    present, usable = _rows(vecap=False)
    assert (choose(KEYS, present, usable, weights, 0, 0) == 0).all()
    present, usable = _rows()
    usable[:, 1] = False  # present but under 2 words
    assert (choose(KEYS, present, usable, weights, 0, 0) == 0).all()
    present, usable = _rows()
    usable[:, 0] = False  # AltText unusable: VeCap serves
    assert (choose(KEYS, present, usable, weights, 0, 0) == 1).all()


def test_laclip_uniform_over_original_and_rewrites():
    config = CaptionConfig("laclip")
    present, usable = _rows(vecap=True, rewrites=4)
    chosen = choose(KEYS, present, usable, config.slot_weights(), 0, 0)
    counts = np.bincount(chosen, minlength=7)
    assert counts[1] == counts[2] == 0  # the VeCap is not a LaCLIP candidate
    for slot in (0, 3, 4, 5, 6):
        assert abs(counts[slot] / N - 0.2) < 4 * np.sqrt(0.16 / N)
    present, usable = _rows(rewrites=2)  # fewer rewrites: uniform over what exists
    counts = np.bincount(choose(KEYS, present, usable, config.slot_weights(), 0, 0), minlength=7)
    assert counts[5] == counts[6] == 0 and abs(counts[0] / N - 1 / 3) < 0.03
    usable[:, 3:] = False  # an unusable rewrite falls back to the original
    assert (choose(KEYS, present, usable, config.slot_weights(), 0, 0) == 0).all()


def test_single_column_modes_and_weighted():
    present, usable = _rows(rewrites=4)
    assert (choose(KEYS, present, usable, CaptionConfig("alttext").slot_weights(), 0, 0) == 0).all()
    assert (choose(KEYS, present, usable, CaptionConfig("vecap").slot_weights(), 0, 0) == 1).all()
    weighted = CaptionConfig("weighted", weights={"vecap": 3, "rewrites": 1})
    counts = np.bincount(choose(KEYS, present, usable, weighted.slot_weights(), 0, 0), minlength=7)
    assert counts[0] == 0 and abs(counts[1] / N - 0.75) < 0.03
    with pytest.raises(ValueError, match="weighted mode"):
        CaptionConfig("weighted", weights={"title": 1})
    with pytest.raises(ValueError, match="caption mode"):
        CaptionConfig("random")


def test_rows_without_any_usable_caption_are_not_trainable():
    present, usable = _rows(n=4)
    usable[0, :] = False
    usable[1, 0] = False  # AltText gone, VeCap left
    assert trainable(usable, CaptionConfig("mix").slot_weights()).tolist() == [False, True, True, True]
    assert trainable(usable, CaptionConfig("alttext").slot_weights()).tolist() == [False, False, True, True]


def test_key_hash_is_stable():
    assert key_hash("train-00000001") == key_hash("train-00000001") != key_hash("train-00000002")
    assert key_hash("abc") == 6455300059550759896  # blake2b: the same in every process, run and machine


def test_several_captions_are_distinct_usable_slots_drawn_by_weight():
    weights = CaptionConfig(
        "weighted", weights={"alt_text": 1, "vecap": 2, "rewrites": 4}
    ).slot_weights()  # 1 per rewrite
    present, usable = _rows(rewrites=4)
    usable[: N // 2, 1] = False  # half the rows: VeCap unusable
    chosen = choose_several(KEYS, usable, weights, seed=0, epoch=0, k=2)
    assert chosen.shape == (N, 2) and (chosen[:, 0] != chosen[:, 1]).all()
    assert not np.isin(chosen[: N // 2], [1, 2]).any()  # never an unusable slot, nor one of weight 0 (vlm_caption)
    # the first draw is the weighted choice: P(vecap) = 2 / (1 + 2 + 4) where it is usable
    share = (chosen[N // 2 :, 0] == 1).mean()
    assert abs(share - 2 / 7) < 4 * np.sqrt(2 / 7 * 5 / 7 / (N // 2))
    # a pure function of (seed, epoch, key): the same whatever the split, another set next epoch
    again = np.concatenate(
        [
            choose_several(KEYS[:100], usable[:100], weights, 0, 0, 2),
            choose_several(KEYS[100:], usable[100:], weights, 0, 0, 2),
        ]
    )
    assert np.array_equal(chosen, again)
    assert not np.array_equal(chosen, choose_several(KEYS, usable, weights, 0, 1, 2))


def test_a_row_with_fewer_usable_captions_than_k_repeats_its_own():
    weights = CaptionConfig("mix").slot_weights()  # alt_text and vecap only
    present, usable = _rows(n=3)
    usable[1, 1] = False  # only the AltText
    usable[2] = False  # nothing
    chosen = choose_several(KEYS[:3], usable, weights, 0, 0, k=3)
    assert sorted(chosen[0][:2]) == [0, 1] and chosen[0][2] == chosen[0][0]
    assert chosen[1].tolist() == [0, 0, 0] and chosen[2].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="per_image"):
        CaptionConfig(per_image=0)
