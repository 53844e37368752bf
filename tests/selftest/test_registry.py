"""Registry, discovery of other packages' adapters, skip reasons, and adapter misbehaviour."""
import textwrap

import pytest
import torch

import conformance.registry as registry
from conformance import (Backend, BatchSpec, Capabilities, CaseSpec, Category, HeadConfig, MLABackend, MLAHeads,
                         RegistryError, Runner, Status, load_backends, register_backend)

SPEC = CaseSpec("t", BatchSpec([20, 9], [4, 1]), HeadConfig(4, 2, 16), torch.float16, 16)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


class Echo(Backend):
    """Returns the new values: a valid shape, wrong numbers."""
    name = "echo"

    def run(self, case):
        return case.out.zero_()


def test_decorator_and_instance_registration():
    @register_backend
    class Mine(Echo):
        name = "mine"

    register_backend(Echo())
    assert isinstance(registry._REGISTRY["mine"], Mine) and "echo" in registry._REGISTRY


@pytest.mark.parametrize("name", ["", "has space", "semi;colon"])
def test_bad_names_are_refused(name):
    with pytest.raises(RegistryError, match="backend name = .*letters, digits"):
        register_backend(type("B", (Echo,), {"name": name}))


def test_a_name_cannot_be_taken_by_another_class():
    register_backend(Echo)
    with pytest.raises(RegistryError, match="'echo': already registered by Echo"):
        register_backend(type("Other", (Echo,), {}))
    with pytest.raises(RegistryError, match="must be a Backend"):
        register_backend(object())


@pytest.mark.parametrize("caps, reason", [
    (Capabilities(devices=frozenset({"cuda"})), "device cpu not supported (supports: cuda)"),
    (Capabilities(dtypes=frozenset({torch.bfloat16})), "dtype fp16 not supported (supports: bf16)"),
    (Capabilities(head_dims=frozenset({64, 128})), "head_dim 16 not supported (supports: [64, 128])"),
    (Capabilities(block_sizes=frozenset({32})), "block size 16 not supported (supports: [32])"),
    (Capabilities(block_size_multiple=256), "block size 16 not a multiple of 256"),
    (Capabilities(gqa_ratios=frozenset({1, 4})), "GQA ratio 2 not supported (supports: [1, 4])"),
    (Capabilities(num_q_heads=frozenset({16, 128})), "4 query heads not supported (supports: [16, 128])"),
    (Capabilities(features=frozenset({"non_causal"})), "feature causal not supported"),
    (Capabilities(max_query_len=1), "4 new tokens in a sequence; at most 1 (max_query_len)"),
    (Capabilities(requires=("surely_not_a_module_xyz",)), "surely_not_a_module_xyz is not installed"),
])
def test_every_unsupported_combination_skips_with_its_reason(caps, reason):
    backend = type("Limited", (Echo,), {"name": "limited", "capabilities": caps})()
    result = Runner(CPU).run(backend, SPEC)
    assert result.status == Status.SKIP and result.reason == reason


def test_mla_head_rules_speak_of_latents():
    mla = CaseSpec("t", BatchSpec([20, 9], [4, 1]), MLAHeads(16, kv_lora_rank=256), torch.float16, 16)
    caps = Capabilities(features=frozenset({"causal"}), latent_dims=frozenset({(512, 64)}), num_q_heads=frozenset({128}))
    assert caps.unsupported(mla, CPU) == ("16 query heads not supported (supports: [128]); "
                                          "latent 256 + rope 64 not supported (supports: [(512, 64)])")
    assert caps.unsupported(mla.replace(heads=MLAHeads(128)), CPU) is None


@pytest.mark.parametrize("base, caps, message", [
    (MLABackend, Capabilities(gqa_ratios=frozenset({16})), "Capabilities.gqa_ratios = .* is a rule of mha cases; "
                                                           "a mla backend's head rules are num_q_heads, latent_dims"),
    (MLABackend, Capabilities(head_dims=frozenset({192})), "Capabilities.head_dims = .* is a rule of mha cases"),
    (Echo, Capabilities(latent_dims=frozenset({(512, 64)})), "Capabilities.latent_dims = .* is a rule of mla cases"),
])
def test_a_head_rule_of_another_kind_is_refused_at_registration(base, caps, message):
    with pytest.raises(RegistryError, match=message):
        register_backend(type("Confused", (base,), {"name": "confused", "capabilities": caps}))


def test_an_unknown_kind_is_refused_at_registration():
    with pytest.raises(RegistryError, match=r"odd.kind = 'gqa': must be one of \['mha', 'mla'\]"):
        register_backend(type("Odd", (Echo,), {"name": "odd", "kind": "gqa"}))


def test_feature_skip_names_the_feature():
    backend = type("NoCap", (Echo,), {"capabilities": Capabilities(features=frozenset({"causal"}))})()
    assert Runner(CPU).run(backend, SPEC.replace(softcap=2.0)).reason == "feature softcap not supported"


def _plugin_dist(tmp_path, entry):
    """An installed distribution on sys.path that declares one entry point, as pip would leave it."""
    (tmp_path / "third_party_attn.py").write_text(textwrap.dedent("""
        from conformance import Backend, register_backend, scatter_to_cache

        @register_backend
        class ThirdParty(Backend):
            name = "third-party"
            def run(self, case):
                return case.out.zero_()
    """))
    dist = tmp_path / "third_party_attn-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-attn\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{entry}\n")


def test_entry_point_of_another_package_is_discovered(tmp_path, monkeypatch):
    _plugin_dist(tmp_path, "third-party = third_party_attn")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    backends = load_backends()
    assert "third-party" in backends and "sdpa" in backends


def test_broken_entry_point_becomes_an_error_not_silence(tmp_path, monkeypatch):
    _plugin_dist(tmp_path, "broken = third_party_attn_missing_module")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    broken = load_backends()["broken"]
    result = Runner(CPU).run(broken, SPEC)
    assert result.status == Status.ERROR
    assert "failed to load" in result.reason and "ModuleNotFoundError" in result.reason


class Raises(Echo):
    def run(self, case):
        raise RuntimeError("kernel exploded")


class WrongShape(Echo):
    def run(self, case):
        return case.out[:-1]


class WrongDtype(Echo):
    def run(self, case):
        return case.out.float()


class NoLse(Echo):
    capabilities = Capabilities(returns_lse=True)


class BadLse(Echo):
    def run(self, case):
        return case.out, torch.zeros(3)


class RulesRaise(Echo):
    def unsupported(self, spec, device):
        return spec.no_such_field


class ReturnsList(Echo):
    def run(self, case):
        return [case.out]


RAISED, BAD_RETURN = Category.ADAPTER_RAISED, Category.BAD_RETURN


@pytest.mark.parametrize("backend, category, reason", [
    (Raises(), RAISED, "RuntimeError: kernel exploded"),
    (RulesRaise(), RAISED,
     "echo.skip_reason raised AttributeError: 'CaseSpec' object has no attribute 'no_such_field'"),
    (ReturnsList(), BAD_RETURN, "echo.run returned list: must return a tensor or (out, lse)"),
    (WrongShape(), BAD_RETURN,
     "echo.run output: shape (4, 4, 16), torch.float16, cpu; must be shape (5, 4, 16), torch.float16"),
    (WrongDtype(), BAD_RETURN,
     "echo.run output: shape (5, 4, 16), torch.float32, cpu; must be shape (5, 4, 16), torch.float16"),
    (NoLse(), BAD_RETURN, "echo.run returned no lse, but its capabilities declare returns_lse"),
    (BadLse(), BAD_RETURN, "echo.run lse: (3,); must be a float tensor of shape (5, 4)"),
])
def test_adapter_misbehaviour_is_a_named_error(backend, category, reason):
    result = Runner(CPU).run(backend, SPEC)
    assert result.status == Status.ERROR and result.reason.startswith(reason)
    assert result.categories == (category,)


def test_wrong_numbers_fail_with_where_and_how_much():
    result = Runner(CPU).run(Echo(), SPEC)
    assert result.status == Status.FAIL and result.categories == (Category.WRONG_OUTPUT,)
    assert result.reason.startswith("output: max err") and " at seq " in result.reason
    assert result.ratio > 1 and result.err > result.tol


def test_nan_output_is_its_own_category():
    class Nan(Echo):
        def run(self, case):
            return torch.full_like(case.out, float("nan"))

    result = Runner(CPU).run(Nan(), SPEC)
    assert result.status == Status.FAIL and result.categories == (Category.NONFINITE,)


def test_a_skip_names_every_unmet_rule():
    caps = Capabilities(dtypes=frozenset({torch.float32}), block_sizes=frozenset({32}),
                        features=frozenset({"non_causal"}))
    backend = type("Limited", (Echo,), {"name": "limited", "capabilities": caps,
                                        "unsupported": lambda self, spec, device: "no batches of 2"})()
    assert Runner(CPU).run(backend, SPEC).reason == (
        "dtype fp16 not supported (supports: fp32); block size 16 not supported (supports: [32]); "
        "feature causal not supported; no batches of 2")


def test_stray_cache_write_is_caught():
    from mutants import PagedTorch

    class StrayWrite(PagedTorch):
        def write_cache(self, case):
            super().write_cache(case)
            case.v_cache[0, 0] = 0.0  # the null block must stay untouched

    result = Runner(CPU).run(StrayWrite(), SPEC)
    assert result.categories == (Category.WRONG_CACHE_WRITE,)
    assert result.status == Status.FAIL and result.reason == \
        "v_cache: 1 slots differ from the expected write (first: block 0, offset 0)"


def test_flex_falling_back_to_eager_is_an_error(monkeypatch):
    """Past dynamo's recompile limit flex runs unfused, uncompiled: that must not pass as flex."""
    from torch.nn.attention.flex_attention import flex_attention

    import conformance.backends.flex as flex

    monkeypatch.setattr(flex, "_compiled_flex", lambda dynamic: flex_attention)
    result = Runner(CPU).run(flex.FlexBackend(), SPEC)
    assert result.status == Status.ERROR and "without torch.compile" in result.reason


def test_unavailable_is_asked_once_per_backend_and_its_rules_then_never():
    """It asks the machine (imports, devices), not the case: an expensive check needs no cache of its
    own. An unavailable backend's own rules are not asked: they may need what is missing."""
    class Counted(Echo):
        asked = 0

        def unavailable(self):
            Counted.asked += 1
            return "no such library here"

        def unsupported(self, spec, device):
            raise ModuleNotFoundError("no module named 'the_library'")

    backend, runner = Counted(), Runner(CPU)
    results = [runner.run(backend, SPEC.replace(block_size=bs)) for bs in (16, 32, 64)]
    assert Counted.asked == 1 and {r.reason for r in results} == {"no such library here"}
