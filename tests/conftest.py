"""Shared fixtures."""

import pytest


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP
    threads make such tests ~10x slower; run single-threaded and restore the setting afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The end-to-end files, longest first (seconds measured with -n 2 on the 2-core machine, session 7:
# 355, 268, 221, 77; test_dvc_docs.py 1020 alone on a machine loaded by others, session of issue 27; the whole rest of the suite is ~330).  `make test` runs `pytest -n 2 --dist
# loadfile --no-loadscope-reorder`: each file goes to one worker, in collection order (xdist's default
# reorder would put the files with the most tests first, and so these few-test files last), so
# starting these first keeps one long file from running alone at the end while the other worker idles.
# test_e2e_spread.py (two clones, two one-model experiments side by side, then gather and reruns) is
# placed before the resume file; it was first timed on a machine at load 15-19, not idle (see its docstring).
LONGEST_FIRST = ("test_dvc_docs.py", "test_e2e_repro.py", "test_e2e_queue.py", "test_e2e_mlflow_server.py", "test_e2e_spread.py",
                 "test_e2e_resume.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)        # stable: within a file, and among the other files, the order is unchanged
