"""``python -m dpo_jax.data`` prints marked examples and stats for a run config file."""

import json
import subprocess
import sys
import textwrap


def test_cli_on_generic_config(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}: hi? ", "chosen": "yes", "rejected": "no"})
                              for i in range(6)))
    tok_dir = tmp_path / "tok"
    cfg = tmp_path / "cfg.py"
    cfg.write_text(textwrap.dedent(f"""
        import ml_collections
        from dpo_jax.data import default_data_config
        def get_config():
            c = ml_collections.ConfigDict()
            c.data = default_data_config()
            c.data.source = "generic"
            c.data.path = {str(data)!r}
            c.data.tokenizer = {str(tok_dir)!r}
            c.data.eval_split = ""
            c.data.eval_size = 2
            return c
    """))
    subprocess.run([sys.executable, "-c", "from dpo_jax.data.testing import gpt2_style_tokenizer;"
                    f"gpt2_style_tokenizer().save_pretrained({str(tok_dir)!r})"], check=True,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-m", "dpo_jax.data", f"--config={cfg}",
                          "--batch_size=2", "--config.data.max_length=64",
                          "--config.data.max_prompt_length=32"],
                         capture_output=True, text=True, check=True).stdout
    assert "[PROMPT]" in out and "[CHOSEN]" in out and "R«" in out and "·×" in out
    assert '"num_pairs": 4' in out


def test_cli_shows_ranked_lists_and_unpaired_completions(tmp_path):
    outs = {}
    for fmt in ("ranked", "unpaired"):
        cfg = tmp_path / f"{fmt}.py"
        cfg.write_text(textwrap.dedent(f"""
            from dpo_jax.data import default_data_config
            def get_config():
                c = default_data_config()
                c.format = {fmt!r}
                return c
        """))
        outs[fmt] = subprocess.run([sys.executable, "-m", "dpo_jax.data", f"--config={cfg}",
                                    "--batch_size=4", "--num_examples=1"],
                                   capture_output=True, text=True, check=True).stdout
    ranked, unpaired = outs["ranked"], outs["unpaired"]
    assert "format=ranked" in ranked and "[RESPONSE 3, rank" in ranked
    assert "[RESPONSE 4" not in ranked and "[CHOSEN]" not in ranked
    assert "format=unpaired" in unpaired and "[COMPLETION]" in unpaired
    assert "[DESIRABLE]" in unpaired and "R«" in unpaired
