"""Names: grammar, round trips, the ACT2FN hook and its error messages."""

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import activations
from transformers.activations import ACT2FN

import hf_gemact
from hf_gemact import ActivationSpec, format_activation, parse_activation


@pytest.mark.parametrize("name,expected", [
    ("gem", hf_gemact.GEM(n=2)),
    ("gem_n1", hf_gemact.GEM(n=1)),
    ("gem_n2", hf_gemact.GEM(n=2)),
    ("gem_n3", hf_gemact.GEM(n=3)),
    ("egem", hf_gemact.GEM(n=2, eps=1e-4)),
    ("egem_n2_eps1e-4", hf_gemact.GEM(n=2, eps=1e-4)),
    ("egem_n1_eps0.0001", hf_gemact.GEM(n=1, eps=1e-4)),
    ("egem_n1_eps10", hf_gemact.GEM(n=1, eps=10.0)),
    ("segem", hf_gemact.GEM(n=2, eps=1e-4, a=0.01)),
    ("segem_n1_eps1e-4", hf_gemact.GEM(n=1, eps=1e-4, a=0.01)),
    ("segem_n1_eps1e-4_a0.05", hf_gemact.GEM(n=1, eps=1e-4, a=0.05)),
    ("velu", hf_gemact.VeLU()),
    ("velu_alpha2_beta11_beta20.7", hf_gemact.VeLU(alpha=2.0, beta1=1.0, beta2=0.7)),
    ("velu_ot0_dim1_mu1.5", hf_gemact.VeLU(lambda_ot=0.0, dim=1, mu=1.5)),
])
def test_names_resolve_through_act2fn(name, expected):
    assert name in ACT2FN
    for module in (ACT2FN[name], activations.get_activation(name), hf_gemact.make_activation(name)):
        assert type(module) is type(expected)
        assert module.extra_repr() == expected.extra_repr()
    assert ACT2FN[name] is not ACT2FN[name]  # a fresh module each time, like the built-ins


@pytest.mark.parametrize("name", hf_gemact.PRESETS + ("gem_n3", "egem_n2_eps1e-4", "segem_n1_eps1e-4_a0.05"))
def test_round_trip(name):
    spec = parse_activation(name)
    canonical = format_activation(spec)
    assert parse_activation(canonical) == spec
    assert format_activation(parse_activation(canonical)) == canonical
    assert "," not in canonical and "=" not in canonical


def test_canonical_names_are_short_and_equal_specs_compare_equal():
    assert format_activation(parse_activation("gem_n2")) == "gem"
    assert parse_activation("egem_n1_eps1e-4") == parse_activation("egem_n1_eps0.0001")
    assert format_activation(parse_activation("segem_a0.05_n1")) == "segem_n1_a0.05"


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda v: v != 0)


@settings(max_examples=200, deadline=None)
@given(
    family=st.sampled_from(["gem", "egem", "segem", "velu"]),
    n=st.integers(1, 12),
    eps=st.floats(min_value=1e-30, max_value=1e30),
    a=st.floats(min_value=0, max_value=10),
    alpha=finite, beta1=finite, mu=finite,
    dim=st.integers(-4, 4),
)
def test_round_trip_any_parameters(family, n, eps, a, alpha, beta1, mu, dim):
    fam = hf_gemact.FAMILIES[family]
    chosen = {"n": n, "eps": eps, "a": a, "alpha": alpha, "beta1": beta1, "mu": mu, "dim": dim}
    params = tuple((kw, chosen.get(kw, fam.defaults[kw])) for kw, _ in fam.keys.values())
    spec = ActivationSpec(family, params)
    name = format_activation(spec)
    assert parse_activation(name) == spec
    assert "," not in name and "=" not in name
    assert name in ACT2FN


@pytest.mark.parametrize("name,fragment", [
    ("gemm", "unknown family 'gemm'"),
    ("gem_x3", "malformed parameter 'x3'"),
    ("gem_n", "malformed parameter 'n'"),
    ("gem_eps1e-4", "malformed parameter 'eps1e-4'"),  # GEM has no eps: that is E-GEM
    ("egem_n1_n2", "given twice"),
    ("gem_n2.5", "n must be an integer"),
    ("gem_n0", "N must be an integer >= 1"),
    ("egem_eps0", "eps must be > 0"),
    ("egem_eps-1e-3", "eps must be > 0"),
    ("egem_eps1e999", "finite"),
    ("segem_a-1", "a must be >= 0"),
    ("velu_eps0", "eps must be > 0"),
    ("", "non-empty string"),
])
def test_bad_names_raise_with_the_name_and_the_grammar(name, fragment):
    for lookup in (parse_activation, ACT2FN.__getitem__, activations.get_activation):
        with pytest.raises((KeyError, ValueError)) as info:
            lookup(name)
        message = str(info.value)
        assert repr(name) in message and fragment in message
        assert "FAMILY(_KEYVALUE)*" in message and "segem" in message and "velu" in message
    assert name not in ACT2FN


def test_unknown_name_in_act2fn_also_lists_builtins():
    with pytest.raises(KeyError) as info:
        ACT2FN["swiglu_typo"]
    assert "gelu_new" in str(info.value) and "egem" in str(info.value)


def test_builtin_entries_are_untouched():
    code = (
        "from transformers.activations import ACT2FN\n"
        "before = {k: (v if isinstance(v, tuple) else (v, {})) for k, v in dict.items(ACT2FN)}\n"
        "before = {k: (c, sorted(kw.items())) for k, (c, kw) in before.items()}\n"
        "import hf_gemact\n"
        "after = {k: (v if isinstance(v, tuple) else (v, {})) for k, v in dict.items(ACT2FN)}\n"
        "after = {k: (c, sorted(kw.items())) for k, (c, kw) in after.items()}\n"
        "assert before == after, set(before) ^ set(after)\n"
        "for k in before: assert type(ACT2FN[k]) is before[k][0], k\n"
        "assert 'gem' in ACT2FN and 'gem' not in dict.keys(ACT2FN)\n"
        "print('ok', len(before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_import_is_idempotent():
    import importlib

    from hf_gemact import integration as registry  # install() moved from the registry (issue 15.3)

    registry.install()
    registry.install()
    importlib.reload(hf_gemact)
    assert type(ACT2FN["gem"]) is hf_gemact.GEM
    assert type(ACT2FN).__mro__.count(type(ACT2FN)) == 1
    assert [c.__name__ for c in type(ACT2FN).__mro__].count("GemactClassInstantier") == 1


def test_config_update_from_string_keeps_names_whole():
    from transformers import BertConfig

    config = BertConfig()
    config.update_from_string("hidden_act=segem_n1_eps1e-4_a0.05,hidden_size=64")
    assert config.hidden_act == "segem_n1_eps1e-4_a0.05" and config.hidden_size == 64
