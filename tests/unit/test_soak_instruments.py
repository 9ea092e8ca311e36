"""The soak's verdicts: a process that crashed is a restart; a HAProxy that Serve reloaded out
(its successor started with `-sf <pid>`) is not, and drift compares the last third with the first."""

from __future__ import annotations

from tests.reliability.soak import ProcessMemory, drift, handed_over_pids


def test_a_haproxy_reload_names_every_process_it_takes_over_from():
    cmdline = ["haproxy", "-db", "-f", "/tmp/h.cfg", "-sf", "101", "99", "-x", "/tmp/admin.sock"]
    assert handed_over_pids(cmdline) == {101, 99}


def test_a_first_start_takes_over_from_nobody():
    assert handed_over_pids(["haproxy", "-db", "-f", "/tmp/h.cfg"]) == set()
    assert handed_over_pids(["haproxy", "-sf"]) == set()


def test_a_process_gone_without_a_successor_counts_as_restarted():
    crashed = ProcessMemory("ray:ServeReplica:inference:Ingress", 10, [480.0, None, None])
    assert crashed.restarted


def test_a_process_reloaded_out_does_not_count_as_restarted():
    drained = ProcessMemory("ray:haproxy", 11, [30.0, None], handed_over=True)
    assert not drained.alive_throughout
    assert not drained.restarted


def test_a_process_alive_at_every_sample_is_not_restarted():
    assert not ProcessMemory("nginx:nginx", 12, [5.0, 5.1]).restarted


def test_drift_is_the_last_third_over_the_first():
    assert drift([10.0, 10.0, 10.0, 10.0, 10.0, 20.0, 20.0, 20.0, 20.0]) == 2.0
    assert drift([0.0, 1.0, 1.0]) == 0.0
