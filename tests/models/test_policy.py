from __future__ import annotations

import pytest

from tidegate.models.policy import EntryView, EvictionPlan, EvictionPolicy, decayed, plan_eviction

MB = 1 << 20


def view(model: str, used: float, size: int = 10 * MB, **kw: object) -> EntryView:
    return EntryView(id=model, size=size, last_used=used, **kw)  # type: ignore[arg-type]


def test_fits_without_eviction() -> None:
    plan = plan_eviction([view("a", 1)], need_bytes=10 * MB, max_bytes=20 * MB,
                         max_models=None, now=100)
    assert plan.fits and plan.victims == []


def test_evicts_least_recently_used_first() -> None:
    resident = [view("a", 5), view("b", 1), view("c", 3)]
    plan = plan_eviction(resident, need_bytes=15 * MB, max_bytes=30 * MB, max_models=None,
                         now=100)
    assert plan.victims == ["b", "c"]


def test_model_count_limit() -> None:
    plan = plan_eviction([view("a", 5), view("b", 1)], need_bytes=0, max_bytes=None,
                         max_models=2, now=100)
    assert plan.victims == ["b"]


def test_leased_loading_and_kept_alive_models_are_never_evicted() -> None:
    resident = [view("busy", 1, leases=2), view("loading", 2, loading=True),
                view("young", 3, keep_alive_s=60), view("pinned", 4, keep_alive_s=-1),
                view("old", 5)]
    plan = plan_eviction(resident, need_bytes=10 * MB, max_bytes=50 * MB, max_models=None,
                         now=30)
    assert plan.victims == ["old"]


def test_nothing_evicted_when_room_cannot_be_made_and_holders_explain() -> None:
    resident = [view("busy", 1, leases=1), view("idle", 2)]
    plan = plan_eviction(resident, need_bytes=25 * MB, max_bytes=30 * MB, max_models=None,
                         now=100)
    assert not plan.fits and plan.victims == []
    assert any("busy" in h and "in flight" in h for h in plan.holders)


def test_dependency_goes_only_after_its_dependent() -> None:
    resident = [view("emb", 1), view("reranker", 2, depends_on=("emb",)), view("other", 9)]
    plan = plan_eviction(resident, need_bytes=20 * MB, max_bytes=30 * MB, max_models=None,
                         now=100)
    assert plan.victims == ["reranker", "emb"]
    leased = [view("emb", 1), view("reranker", 2, depends_on=("emb",), leases=1),
              view("other", 9)]
    plan = plan_eviction(leased, need_bytes=10 * MB, max_bytes=30 * MB, max_models=None,
                         now=100)
    assert plan.victims == ["other"]


def test_protected_models_stay() -> None:
    plan = plan_eviction([view("dep", 1), view("b", 2)], need_bytes=10 * MB,
                         max_bytes=20 * MB, max_models=None, now=100, protect={"dep"})
    assert plan.victims == ["b"]


LFU = EvictionPolicy(mode="lfu", half_life=600)


def test_decayed_halves_every_half_life() -> None:
    assert decayed(8, at=100, now=100, half_life=600) == 8
    assert decayed(8, at=100, now=700, half_life=600) == pytest.approx(4)
    assert decayed(8, at=100, now=1300, half_life=600) == pytest.approx(2)


def test_lfu_evicts_the_least_frequent_even_if_it_was_used_last() -> None:
    resident = [view("hot", 1, frequency=10, frequency_at=1),
                view("once", 9, frequency=1, frequency_at=9)]
    lfu = plan_eviction(resident, need_bytes=0, max_bytes=None, max_models=2, now=10,
                        policy=LFU)
    lru = plan_eviction(resident, need_bytes=0, max_bytes=None, max_models=2, now=10)
    assert (lfu.victims, lru.victims) == (["once"], ["hot"])


def test_lfu_decay_lets_a_formerly_hot_model_go() -> None:
    # "old" had 8 requests by t=0 and none since; "new" has 3, the last at t=1000. With a
    # 600 s half-life old's count is 8 * 2**(-1000/600) = 2.5 by now: below new's 3.
    resident = [view("new", 1000, frequency=3, frequency_at=1000),
                view("old", 0, frequency=8, frequency_at=0)]

    def victims(half_life: float) -> list[str]:
        return plan_eviction(resident, need_bytes=0, max_bytes=None, max_models=2, now=1000,
                             policy=EvictionPolicy(mode="lfu", half_life=half_life)).victims

    assert victims(600) == ["old"]
    assert victims(6000) == ["new"]  # slower decay: 8 * 2**(-1/6) = 7.1 still beats 3


def test_lfu_ties_go_to_the_least_recently_used() -> None:
    def victims(a_used: float, b_used: float) -> list[str]:
        resident = [view("a", a_used, frequency=2, frequency_at=5),
                    view("b", b_used, frequency=2, frequency_at=5)]
        return plan_eviction(resident, need_bytes=0, max_bytes=None, max_models=2, now=10,
                             policy=LFU).victims

    assert victims(7, 3) == ["b"]
    assert victims(3, 7) == ["a"]


def test_lfu_keeps_every_protection() -> None:
    # Everything but "hot" has fewer requests than "reranker", so only the protections keep
    # them from going first.
    resident = [view("busy", 1, leases=2), view("loading", 2, loading=True),
                view("young", 3, keep_alive_s=60), view("pinned", 4, keep_alive_s=-1),
                view("needed", 5), view("emb", 6),
                view("reranker", 7, depends_on=("emb",), frequency=5, frequency_at=30),
                view("hot", 8, frequency=9, frequency_at=30)]

    def plan(need_mb: int) -> EvictionPlan:
        return plan_eviction(resident, need_bytes=need_mb * MB, max_bytes=80 * MB,
                             max_models=None, now=30, protect={"needed"}, policy=LFU)

    assert plan(10).victims == ["reranker"]
    assert plan(20).victims == ["reranker", "emb"]  # the dependent first
    stuck = plan(40)
    assert not stuck.fits and stuck.victims == []
    why = {holder.split()[0]: holder for holder in stuck.holders}
    assert sorted(why) == ["busy", "loading", "needed", "pinned", "young"]
    assert "in flight" in why["busy"] and "kept alive" in why["young"]
    assert "keep_alive -1" in why["pinned"] and "needed by this load" in why["needed"]


def test_eviction_policy_needs_a_positive_half_life() -> None:
    with pytest.raises(ValueError, match="half_life"):
        EvictionPolicy(mode="lfu", half_life=0)
