"""Experiment projects: code that only their configs name; the library never imports them.

A project's config sets ``config.task = "dpo_jax.proj.<name>.<module>:<function>"``
(``dpo_jax.tasks.get_task`` resolves it), so the library stays free of experiment code and an
experiment can change without touching it. This is big_vision's ``proj/`` convention, kept
inside the package so that ``python -m dpo_jax.main --config=configs/imdb.py`` works from any
directory after ``pip install -e .``.

* ``imdb`` -- the paper's controlled-sentiment experiment (Section 6.1, Figure 2 left).
"""
