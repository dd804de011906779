"""Exact resume and everything around it (dpo_jax/loop.py, workdir.py, checkpoint.py, metrics.py):
interrupted at several moments, every task ends with the uninterrupted run's parameters and
metric log; finished runs are reported, not retrained; damaged checkpoints are walked past;
a changed config is refused; one run per workdir; non-finite steps never reach a checkpoint."""

import glob
import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
import threading

import pytest

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import loop
from dpo_jax import workdir as workdir_lib
from tests import helpers, runs

# ------------------------------------------------------------------ helpers


def tensorboard_steps(workdir, tag="loss") -> list[int]:
    """Steps of ``tag`` in all TensorBoard event files under ``workdir/tb`` (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc; payload = an Event proto)."""
    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.*"))):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


@pytest.fixture(scope="module")
def dpo_full(tmp_path_factory):
    """The uninterrupted reference run: 6 steps, async checkpoints every 2."""
    workdir = tmp_path_factory.mktemp("full")
    config = runs.dpo_config(steps=6, checkpoint_every=2, async_checkpointing=True,
                             keep_checkpoints=5)
    summary = runs.run(config, workdir)
    return config, workdir, summary


# ------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("interrupt_after", [
    1,  # before the first checkpoint: the rerun starts over, its log must not repeat steps
    3,  # one step after an asynchronous checkpoint write began
    pytest.param(6, marks=pytest.mark.slow),  # after the last step, before its checkpoint
])
def test_interrupted_dpo_run_ends_as_the_uninterrupted_one(dpo_full, tmp_path, interrupt_after):
    config, full_dir, full_summary = dpo_full
    with pytest.raises(loop.Interrupted):
        runs.run(config, tmp_path, interrupt_after=interrupt_after)
    # The crash leaves every earlier step logged: at 6 that includes step 5, past the newest
    # checkpoint (4), which the rerun must cut.
    assert [r["step"] for r in runs.records(tmp_path) if "loss" in r] == list(
        range(1, interrupt_after))
    summary = runs.run(config, tmp_path)
    assert summary["resumed_from"] == {1: 0, 3: 2, 6: 4}[interrupt_after]
    want = runs.assert_same_run(config, tmp_path, full_dir)
    assert tensorboard_steps(tmp_path) == [r["step"] for r in want if "loss" in r]
    assert summary["final_train"]["loss"] == full_summary["final_train"]["loss"]


@pytest.mark.parametrize("task", helpers.fast_cases(["sft", "reward", "ppo"], {"sft"}))
def test_every_task_resumes_exactly(tmp_path, task):
    """Killed right after the checkpoint at step 2 (PPO: with its adaptive KL coefficient, saved
    as its own checkpoint item), the rerun crosses an epoch boundary and ends with the
    uninterrupted run's params and log."""
    config = runs.CONFIGS[task](steps=4, checkpoint_every=2)
    config.data.synthetic.num_train = 48  # 3 batches per epoch: the resumed run crosses one
    _, _, want = runs.resume_matches_full_run(config, tmp_path, interrupt_after=3, resumed_from=2)
    if task == "ppo":
        coefs = [r["objective/kl_coef"] for r in want]
        assert len(set(coefs)) == len(coefs), coefs  # the controller moved every iteration


def test_a_finished_workdir_is_reported_not_retrained(dpo_full):
    config, workdir, summary = dpo_full
    before = runs.records(workdir)
    again = runs.run(config, workdir)
    assert again == summary and again["finished"] and again["final_eval"] == summary["final_eval"]
    assert runs.records(workdir) == before
    assert json.load(open(os.path.join(workdir, "summary.json"))) == summary


# ------------------------------------------------------------------ damaged checkpoints


def _damage(step_dir, how):
    files = sorted(p for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
                   if os.path.isfile(p))
    if how == "truncate_all":
        for p in files:
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) // 2)
    elif how == "delete_params":
        shutil.rmtree(os.path.join(step_dir, "params"))
    elif how == "empty_step_dir":
        for p in os.listdir(step_dir):
            full = os.path.join(step_dir, p)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    elif how == "torn_async_write":  # killed mid-write: orbax's temporary directory is left
        os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp-1700000000")
        return
    elif how == "garbage_data_item":
        for p in files:
            if os.sep + "data" + os.sep in p:
                with open(p, "w") as f:
                    f.write("{not json")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", helpers.fast_cases(
    ["truncate_all", "delete_params", "empty_step_dir", "garbage_data_item", "torn_async_write"],
    {"truncate_all"}))
def test_a_damaged_newest_checkpoint_is_walked_past(dpo_full, tmp_path, how, caplog):
    config, full_dir, _ = dpo_full
    with pytest.raises(loop.Interrupted):
        runs.run(config, tmp_path, interrupt_after=5)  # checkpoints at 2 and 4
    _damage(os.path.join(tmp_path, "checkpoints", "4"), how)
    summary = runs.run(config, tmp_path)
    assert summary["resumed_from"] == 2
    if how != "torn_async_write":  # an unfinished write is not a checkpoint: nothing to report
        assert any("checkpoint step 4" in r.getMessage() and "does not restore" in r.getMessage()
                   for r in caplog.records)
        assert os.path.isdir(os.path.join(tmp_path, "checkpoints.damaged", "4"))  # kept
    runs.assert_same_params(runs.final_params(config, tmp_path),
                            runs.final_params(config, full_dir))


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path):
    config = runs.dpo_config(steps=3, checkpoint_every=1, keep_checkpoints=3)
    with pytest.raises(loop.Interrupted):
        runs.run(config, tmp_path, interrupt_after=3)
    for step in ("1", "2"):
        _damage(os.path.join(tmp_path, "checkpoints", step), "delete_params")
    with pytest.raises(ckpt_lib.CheckpointError, match=str(tmp_path / "checkpoints")):
        runs.run(config, tmp_path)


# ------------------------------------------------------------------ config and lock


def test_a_changed_config_is_refused_before_anything_is_written(tmp_path):
    config = runs.dpo_config(steps=4, checkpoint_every=2)
    with pytest.raises(loop.Interrupted):
        runs.run(config, tmp_path, interrupt_after=3)
    saved = open(tmp_path / "config.json").read()
    changed = runs.dpo_config(steps=4, checkpoint_every=2)
    changed.loss.beta = 0.5
    changed.train.batch_size = 32
    with pytest.raises(workdir_lib.WorkdirError) as e:
        runs.run(changed, tmp_path)
    assert "loss.beta: 0.1 -> 0.5" in str(e.value) and "train.batch_size: 16 -> 32" in str(e.value)
    assert open(tmp_path / "config.json").read() == saved
    # A safe field changes only when named; the change is recorded.
    longer = runs.dpo_config(steps=6, checkpoint_every=2)
    with pytest.raises(workdir_lib.WorkdirError, match="allow_resume_changes"):
        runs.run(longer, tmp_path)
    longer.allow_resume_changes = "train.steps"
    summary = runs.run(longer, tmp_path)
    assert summary["steps"] == 6 and summary["resumed_from"] == 2
    history = [json.loads(x) for x in open(tmp_path / "config_history.jsonl")]
    assert history[-1]["changes"] == {"train.steps": [4, 6]}
    assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 6


def test_run_length_is_not_safe_to_change_under_a_decaying_schedule(tmp_path):
    config = runs.dpo_config(steps=4, checkpoint_every=2)
    config.optim.schedule = "cosine"
    with pytest.raises(loop.Interrupted):
        runs.run(config, tmp_path, interrupt_after=3)
    config.train.steps = 6
    config.allow_resume_changes = "train.steps"
    with pytest.raises(workdir_lib.WorkdirError, match="cosine learning-rate schedule"):
        runs.run(config, tmp_path)


def _open_elsewhere(workdir, **train) -> str:
    """What another process gets when it opens ``workdir`` with ``runs.dpo_config(**train)``:
    'opened' or the error message."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys; from dpo_jax import workdir as w; from tests import runs\n"
            "config = w.resolve_defaults(runs.dpo_config(**json.loads(sys.argv[2])))[0]\n"
            "try:\n    with w.open_run(config, sys.argv[1]): print('opened')\n"
            "except w.WorkdirError as e: print(e)")
    done = subprocess.run([sys.executable, "-c", code, str(workdir), json.dumps(train)],
                          cwd=repo, text=True,
                          capture_output=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=repo, XLA_FLAGS=""))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_one_run_per_workdir_reentrant_in_its_thread_and_a_dead_holder_does_not_block(
        tmp_path):
    config = runs.dpo_config()
    with workdir_lib.open_run(config, str(tmp_path)):
        with workdir_lib.open_run(config, str(tmp_path)) as inner:  # same thread: re-entered
            assert inner.path == str(tmp_path)
        # the inner exit kept the lock: another process and another thread are still refused
        assert f"in use by pid {os.getpid()}" in _open_elsewhere(tmp_path)
        refused = []

        def other_thread():
            try:
                with workdir_lib.open_run(config, str(tmp_path)):
                    pass
            except workdir_lib.WorkdirError as e:
                refused.append(str(e))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(refused) == 1 and "another thread of this process" in refused[0]
    # The holder's record stays in the file after it ends; it does not block the next run.
    assert json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    assert _open_elsewhere(tmp_path).strip() == "opened"
    with workdir_lib.open_run(config, str(tmp_path)) as run:
        assert not run.finished


@workdir_lib.opens_workdir
def _task_calling_a_task(config, run, *, seen):
    """A task whose body runs the DPO task on its own workdir and then a reward-model task in a
    subdirectory, checking that its workdir stays locked against other processes."""
    first = runs.run(config, run.path)
    seen.append(_open_elsewhere(run.path))
    reward = runs.dpo_config(steps=2)
    reward.task = "reward"
    second = runs.run(reward, os.path.join(run.path, "reward"))
    return {"dpo": first, "reward": second}


@pytest.mark.slow  # the lock's re-entrancy itself is in the fast suite (test above)
def test_a_task_calls_another_task_in_process(tmp_path):
    """Tasks compose: the outer task's workdir lock is re-entered by the DPO task it calls (it
    was refused with 'in use by pid <own pid>'), still refused to a second process while held,
    and released at the end. The task function's signature says what it is called with."""
    assert list(inspect.signature(_task_calling_a_task).parameters) == ["config", "workdir",
                                                                      "seen"]
    assert list(inspect.signature(runs.get_task("dpo")).parameters)[:2] == ["config",
                                                                           "workdir"]
    assert list(inspect.signature(_task_calling_a_task.in_run).parameters)[:2] == ["config",
                                                                                   "run"]
    config = runs.dpo_config(steps=2)
    seen = []
    summary = _task_calling_a_task(config, str(tmp_path), seen=seen)
    assert summary["dpo"]["finished"] and summary["reward"]["finished"]
    assert summary["dpo"]["final_train"]["loss"] > 0
    assert len(seen) == 1 and f"in use by pid {os.getpid()}" in seen[0]
    assert [r["step"] for r in runs.records(tmp_path)] == [1, 2]
    assert _open_elsewhere(tmp_path, steps=2).strip() == "opened"


# ------------------------------------------------------------------ non-finite steps


@pytest.mark.parametrize("lr,checkpoint_every,message", [
    (1e38, 0, "step 2: non-finite loss, gradient"),  # params huge after step 1, NaN loss at 2
    pytest.param(1e39, 1, "step 1: non-finite",  # lr = inf in float32: step 1's updated params
                 marks=pytest.mark.slow),
])
def test_a_non_finite_step_stops_the_run_and_is_never_checkpointed(tmp_path, lr,
                                                                   checkpoint_every, message):
    config = runs.dpo_config(steps=4, checkpoint_every=checkpoint_every, keep_checkpoints=5)
    config.optim.name = "sgd"
    config.optim.lr = lr
    config.optim.max_grad_norm = 0.0
    config.optim.warmup_steps = 0
    with pytest.raises(loop.NonFiniteError, match=message):
        runs.run(config, tmp_path)
    assert not glob.glob(os.path.join(tmp_path, "checkpoints", "[0-9]*"))
    assert [r["step"] for r in runs.records(tmp_path)] == ([1, 2] if checkpoint_every == 0 else [1])


def test_on_nonfinite_skip_drops_the_update_and_counts_it(tmp_path):
    config = runs.dpo_config(steps=3)
    config.optim.name = "sgd"
    config.optim.warmup_steps = 0
    config.optim.max_grad_norm = 0.0
    config.optim.lr = 1e39  # inf in float32: every update makes the parameters non-finite
    config.train.on_nonfinite = "skip"
    summary = runs.run(config, tmp_path)
    assert summary["skipped_updates"] == 3
    recs = runs.records(tmp_path)
    assert all(r["nonfinite"] == 1.0 for r in recs)
    assert all(r["lr"] == float("inf") for r in recs)  # non-finite values stay visible
    init = runs.final_params(config, tmp_path)  # unchanged from the seeded init
    from dpo_jax.models import Model, model_config_from
    import jax

    model = Model(model_config_from(config.model))
    runs.assert_same_params(init, jax.jit(model.init)(jax.random.key(config.seed)))


def test_logged_records_are_interval_means_and_survive_a_resume_mid_interval(dpo_full, tmp_path):
    """log_every=3 records the mean of the three steps' metrics (as TRL logs); killed after the
    checkpoint at step 2 (mid-interval), the rerun logs the same means."""
    config, full_dir, _ = dpo_full
    every_step = [r for r in runs.records(full_dir) if "loss" in r]
    config3 = runs.dpo_config(steps=6, checkpoint_every=2, async_checkpointing=True,
                              keep_checkpoints=5, log_every=3)
    summary = runs.cut_and_resume(config3, tmp_path, interrupt_after=3)
    assert summary["resumed_from"] == 2
    got = [r for r in runs.records(tmp_path) if "loss" in r]
    assert [r["step"] for r in got] == [3, 6]
    for rec, window in zip(got, (every_step[0:3], every_step[3:6])):
        for k in ("loss", "grad_norm", "rewards/margins"):
            assert rec[k] == pytest.approx(sum(w[k] for w in window) / 3, rel=1e-6), k


@pytest.mark.slow  # the suite's 8-minute budget: a sibling test covers the kind
def test_kill_9_before_the_first_checkpoint_and_a_second_process_on_the_workdir(tmp_path):
    """Real processes (``python -m dpo_jax.main``): a second run on the same workdir is refused
    at once naming the holder; the first, killed with SIGKILL before its first checkpoint, leaves
    a log that the rerun (here shortened: nothing to resume, so it starts over) replaces: every
    step exactly once, in the JSONL and in TensorBoard."""
    import signal
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def command(steps):
        return [sys.executable, "-m", "dpo_jax.main", "--config=configs/default.py",
                f"--workdir={tmp_path}", f"--config.train.steps={steps}",
                "--config.train.log_every=1", "--config.train.eval_every=0",
                "--config.train.checkpoint_every=0", "--config.train.batch_size=8",
                "--config.model.overrides.n_layer=1", "--config.model.overrides.d_model=32",
                "--config.model.overrides.d_ff=64", "--config.data.synthetic.num_train=64"]

    env = dict(os.environ, XLA_FLAGS="")
    first = subprocess.Popen(command(10**6), cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    for line in first.stderr:
        if "step 5/" in line or time.time() > deadline:
            break
    second = subprocess.run(command(10**6), cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert second.returncode != 0 and f"in use by pid {first.pid}" in second.stderr, \
        second.stderr[-2000:]
    logged = [r["step"] for r in runs.records(tmp_path)]
    assert len(logged) >= 5 and logged == list(range(1, len(logged) + 1))
    done = subprocess.run(command(30), cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in runs.records(tmp_path)] == list(range(1, 31))
    assert tensorboard_steps(tmp_path) == list(range(1, 31))
    history = [json.loads(x) for x in open(tmp_path / "config_history.jsonl")]
    assert history[-1]["event"] == "restart (no checkpoint to resume)"


def test_a_field_added_to_the_schema_at_its_default_is_not_a_change():
    old = workdir_lib.config_dict(runs.dpo_config())
    del old["train"]["on_nonfinite"]  # a workdir written before the field existed
    new = runs.dpo_config()
    assert workdir_lib.config_changes(old, workdir_lib.config_dict(new)) == {}
    new.train.on_nonfinite = "skip"
    assert workdir_lib.config_changes(old, workdir_lib.config_dict(new)) == {
        "train.on_nonfinite": ("<absent>", "skip")}
