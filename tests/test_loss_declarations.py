"""The loss declarations (losses/spec.py) and what is generated from them (issue 29).

The expected name sets, option readers and schema keys below are written out by hand from the
papers / TRL (the tables the package kept by hand before the declarations existed), so a
declaration that drifts (a loss losing its reference flag, an option read by the wrong loss)
fails here; docs/losses.md's generated tables must equal `losses.docs.tables()`.
"""

import pathlib

import pytest

from dpo_jax import losses
from dpo_jax.losses import docs, spec

PAIR_NAMES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
              "sigmoid_norm", "sft", "simpo", "orpo", "rpo", "rdpo", "dpop")
F_LOSSES = {"sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"}
USERS = {
    "label_smoothing": {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"},
    "reference_free": {"sigmoid"},
    "ipo_logps": {"ipo"},
    "simpo_gamma": {"simpo"},
    "rpo_alpha": {"rpo"},
    "rdpo_alpha": {"rdpo"},
    "discopop_tau": {"discopop"},
    "dpop_lambda": {"dpop"},
    "f_divergence_type": F_LOSSES,
    "f_alpha_divergence_coef": F_LOSSES,
    "pl_top_k": {"plackett_luce"},
    "desirable_weight": {"kto"},
    "undesirable_weight": {"kto"},
}
# The keys of a run's config.json `loss` block (unchanged by the declarations).
SCHEMA_KEYS = {"name", "weights", "beta", "label_smoothing", "reference_free", "ipo_logps",
               "simpo_gamma", "rpo_alpha", "rdpo_alpha", "discopop_tau", "dpop_lambda",
               "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "ld_alpha",
               "pl_top_k", "desirable_weight", "undesirable_weight", "router_aux_loss_coef"}


def test_name_sets_are_derived_from_the_declarations():
    assert losses.LOSS_NAMES == PAIR_NAMES
    assert losses.LIST_LOSS_NAMES == ("plackett_luce",)
    assert losses.UNPAIRED_LOSS_NAMES == ("kto",)
    assert losses.ALL_LOSS_NAMES == PAIR_NAMES + ("plackett_luce", "kto")
    assert losses.REFERENCE_FREE_LOSSES == {"simpo", "orpo", "sft"}
    assert losses.F_DIVERGENCE_LOSSES == F_LOSSES
    assert losses.config.BATCH_STATISTIC_LOSSES == {"bco_pair", "aot", "aot_unpaired", "kto"}
    assert {k: set(v) for k, v in losses.OPTION_USERS.items()} == USERS


def test_schema_keys_and_placeholders():
    cfg = losses.default_loss_config()
    assert set(cfg.keys()) == SCHEMA_KEYS
    assert (cfg.name, cfg.beta, cfg.router_aux_loss_coef) == ("sigmoid", 0.1, None)
    cfg.simpo_gamma = 1  # typed placeholders: an int is accepted for a float ...
    with pytest.raises(TypeError):
        cfg.pl_top_k = "two"  # ... a string is not an int


@pytest.mark.parametrize("name,option", sorted((n, o) for o, us in USERS.items() for n in us))
def test_every_declared_option_is_read_by_exactly_its_losses(name, option):
    # Set on a loss that reads it: accepted. On every loss that does not: refused, naming it.
    value = {"reference_free": True, "ipo_logps": "sum", "f_divergence_type": "forward_kl",
             "pl_top_k": 2}.get(option, 0.25)
    extra = {"f_divergence_type": "alpha_divergence"} if option == "f_alpha_divergence_coef" else {}
    cfg = losses.loss_config_from({"name": name, option: value, **extra})
    assert getattr(cfg, option) == value
    for other in losses.ALL_LOSS_NAMES:
        if other in USERS[option]:
            continue
        with pytest.raises(ValueError, match=f"loss.{option}.*unused.*{other}.*read only by"):
            losses.loss_config_from({"name": other, option: value,
                                     **({"rdpo_alpha": 0.01} if other == "rdpo" else {})})


def test_resolved_defaults():
    cfg = losses.loss_config_from({"name": "sigmoid"})
    assert (cfg.label_smoothing, cfg.reference_free, cfg.ipo_logps, cfg.simpo_gamma,
            cfg.rpo_alpha, cfg.rdpo_alpha, cfg.discopop_tau, cfg.dpop_lambda,
            cfg.f_divergence_type, cfg.f_alpha_divergence_coef, cfg.use_weighting, cfg.ld_alpha,
            cfg.pl_top_k, cfg.desirable_weight, cfg.undesirable_weight,
            cfg.router_aux_loss_coef) == (None, False, "average", 0.5, 1.0, None, 0.05, 50.0,
                                          "reverse_kl", 0.5, False, None, None, 1.0, 1.0, None)
    with pytest.raises(AttributeError, match="no option 'simpo_gama'"):
        cfg.simpo_gama  # noqa: B018  (a typo is an error, not None)


def test_equal_configs_are_equal_and_hash_alike():
    a = losses.loss_config_from({"name": "ipo", "ipo_logps": "sum"})
    b = losses.loss_config_from({"name": "ipo", "ipo_logps": "sum", "beta": 0.1})
    c = losses.loss_config_from({"name": "ipo"})
    assert a == b and hash(a) == hash(b) and a != c


@pytest.mark.parametrize("option,value,match", [
    (spec.Option("x", float, None, "d", low=0.0, high=1.0, high_open=True), 1.0,
     r"loss.x must be in \[0, 1\), got 1.0"),
    (spec.Option("x", float, None, "d", low=-2.0, low_open=True), -2.0, "loss.x must be > -2"),
    (spec.Option("x", float, None, "d", high=3.0), 3.5, "loss.x must be <= 3, got 3.5"),
    (spec.Option("x", float, None, "d"), "abc", "loss.x must be a number, got 'abc'"),
    (spec.Option("x", float, None, "d"), float("-inf"), "loss.x must be finite"),
    (spec.Option("x", int, None, "d", low=2), 1, "loss.x must be an int >= 2, got 1"),
    (spec.Option("x", int, None, "d", low=2), True, "must be an int >= 2, got True"),
    (spec.Option("x", int, None, "d", low=2), 2.0, "must be an int >= 2, got 2.0"),
    (spec.Option("x", bool, False, "d"), 0, "loss.x must be a bool, got 0"),
    (spec.Option("x", str, "a", "d", choices=("a", "b")), "c", "loss.x='c': expected one of a, b"),
    (spec.Option("x", float, 0.1, "d", fixed=True), None, "loss.x must be a number, got None"),
])
def test_option_ranges_name_the_field_and_the_values_that_work(option, value, match):
    with pytest.raises(ValueError, match=match):
        option.resolve(value)


def test_option_resolution():
    assert spec.Option("x", float, 0.5, "d", low=0.0).resolve(None) == 0.5
    assert spec.Option("x", float, 0.5, "d", low=0.0).resolve(0) == 0.0
    assert spec.Option("x", float, None, "d", low=0.0, high=1.0).resolve(1) == 1.0
    assert spec.Option("x", int, None, "d", low=1).resolve(None) is None
    assert spec.Option("x", str, "a", "d", choices=("a", "b")).resolve("b") == "b"


def test_required_option_names_the_loss_and_why():
    with pytest.raises(ValueError, match="loss 'rdpo' needs loss.rdpo_alpha.*no safe default"):
        losses.loss_config_from({"name": "sft,rdpo"})


def test_needs_reference_and_batch_statistics_follow_the_declarations():
    for s in losses.specs():
        opts = {"rdpo_alpha": 0.01} if s.name == "rdpo" else {}
        cfg = losses.loss_config_from({"name": s.name, **opts})
        assert losses.needs_reference(cfg) is s.reference
        assert losses.uses_batch_statistics(cfg) is s.batch_statistic
    assert not losses.needs_reference(
        losses.loss_config_from({"name": "sigmoid", "reference_free": True}))
    assert losses.needs_reference(losses.loss_config_from({"name": "sft,sigmoid"}))


def test_declaration_errors():
    with pytest.raises(ValueError, match="'sigmoid' is declared twice"):
        spec.declare(spec.LossSpec("sigmoid", fn=lambda c: None))
    with pytest.raises(ValueError, match="kind 'tree'"):
        spec.declare(spec.LossSpec("toy", fn=lambda c: None, kind="tree"))
    with pytest.raises(ValueError, match="pair loss 'toy' needs a function"):
        spec.declare(spec.LossSpec("toy", fn=None))
    copy = spec.Option("label_smoothing", float, None, "another ε", low=0.0)
    with pytest.raises(ValueError, match="'label_smoothing' is already declared differently"):
        spec.declare(spec.LossSpec("toy", fn=lambda c: None, options=(copy,)))
    with pytest.raises(ValueError, match="'beta' is already declared"):
        spec.declare(spec.LossSpec("toy", fn=lambda c: None,
                                   options=(spec.Option("beta", float, 1.0, "d"),)))
    with pytest.raises(ValueError, match="reference_free_with='free'"):
        spec.declare(spec.LossSpec("toy", fn=lambda c: None, reference_free_with="free"))
    assert "toy" not in losses.ALL_LOSS_NAMES and "toy" not in {s.name for s in spec.specs()}


def test_docs_tables_are_generated_from_the_declarations():
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    assert docs.generated_part(text) == docs.tables(), (
        "docs/losses.md is stale: run `python -m dpo_jax.losses.docs`")
    table = docs.tables()
    for s in losses.specs():  # one row per loss, one per option
        assert table.count(f"\n| `{s.name}` |") == 1, s.name
    for name in SCHEMA_KEYS:
        assert table.count(f"\n| `{name}` |") == 1, name
    assert "| `sigmoid` | pairs | yes (no with `reference_free=True`) | no |" in table
    assert "| `kto` | unpaired completions (data.format='unpaired') | yes | yes |" in table
    assert ("| `label_smoothing` | float | None (0; EXO 1e-3) | in [0, 0.5) | `sigmoid`, "
            "`exo_pair`, `robust`, `aot`, `aot_unpaired` |") in table
