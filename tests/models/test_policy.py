from __future__ import annotations

from tidegate.models.policy import EntryView, plan_eviction

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
