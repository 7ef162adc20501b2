import pytest

from salt.reference import PRESETS, ModelConfig, get_preset, param_count

PAPER_SIZES = {"paper-1.5b": 1.5e9, "paper-2.8b": 2.8e9, "paper-8.6b": 8.6e9}


@pytest.mark.parametrize("name,target", sorted(PAPER_SIZES.items()))
def test_paper_presets_hit_their_sizes(name, target):
    n = param_count(get_preset(name))
    assert abs(n - target) / target <= 0.04, (name, n)


def test_exact_count_paper_2p8b():
    # 92 layers x (attention 2.5M with MQA + MLP 3 x 1024 x 8192 + 2 norms) + 256000 x 1024 + norm
    c = get_preset("paper-2.8b")
    per_layer = 1024 * 1024 * 2 + 2 * 1024 * 256 + 3 * 1024 * 8192 + 2 * 1024
    assert param_count(c) == 92 * per_layer + 256000 * 1024 + 1024


def test_small_student_is_about_twice_the_teacher():
    for t, s in [("tiny-teacher", "tiny-student"), ("small-teacher", "small-student")]:
        ratio = param_count(PRESETS[s], embedding=False) / param_count(PRESETS[t], embedding=False)
        assert 1.6 <= ratio <= 2.4, (t, s, ratio)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig("x", 10, 1, 16, 32, 4, 3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
