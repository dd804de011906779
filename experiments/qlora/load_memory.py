"""Peak host memory of building a QLoRA run's quantised base from an HF checkpoint: the float
tree loaded whole and then quantised (``whole``: what ``state.setup`` did before), against
quantising each weight layer by layer as the safetensors are read (``layers``:
``hf.load_hf_quantized``, what ``state.init_base`` does now).

    python experiments/qlora/load_memory.py [--path=DIR] [--kinds=nf4,int8]
        [--dtypes=bfloat16,float32] [--random]

Each measurement is a fresh subprocess (``--child``) that imports jax, initialises the CPU
backend, builds the base (and waits for it), and reports:

* ``anon_peak_mb``: the peak of its anonymous resident memory (``RssAnon`` of
  /proc/self/status, sampled every 2 ms by a thread): the memory the process holds itself;
* ``hwm_mb``: the kernel's high-water mark of the whole resident set (``VmHWM``, =
  ``ru_maxrss``), which also counts the pages of the safetensors files mapped by
  ``safe_open`` and touched while reading (clean, file-backed, reclaimable);
* ``anon_start_mb``: RssAnon after importing jax and before reading (so ``anon_peak_mb -
  anon_start_mb`` is what building the base added);
* ``base_mb``: the bytes of the built base's arrays.

``--path`` (default: SmolLM2-135M-Instruct's directory, ``bash ../shared/models/smollm2.sh``);
``--random`` also writes and measures a random Llama-shaped float32 checkpoint (d_model 1024,
16 layers, d_ff 4096, vocab 32000, untied: 317M parameters, 1.27 GB) in a temporary
directory.
Prints one JSON line per measurement. Numbers: experiments/qlora/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def write_random_checkpoint(path: str, *, d_model: int, n_layer: int, d_ff: int,
                            vocab: int) -> str:
    """A random Llama-shaped checkpoint (float32, untied head; normal weights std 0.02) as an HF
    directory (config.json + model.safetensors) at ``path``; returns ``path``."""
    import numpy as np
    from safetensors.numpy import save_file

    from dpo_jax.models import hf_maps, preset
    from dpo_jax.models.hf_config import model_config_to_hf

    cfg = preset("tiny-llama", d_model=d_model, n_layer=n_layer, d_ff=d_ff, vocab_size=vocab,
                 n_head=d_model // 64, n_kv_head=d_model // 128, head_dim=64,
                 tie_embeddings=False, param_dtype="float32")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model_config_to_hf(cfg), f)
    rng = np.random.default_rng(0)
    prefix = hf_maps.FAMILY_MAPS[cfg.family][1][0]
    tensors = {}
    for t in hf_maps.tensor_specs(cfg):
        for i in range(cfg.n_layer) if t.layered else [None]:
            w = rng.standard_normal(t.shape, np.float32) * np.float32(0.02)
            if "norm" in t.name:
                w = np.ones(t.shape, np.float32)
            tensors[hf_maps.full_name(t.name, prefix, i, None)] = w
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def child(path: str, kind: str, mode: str, dtype: str) -> dict:
    """Build the base in this process (see the module docstring) and return the numbers."""
    import jax

    from dpo_jax.models import hf, load_hf_config, quant

    jax.numpy.zeros(1).block_until_ready()  # the backend up before the baseline
    cfg = load_hf_config(path, param_dtype=dtype, dtype=dtype)
    start = _status_mb("RssAnon")
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_mb("RssAnon"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    if mode == "whole":
        params = hf.load_hf_params(path, cfg)
        base = jax.jit(lambda p: quant.quantize_tree(cfg, kind, p))(params)
        jax.block_until_ready(base)
        del params
    elif mode == "layers":
        base = hf.load_hf_quantized(path, cfg, kind)
        jax.block_until_ready(base)
    else:
        raise ValueError(f"--mode={mode!r}: expected 'whole' or 'layers'")
    seconds = time.time() - t0
    done.set()
    thread.join()
    peak[0] = max(peak[0], _status_mb("RssAnon"))
    return {"path": os.path.basename(os.path.normpath(path)), "kind": kind, "mode": mode,
            "param_dtype": dtype, "anon_start_mb": round(start, 1),
            "anon_peak_mb": round(peak[0], 1), "added_mb": round(peak[0] - start, 1),
            "hwm_mb": round(_status_mb("VmHWM"), 1),
            "base_mb": round(sum(x.nbytes for x in jax.tree.leaves(base)) / 2 ** 20, 1),
            "seconds": round(seconds, 1)}


def peak_rss(path: str, kind: str, mode: str, dtype: str = "float32") -> dict:
    """:func:`child`'s numbers from a fresh subprocess."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", f"--path={path}",
                          f"--kinds={kind}", f"--mode={mode}", f"--dtypes={dtype}"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--path", default="")
    p.add_argument("--kinds", default="nf4,int8")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--mode", default="")
    p.add_argument("--random", action="store_true")
    p.add_argument("--child", action="store_true")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.path, a.kinds, a.mode, a.dtypes)))
        return
    from dpo_jax.models.local import SMOLLM2, find_local_model

    paths = [(a.path or find_local_model(SMOLLM2), a.dtypes.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        if a.random:
            paths.append((write_random_checkpoint(os.path.join(tmp, "random-llama-317m"),
                                                  d_model=1024, n_layer=16, d_ff=4096,
                                                  vocab=32000), ["float32"]))
        for path, dtypes in paths:
            if path is None:
                raise FileNotFoundError(f"{SMOLLM2} not found (bash ../shared/models/smollm2.sh)")
            for dtype in dtypes:
                for kind in a.kinds.split(","):
                    for mode in ("whole", "layers"):
                        print(json.dumps(peak_rss(path, kind, mode, dtype)), flush=True)


if __name__ == "__main__":
    main()
