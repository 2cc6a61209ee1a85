"""CPU threads of a server: ``Bridge(threads=N)`` gives its server N (``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` in its environment, torch held to them), and ``hello`` reports the count torch uses;
an explicit count wins over the user's ``OMP_NUM_THREADS``, which a server without one inherits.
Servers side by side share the cores: CPU ones split them, a GPU one gets an even share of them; a
pool of two CPU servers gives each its half, unless the user set the count.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slicebridge.bridge.launcher import split_by_user, thread_shares, usable_cores
from slicebridge.client.bridge import Bridge
from slicebridge.client.pool import Pool


def server_environ_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in entries if entry)


def test_an_explicit_count_wins_over_the_users_and_none_inherits_it(slicegpt_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # more than torch's default here: what a server inherits shows
    with Bridge(str(slicegpt_env), attach=False, threads=1) as one, Bridge(str(slicegpt_env), attach=False) as users:
        assert one.server_hello.threads == 1 and one.hello().threads == 1
        environ = server_environ_of(one.server.pid)
        assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "1"
        assert users.server_hello.threads == 3 and server_environ_of(users.server.pid)["OMP_NUM_THREADS"] == "3"


def test_each_cpu_server_of_a_pool_gets_its_share_of_the_cores(slicegpt_env, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    share = max(1, usable_cores() // 2)  # 1 on a 2-core machine
    with Pool(str(slicegpt_env), ["cpu", "cpu"]) as pool:
        assert [member.bridge.server_hello.threads for member in pool.members] == [share, share]
        assert all(
            server_environ_of(member.bridge.server.pid)["OMP_NUM_THREADS"] == str(share) for member in pool.members
        )
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's count: the pool leaves it to every server
    assert [member.bridge.threads for member in Pool(str(slicegpt_env), ["cpu", "cpu"])._make_members()] == [None, None]


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_a_count_that_is_not_one_or_more_is_refused_before_any_server_starts(slicegpt_env, threads):
    with pytest.raises(ValueError, match="threads must be a whole number of at least 1"):
        Bridge(str(slicegpt_env), attach=False, threads=threads).start()


def test_servers_side_by_side_share_the_cores():
    assert thread_shares(["cpu", "cpu"], 2) == [1, 1]
    assert thread_shares(["cpu", "cpu", "cpu"], 2) == [1, 1, 1]  # never none
    assert thread_shares(["cpu"], 12) == [12]
    assert thread_shares(["cpu", "cpu", "cuda:0", "cuda:1"], 16) == [8, 8, 4, 4]
    assert thread_shares(["cuda:0", "cuda:1", "cuda:2"], 64) == [21, 21, 21]
    assert thread_shares(["cpu+cpu", "cpu", "cuda:0+cuda:1"], 12) == [
        6,
        6,
        4,
    ]  # a group on the host alone is a CPU server


def test_the_cores_are_those_this_process_may_run_on(monkeypatch):
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert usable_cores() == 1


def test_the_user_splits_when_either_variable_is_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert not split_by_user()
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    assert split_by_user()
