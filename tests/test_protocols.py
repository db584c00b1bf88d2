"""genvs.eval.protocols: SRN view selection, quick-run subsets and per-sample seeds."""

import pytest

from genvs.eval.protocols import SRN_PROTOCOL, EvalProtocol, ProtocolError


def test_srn_protocol_conditions_on_view_64_and_scores_all_others():
    ctx, tgt = SRN_PROTOCOL.select_views("car_0001", 251)
    assert ctx == [64] and len(tgt) == 250 and 64 not in tgt and tgt == sorted(tgt)
    assert SRN_PROTOCOL.select_objects(["b", "a", "c"]) == ["a", "b", "c"]


def test_quick_run_subsets_are_seeded_and_stable():
    p = EvalProtocol(max_objects=3, max_target_views=5, seed=7)
    ids = [f"obj{i:03d}" for i in range(50)]
    objs = p.select_objects(ids)
    assert len(objs) == 3 and objs == p.select_objects(list(reversed(ids)))  # order of discovery irrelevant
    ctx, tgt = p.select_views(objs[0], 251)
    assert len(tgt) == 5 and 64 not in tgt and (ctx, tgt) == p.select_views(objs[0], 251)
    other = EvalProtocol(max_objects=3, max_target_views=5, seed=8)
    assert other.select_objects(ids) != objs or other.select_views(objs[0], 251) != (ctx, tgt)
    # per-sample seeds: deterministic values (CRC32, not the salted hash()), distinct per key
    assert p.sample_seed("obj001", 3) == EvalProtocol(seed=7).sample_seed("obj001", 3)
    assert p.sample_seed("obj001", 3) != p.sample_seed("obj001", 4)
    assert EvalProtocol(seed=0).sample_seed("a", 1) == 361064883  # pinned: changing it changes every seeded result


def test_protocol_errors_name_the_scene_and_fix():
    with pytest.raises(ProtocolError, match=r"'car_9' has 50 views .* view\(s\) \[64\]"):
        SRN_PROTOCOL.select_views("car_9", 50)
    with pytest.raises(ProtocolError, match="max_objects"):
        EvalProtocol(max_objects=0)
    with pytest.raises(ProtocolError, match="no target views"):
        EvalProtocol(input_views=(0,)).select_views("s", 1)
