"""Two nodes under torchrun's c10d rendezvous train one model as one process on the union of the batch.

Two ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``
agents stand for two machines (gloo on the CPU).  Each process then has ``LOCAL_RANK`` 0 but global
``RANK`` 0 and 1, which is what a single-node run never shows: the device must come from
``LOCAL_RANK``, the data shard and the view generator from the global rank, and only global rank 0
may write.  Each "node" is given its own output folder (a per-node filesystem), so the test also
sees that node 1 writes nothing.  The comparison is ``tests/test_ddp.py``'s (same recording worker,
same neutralised BatchNorm and views, same tolerances), run here for MoCo, whose queue also checks
that the keys are gathered across nodes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.test_ddp import WORLD, _free_port, assert_ranks_equal_one_process

ROOT = Path(__file__).resolve().parents[1]
METHOD = "moco"


def test_two_torchrun_nodes_equal_one_process_on_the_union_of_the_batch(tmp_path, monkeypatch, one_thread):
    record = tmp_path / "record"
    record.mkdir()
    script = tmp_path / "node.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_ddp import record_rank_run
        node = os.environ["NODE"]
        record_rank_run({METHOD!r}, Path({str(record)!r}), Path({str(tmp_path)!r}) / ("node" + node) / "out")
    """))
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    port = _free_port()
    procs = []
    for node in range(WORLD):
        (tmp_path / f"node{node}").mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(WORLD), "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "test-multinode", str(script)]
        procs.append(subprocess.Popen(cmd, env={**env, "NODE": str(node)}, cwd=tmp_path / f"node{node}",
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"

    ranks = {r: __import__("torch").load(record / f"{METHOD}-rank{r}.pt", weights_only=False) for r in range(WORLD)}
    assert [ranks[r]["local_rank"] for r in range(WORLD)] == [0, 0], "each node has one process: LOCAL_RANK 0"
    # c10d assigns the global ranks; whichever node got rank 0 holds every file, the other none
    written = {node: sorted(p.relative_to(tmp_path / f"node{node}") for p in (tmp_path / f"node{node}").rglob("*")
                            if p.is_file()) for node in range(WORLD)}
    main = [node for node, files in written.items() if files]
    assert len(main) == 1, f"exactly one node (global rank 0) writes: {written}"
    assert written[1 - main[0]] == [], written
    assert_ranks_equal_one_process(record, tmp_path / f"node{main[0]}" / "out", METHOD, tmp_path / "single",
                                   monkeypatch)
