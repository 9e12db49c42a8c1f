"""`learner.cpu_affinity`: parsing, validation naming the key, the plan, helpers off the learner's cores."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from stream_cl.config import ConfigError, load_config
from stream_cl.runtime import affinity

needs_two_cores = pytest.mark.skipif(
    not affinity.SUPPORTED or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores (Linux)"
)


def test_cpu_lists_parse_like_taskset() -> None:
    assert affinity.parse_cpus("3") == {3}
    assert affinity.parse_cpus("0-2, 5") == {0, 1, 2, 5}
    for bad in ("", "a", "3-1", "-1", "1,,2"):
        with pytest.raises(ValueError):
            affinity.parse_cpus(bad)


@pytest.mark.parametrize("value", ["fast", "1-", "x,2"])
def test_a_malformed_value_is_an_error_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"learner\.cpu_affinity.*expected 'auto', 'off'") as e:
        load_config(None, [f"learner.cpu_affinity={value}"], env={})
    assert e.value.key == "learner.cpu_affinity"


@pytest.mark.skipif(not affinity.SUPPORTED, reason="Linux only")
def test_a_cpu_this_process_may_not_use_is_an_error_naming_it() -> None:
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=rf"learner\.cpu_affinity.*CPUs \[{missing}\] are not available"):
        load_config(None, [f"learner.cpu_affinity={missing}"], env={})


@pytest.mark.skipif(not affinity.SUPPORTED, reason="Linux only")
def test_the_plan_gives_the_learner_the_last_free_cores_and_the_rest_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    claims = tmp_path  # this test's own core claims
    monkeypatch.setattr(affinity, "cpu_quota", lambda: None)  # as on a machine of its own
    allowed = frozenset(os.sched_getaffinity(0))
    plan, why = affinity.cpu_plan("auto", torch_threads=len(allowed), claims_dir=claims)
    assert plan is None and "none left over for the rest" in why
    assert affinity.cpu_plan("off", 1, claims) == (None, "off")
    if len(allowed) >= 2:
        first, _ = affinity.cpu_plan("auto", torch_threads=1, claims_dir=claims)
        assert first is not None
        assert first.learner == {max(allowed)} and first.rest == allowed - {max(allowed)}
        # a second daemon on this machine does not take the same core: the next one, or none
        second, why = affinity.cpu_plan("auto", torch_threads=1, claims_dir=claims)
        if len(allowed) == 2:
            assert second is None and "held by other daemons' learners" in why
        else:
            assert second is not None and second.learner == {sorted(allowed)[-2]}
            assert not second.rest & (first.learner | second.learner)
            second.release()
        first.release()  # the core is free again
        again, _ = affinity.cpu_plan("auto", torch_threads=1, claims_dir=claims)
        assert again is not None and again.learner == first.learner
        again.release()
        plan, _ = affinity.cpu_plan(str(min(allowed)), torch_threads=1, claims_dir=claims)
        assert plan is not None and plan.learner == {min(allowed)} and plan.rest == allowed - {min(allowed)}
    only, _ = affinity.cpu_plan(",".join(map(str, sorted(allowed))), torch_threads=1, claims_dir=claims)
    assert only is not None and only.rest == allowed  # no core left over: the rest may run anywhere


@pytest.mark.skipif(not affinity.SUPPORTED, reason="Linux only")
def test_auto_leaves_cores_shared_under_a_cpu_quota_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container limited by a CPU quota sees the host's cores: pinning would pile every such
    container's learner onto the same one."""
    claims = tmp_path
    monkeypatch.setattr(affinity, "cpu_quota", lambda: 0.5)
    plan, why = affinity.cpu_plan("auto", torch_threads=1, claims_dir=claims)
    assert plan is None and "CPU quota of 0.5 cores" in why


def test_the_cgroup_cpu_quota_is_read_from_v2_or_v1_files(tmp_path: Path) -> None:
    assert affinity.cpu_quota(str(tmp_path)) is None  # no cgroup files: no limit known
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert affinity.cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    assert affinity.cpu_quota(str(tmp_path)) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2 wins where present
    assert affinity.cpu_quota(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert affinity.cpu_quota(str(tmp_path)) == 1.5


@needs_two_cores
def test_threads_started_in_the_block_inherit_the_rest_and_the_caller_gets_its_cores_back() -> None:
    plan = affinity.CpuPlan(
        frozenset({max(os.sched_getaffinity(0))}), frozenset({min(os.sched_getaffinity(0))})
    )
    before = frozenset(os.sched_getaffinity(0))
    seen: dict[str, Any] = {}

    def learner() -> None:
        plan.pin_learner()
        seen["learner"] = frozenset(os.sched_getaffinity(0))

    with plan.starting_threads():
        started = threading.Thread(target=lambda: seen.update(other=frozenset(os.sched_getaffinity(0))))
        started.start()
        pinned = threading.Thread(target=learner)
        pinned.start()
    started.join()
    pinned.join()
    assert frozenset(os.sched_getaffinity(0)) == before
    assert seen == {"other": plan.rest, "learner": plan.learner}


@needs_two_cores
def test_a_checkpoint_written_for_a_pinned_learner_runs_off_its_cores(tmp_path: Path) -> None:
    from stream_cl.config import Config
    from stream_cl.learn.checkpointing import BackgroundWrite
    from stream_cl.runtime.tuning import ProcessTuning

    tuning = ProcessTuning(Config())
    tuning.cpus = plan = affinity.CpuPlan(
        frozenset({max(os.sched_getaffinity(0))}), frozenset({min(os.sched_getaffinity(0))})
    )
    where: list[frozenset[int]] = []

    class Store:  # records where `save` ran
        def save(self, state: dict[str, Any]) -> Path:
            where.append(frozenset(os.sched_getaffinity(0)))
            return tmp_path / "ckpt"

    def learner() -> None:
        with tuning.learner_thread():
            path, error = BackgroundWrite(Store(), {}, {}, 0).result()  # type: ignore[arg-type]
        assert path == tmp_path / "ckpt" and error is None

    thread = threading.Thread(target=learner)
    thread.start()
    thread.join()
    assert where == [plan.rest]


@pytest.mark.skipif(not affinity.SUPPORTED, reason="Linux only")
def test_auto_pins_nothing_when_no_core_can_be_claimed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A claims directory the daemon cannot create: no lock file, so no claim and no pinning (the
    daemon still starts)."""
    (tmp_path / "a-file").write_text("")
    claims = tmp_path / "a-file" / "claims"
    monkeypatch.setattr(affinity, "cpu_quota", lambda: None)
    plan, why = affinity.cpu_plan("auto", torch_threads=1, claims_dir=claims)
    assert plan is None
    assert len(os.sched_getaffinity(0)) < 2 or why.startswith("cannot claim cores")
