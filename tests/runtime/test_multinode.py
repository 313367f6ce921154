"""Multi-node launch (issue 18, item 4): two torchrun "nodes" on this machine, joined by a c10d
rendezvous on localhost, train exactly like one node of the same size, and `Cluster.detect()`
sees 2 nodes there.

The launch test plans once, here, for a fixed dp=2 x tp=2 mesh, and both jobs load that file, so
that the comparison is about the launch, not the planner. Then it runs this file as the training
script, first as two torchrun agents of 2 processes each:

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint localhost:PORT --rdzv-id ID -m tests.runtime.test_multinode \\
        --plan PLAN --out DIR

(the same command twice, concurrently: the c10d rendezvous numbers the nodes, so no
--node-rank), then as one agent of 4 (`--standalone --nproc-per-node 4`). Every rank writes
what `Cluster.detect()` saw and its loss after each of 3 SGD steps; the test compares them.

Why the losses are bit-identical, not merely close: torchrun numbers ranks node after node (node
0's are 0 and 1, node 1's 2 and 3), so each global rank gets the same mesh coordinates, the same
shards and the same batch slice in both launches, and gloo's collectives reduce in an order
fixed by the ranks, not by which agent started a process. Everything runs on one machine with
one thread a process, so the arithmetic is the same too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from autopar.cluster import Cluster
from autopar.errors import ClusterSpecError
from tests.helpers.torchrun import TORCHRUN_VARS, free_port, launch, report, torchrun

MESH = {"dp": 2, "tp": 2}
STEPS = 3
LAUNCH_TIMEOUT_S = 120  # each launch; one takes ~15-25 s on 2 cores


# -- Cluster.detect() from torchrun's environment -------------------------------------------------

class TestDetectNodes:
    @pytest.fixture(autouse=True)
    def no_gpu(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        for var in TORCHRUN_VARS:
            monkeypatch.delenv(var, raising=False)

    @staticmethod
    def torchrun_env(monkeypatch, *, world, local, groups, group_rank, local_rank=0):
        """What torchrun gives a worker of node `group_rank` when every node runs `local`."""
        first = group_rank * local
        for var, value in dict(WORLD_SIZE=world, LOCAL_WORLD_SIZE=local, GROUP_WORLD_SIZE=groups,
                               GROUP_RANK=group_rank, RANK=first + local_rank,
                               LOCAL_RANK=local_rank, ROLE_WORLD_SIZE=world).items():
            monkeypatch.setenv(var, str(value))

    @pytest.mark.parametrize("group_rank", [0, 1])
    def test_two_nodes_of_two(self, monkeypatch, group_rank):
        self.torchrun_env(monkeypatch, world=4, local=2, groups=2, group_rank=group_rank,
                          local_rank=1)
        c = Cluster.detect()
        assert (c.name, c.nodes, c.devices_per_node, c.world_size) == ("cpu", 2, 2, 4)

    def test_one_node(self, monkeypatch):
        self.torchrun_env(monkeypatch, world=4, local=4, groups=1, group_rank=0)
        c = Cluster.detect()
        assert (c.nodes, c.devices_per_node) == (1, 4)

    def test_nodes_of_different_sizes_are_an_error(self, monkeypatch):
        # nodes of 2 and 4 processes (an elastic job may give each node its own
        # --nproc-per-node): 6 processes, not 2 x 2 nor 2 x 4
        monkeypatch.setenv("WORLD_SIZE", "6")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
        with pytest.raises(ClusterSpecError, match="different numbers of processes"):
            Cluster.detect()

    def test_a_node_whose_count_fits_but_whose_ranks_do_not(self, monkeypatch):
        # nodes of 1, 2 and 3 processes: the middle node's 3 x 2 = 6 fits the world, but its
        # first rank is 1 (after node 0's one process), not 1 x 2
        for var, value in dict(WORLD_SIZE=6, LOCAL_WORLD_SIZE=2, GROUP_WORLD_SIZE=3,
                               GROUP_RANK=1, RANK=2, LOCAL_RANK=1).items():
            monkeypatch.setenv(var, str(value))
        with pytest.raises(ClusterSpecError, match="starts at rank 1, not 2"):
            Cluster.detect()

    def test_without_torchrun_nodes_are_world_over_local(self, monkeypatch):
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert Cluster.detect().nodes == 4

    @pytest.mark.parametrize("var,value", [("GROUP_WORLD_SIZE", "0"), ("GROUP_RANK", "-1"),
                                           ("RANK", "x")])
    def test_bad_values(self, monkeypatch, var, value):
        self.torchrun_env(monkeypatch, world=4, local=2, groups=2, group_rank=1)
        monkeypatch.setenv(var, value)
        with pytest.raises(ClusterSpecError, match=var):
            Cluster.detect()


# -- the launch: two torchrun nodes against one -----------------------------------------------------

# A launch that fails to connect is tried once more, on a new port: the rendezvous (its port
# taken between _free_port and torchrun's bind) or gloo's full-mesh connect in
# init_process_group (it can time out on a loaded 2-core machine). A launch in which any rank
# failed after connecting is not, nor one that ran and got a wrong answer. Ranks say which
# happened in files (see `main`): a peer's crash also shows as a connect error on the others.
_RENDEZVOUS_FAILURES = ("RendezvousConnectionError", "RendezvousTimeoutError", "EADDRINUSE",
                        "address already in use")


def _connect_failure_only(out: Path, logs: list[Path]) -> bool:
    if any(out.glob("failed-rank*.txt")):
        return False
    text = "".join(log.read_text(errors="replace") for log in logs)
    return any(out.glob("connect-failed-rank*.txt")) or any(s in text for s in _RENDEZVOUS_FAILURES)


def _run_job(tmp: Path, name: str, launches: list[list[str]], plan: Path) -> dict[int, dict]:
    """Run `launches` (torchrun arguments before the script, one torchrun each) concurrently;
    every rank's record (see `worker`), by rank."""
    for attempt in range(2):
        port = free_port()
        out = tmp / f"{name}-{attempt}"
        out.mkdir()
        commands = [torchrun([a.replace("PORT", str(port)) for a in options],
                             "tests.runtime.test_multinode", "--plan", str(plan), "--out", str(out))
                    for options in launches]
        logs = [out / f"torchrun{i}.log" for i in range(len(commands))]
        codes = launch(commands, logs, LAUNCH_TIMEOUT_S)
        if all(rc == 0 for rc in codes):
            records = {}
            for f in out.glob("rank*.json"):
                record = json.loads(f.read_text())
                records[record["rank"]] = record
            assert sorted(records) == [0, 1, 2, 3], f"{name}: ranks missing{report(codes, logs)}"
            return records
        if attempt == 0 and _connect_failure_only(out, logs):
            continue
        pytest.fail(f"{name} launch failed{report(codes, logs)}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    """The dp=2 x tp=2 plan of the tests' GPT, made once, offline on the meta device, for a
    4-process CPU cluster (its figures steer the plan only): both launches load it."""
    import autopar
    from autopar.models.losses import lm_loss
    from tests.helpers.models import MODELS, batches, fast_cpu_cluster

    with torch.device("meta"):
        model = MODELS["gpt"]()
    plan = autopar.plan(model, fast_cpu_cluster(4), batches()[0], loss_fn=lm_loss, mesh=MESH,
                        microbatch_size=len(batches()[0][0]) // MESH["dp"])
    path = tmp_path_factory.mktemp("plan") / "gpt-dp2-tp2.json"
    plan.save(path)
    return path


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_node(plan_file, tmp_path):
    two_nodes = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", "localhost:PORT", "--rdzv-id", f"multinode-{uuid.uuid4().hex}"]
    one_node = ["--standalone", "--nproc-per-node", "4"]
    t0 = time.monotonic()
    multi = _run_job(tmp_path, "two-nodes", [two_nodes, two_nodes], plan_file)
    single = _run_job(tmp_path, "one-node", [one_node], plan_file)
    elapsed = time.monotonic() - t0

    # what each rank's Cluster.detect() saw, and torchrun's numbering: node by node
    assert {(r["nodes"], r["devices_per_node"], r["world_size"]) for r in multi.values()} == {
        (2, 2, 4)}
    assert {r["group_rank"] for r in multi.values()} == {0, 1}
    assert all(r["rank"] // 2 == r["group_rank"] for r in multi.values())
    assert {(r["nodes"], r["devices_per_node"], r["world_size"]) for r in single.values()} == {
        (1, 4, 4)}
    # every rank's loss after every step: the same in both launches, to the bit
    for rank in range(4):
        assert len(multi[rank]["losses"]) == STEPS
        assert multi[rank]["losses"] == single[rank]["losses"], (
            f"rank {rank}: two nodes {multi[rank]['losses']} != one node "
            f"{single[rank]['losses']}")
    assert multi[0]["plan_mesh"] == single[0]["plan_mesh"] == MESH
    print(f"two 2-process nodes and one 4-process node: {elapsed:.1f} s")


# -- the training script each rank runs -----------------------------------------------------------

def worker(plan_path: str, out_dir: str) -> None:
    """One rank, its process group joined: say what Cluster.detect() sees, train STEPS SGD
    steps of the plan in `plan_path` on fixed batches from a fixed seed, write this rank's
    record to `out_dir`."""
    import torch.distributed as dist

    import autopar
    from autopar.models.losses import lm_loss
    from tests.helpers.models import MODELS, batches, sgd_losses

    cluster = Cluster.detect()
    torch.manual_seed(0)
    model = MODELS["gpt"]()
    data = batches()[:STEPS]
    # runtime="eager": the same ops and collectives as "replay" (tests/test_end_to_end.py
    # proves both), without tracing a replay on the first step, 3x the time of 3 steps here
    pm = autopar.autoparallelize(model, example_inputs=data[0], loss_fn=lm_loss,
                                 plan=autopar.Plan.load(plan_path), runtime="eager")
    losses = sgd_losses(pm.parameters(), pm.train_step, data)
    rank = dist.get_rank()
    record = {"rank": rank, "group_rank": int(os.environ["GROUP_RANK"]),
              "nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node,
              "world_size": cluster.world_size, "losses": losses, "plan_mesh": pm.plan.mesh}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    """Under torchrun: join the gloo group, run `worker`; a failure leaves a file saying whether
    it came while connecting (`connect-failed-rankN.txt`) or after (`failed-rankN.txt`)."""
    import logging
    import traceback

    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    rank = os.environ["RANK"]
    try:
        # a rank left waiting for a peer that died gives up within the test's own timeout
        dist.init_process_group("gloo", timeout=timedelta(seconds=LAUNCH_TIMEOUT_S))
    except BaseException:
        Path(args.out, f"connect-failed-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    try:
        worker(args.plan, args.out)
    except BaseException:
        Path(args.out, f"failed-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
