"""A coordinator killed with SIGKILL mid-upload and restarted: `submit` resumes, sending only
the rest, and no partial expert is ever listed."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from coordinator.store.experts import Store
from protocol.bundle import load_bundle
from tests.harness.bundles import archive_of, make_bundle
from tests.harness.servers import ROOT, add_token, restart, seed_base_spec, start_coordinator


def largest_part(store) -> int:
    sizes = [p.stat().st_size for p in (store / "uploads").glob("*.part")]
    return max(sizes, default=0)


def listed_ids(store) -> list[str]:
    handle = Store(store)
    try:
        return [e.expert_id for e in handle.list_experts()]
    finally:
        handle.close()


def test_submit_resumes_after_the_coordinator_is_killed(tmp_path, tiny_spec):
    store = tmp_path / "store"
    seed_base_spec(store, tiny_spec)
    server = start_coordinator(store, extra_args=("--no-assembly",))
    token = add_token(store, "alice")
    bundle = make_bundle(tmp_path / "bundle", tiny_spec, "resumable", rank=1024)
    size = len(archive_of(bundle))
    assert size > 3 << 20
    # Paced at ~1/4 of the archive per second, so the kill lands mid-upload.
    submit = subprocess.Popen(
        [sys.executable, "-m", "contributor.cli", "submit", str(bundle), "--coordinator",
         server.address, "--token", token, "--quiet", "--limit-rate", str(size // 4)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while largest_part(store) <= size // 4:
            assert submit.poll() is None, submit.communicate()
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        server.kill()
        committed_at_kill = largest_part(store)
        assert 0 < committed_at_kill < size
        assert listed_ids(store) == []

        server = restart(server)
        assert listed_ids(store) == []  # the interrupted upload is not an expert
        out, err = submit.communicate(timeout=180)
    finally:
        if submit.poll() is None:
            submit.kill()
        server.stop()

    assert submit.returncode == 0, err
    expert_id = out.strip().splitlines()[-1]
    assert expert_id == load_bundle(bundle).expert_id
    resumed_from = int(re.search(r"resumed at byte (\d+)", out).group(1))
    assert committed_at_kill <= resumed_from < size  # acknowledged bytes were kept
    assert "retrying" in err
    assert listed_ids(store) == [expert_id]
    assert load_bundle(store / "experts" / expert_id).expert_id == expert_id
    assert not list((store / "uploads").iterdir())
    assert not list((store / "staging").iterdir())
