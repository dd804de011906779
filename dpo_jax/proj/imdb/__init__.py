"""The IMDb controlled-sentiment experiment (paper Section 6.1), a project that only
``configs/imdb.py`` names (task ``dpo_jax.proj.imdb.pipeline:run_pipeline``).

* ``text``        reading the parquet shards, ``<br />`` cleaning
* ``sentiment``   offline ground-truth reward (hashed n-gram logistic regression) + hub variant
* ``tokenizer``   a small byte-level BPE trained on IMDb reviews
* ``pairs``       review prefixes (2-8 tokens) and reward-labelled preference pairs
* ``kl``          sequence-level KL(pi || pi_ref): Monte-Carlo estimate and exact enumeration
* ``frontier``    reward-vs-KL frontier CSV and PNG
* ``pipeline``    the stage runner and the stage order (``run_pipeline``)
* ``experiment``  what the stages share: config, workdir, tokenizer, reward, decoder, restore
* ``stages``      data stages (tokenizer, reward, SFT data, prefixes, samples, pairs)
* ``runs``        training runs (SFT, DPO, baselines, reward model, PPO, PPO-GT)
* ``evaluate``    sampling, frontier points, compute per method

Submodules are imported explicitly (``from dpo_jax.proj.imdb import sentiment``) so that
importing the package pulls in neither jax nor transformers.
"""
