"""The IMDb controlled-sentiment experiment (paper Section 6.1): self-contained pieces.

* ``text``       reading the parquet shards, ``<br />`` cleaning
* ``sentiment``  offline ground-truth reward (hashed n-gram logistic regression) + hub variant
* ``tokenizer``  a small byte-level BPE trained on IMDb reviews
* ``pairs``      review prefixes (2-8 tokens) and reward-labelled preference pairs
* ``kl``         sequence-level KL(pi || pi_ref): Monte-Carlo estimate and exact enumeration
* ``frontier``   reward-vs-KL frontier CSV and PNG

Submodules are imported explicitly (``from dpo_jax.imdb import sentiment``) so that importing the
package pulls in neither jax nor transformers.
"""
