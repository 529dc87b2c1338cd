"""Tests for the published OpenFlamingo v2 evaluation figures in `openflamingo_hf.release_data`."""

from __future__ import annotations

import pytest

from openflamingo_hf.release_data import PUBLISHED, PUBLISHED_TASKS, SHOTS, SOURCES, published_scores
from openflamingo_hf.releases import RELEASES


def test_every_release_is_present():
    assert set(PUBLISHED) == set(RELEASES)
    assert set(SOURCES) == set(RELEASES)
    for url in SOURCES.values():
        assert url.startswith("https://")


# The 4-shot COCO CIDEr and VQAv2 accuracy of the report's Table 4 (written out here, independently of the table
# under test).
HEADLINE = {
    "OpenFlamingo-3B-vitl-mpt1b": (77.3, 45.8),
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": (82.7, 45.7),
    "OpenFlamingo-4B-vitl-rpj3b": (81.8, 49.0),
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": (85.8, 49.0),
    "OpenFlamingo-9B-vitl-mpt7b": (89.0, 54.8),
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_four_shot_coco_and_vqav2_are_the_headline_figures(name):
    scores = published_scores(name)
    assert (scores[("coco", 4)], scores[("vqav2", 4)]) == HEADLINE[name]
    # The release table reads the same figures (one owner: the published table).
    assert (RELEASES[name].coco_cider_4shot, RELEASES[name].vqav2_accuracy_4shot) == HEADLINE[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_table_shape(name):
    table = PUBLISHED[name]
    assert table
    for task, row in table.items():
        assert task in PUBLISHED_TASKS
        assert row
        for shots, (mean, std) in row.items():
            assert shots in {0, 4, 8, 16, 32}
            assert isinstance(mean, float) and 0.0 <= mean <= 150.0
            assert std is None or (isinstance(std, float) and std >= 0.0)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_scores_flattens_means(name):
    scores = published_scores(name)
    expected = {(b, s): cell[0] for b, row in PUBLISHED[name].items() for s, cell in row.items()}
    assert scores == expected
    assert all(shots in SHOTS for _, shots in scores)


def test_spot_values():
    assert PUBLISHED["OpenFlamingo-9B-vitl-mpt7b"]["coco"][32] == (99.5, 0.1)
    assert PUBLISHED["OpenFlamingo-4B-vitl-rpj3b"]["textvqa"][32] == (14.1, 0.2)
    assert PUBLISHED["OpenFlamingo-3B-vitl-mpt1b-langinstruct"]["hateful_memes"][0] == (50.1, 2.2)


def test_unknown_release_raises_and_lists_known():
    with pytest.raises(ValueError) as excinfo:
        published_scores("OpenFlamingo-1B-nope")
    message = str(excinfo.value)
    assert "OpenFlamingo-1B-nope" in message
    for name in PUBLISHED:
        assert name in message
