"""Kill a run mid-training, the way a preempted job dies, for the exact-resume tests."""

import pytest


class Interrupted(Exception):
    pass


def train_until_killed(run, call: int) -> None:
    """Run ``run.train()`` and raise inside its ``call``-th train step dispatch (1-based), i.e.
    after ``call - 1`` steps; then close its checkpointer as a dying process would leave it."""
    original, calls = run._train_step, {"n": 0}

    def dying_step(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise Interrupted()
        return original(*args)

    run._train_step = dying_step
    with pytest.raises(Interrupted):
        run.train()
    run.checkpointer.close()
