"""The native backend's custom call, library, declarations and settings.

The hyperparameter names agree between the contract, the C++ handlers and
the call's attributes; the handler refuses malformed calls; the call writes
in place; ``run`` refuses leaves that are not its spec's; a missing library
is reported; ``BACKEND`` declares what it can do; the settings and
``backend_options`` reach the call.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_cases import big_problem, config_of, param_bytes, require_native, small, spec_of

import lars
from lars import contract
from lars.contract import Feature, LarsConfig, StepInputs
from lars.kernels import native
from lars.kernels.native import ffi, library

ROOT = Path(__file__).resolve().parents[1]
NATIVE_DIR = ROOT / "kernels" / "native"


@pytest.fixture(autouse=True)
def _require_native():
    require_native()


# --------------------------------------------------------------------------
# Names: the contract's hyperparameters, the C++ and the call agree.


def _source(name: str) -> str:
    text = (NATIVE_DIR / name).read_text()
    return re.sub(r"//[^\n]*", "", text)  # no comments


def _params_of(text: str, function: str) -> list[str]:
    """The names of the double parameters of a C++ function's definition, in order."""
    match = re.search(rf"\b{function}\(([^)]*)\)\s*{{", text)
    assert match, function
    return re.findall(r"\bdouble\s+(\w+)", match.group(1))


def test_hyper_struct_fields_are_the_contracts_hyperparameters():
    text = _source("lars_common.h")
    body = re.search(r"struct Hyper \{(.*?)\};", text, re.S)
    assert body, "struct Hyper not found in lars_common.h"
    fields = re.findall(r"^\s*double\s+(\w+)\s*(?:=[^;]*)?;", body.group(1), re.M)
    assert tuple(fields) == contract.HYPERPARAMETERS


# An attribute the binding declares: .Attr<T>("name"), in a template .template Attr<T>("name").
_ATTR = r'\.(?:template\s+)?Attr<(.*?)>\("(\w+)"\)'


def _bound_attributes() -> list[tuple[str, str]]:
    """(type, name) of every attribute the step handlers' shared binding declares, in order."""
    return re.findall(_ATTR, _source("lars_ffi_leaf.h"))


@pytest.mark.parametrize(
    "file, handler", [("lars_cpu.cc", "StepCpu"), ("lars_cuda.cu", "StepCuda")]
)
def test_handlers_bind_the_contracts_hyperparameters(file: str, handler: str):
    """Each handler is bound by the shared binding, which binds the hyperparameters
    by name (.Attr), and takes them in that order."""
    text = _source(file)
    assert re.search(
        rf"XLA_FFI_DEFINE_HANDLER_SYMBOL\(\w+,\s*lars_native::{handler},\s*lars_native::BindStep\(",
        text,
    ), f"{handler} is not bound by BindStep"
    assert not re.findall(_ATTR, text), f"{file} binds attributes of its own"
    doubles = tuple(name for kind, name in _bound_attributes() if kind == "double")
    assert doubles == contract.HYPERPARAMETERS
    assert tuple(_params_of(text, handler)) == contract.HYPERPARAMETERS


def test_step_header_reads_the_contracts_hyperparameters():
    """lars_ffi_leaf.h's ReadStepHeader takes them in order and stores each in its Hyper field."""
    text = _source("lars_ffi_leaf.h")
    assert tuple(_params_of(text, "ReadStepHeader")) == contract.HYPERPARAMETERS
    stored = re.findall(r"h->(\w+) = (\w+);", text)
    for name in contract.HYPERPARAMETERS:
        assert (name, name) in stored, name


def _handler_attributes() -> list[str]:
    """Every attribute name the handlers bind, in order."""
    return [name for _, name in _bound_attributes()]


def test_call_passes_exactly_the_handlers_attributes():
    """The Python side passes the contract's hyperparameters as float64 attributes,
    and no attribute the handlers do not bind (read off the lowered call)."""
    spec = spec_of(LarsConfig(weight_decay=1e-3, grad_clip_norm=1.0), *small()[:2])
    attrs = ffi.attributes(spec, ffi.mode_of(spec), 0)
    doubles = [k for k, v in attrs.items() if isinstance(v, np.float64)]
    assert tuple(doubles) == contract.HYPERPARAMETERS
    assert list(attrs) == _handler_attributes()

    p, g, v = small()
    text = (
        jax.jit(lambda p, g, v: native.run(spec, StepInputs(p, g, v, 0.1))).lower(p, g, v).as_text()
    )
    config = re.search(r"custom_call @lars_native_step\(.*?mhlo\.backend_config = \{(.*?)\}", text)
    assert config, text
    names = re.findall(r"(?:^|, )(\w+) = ", config.group(1))
    assert sorted(names) == sorted(attrs)
    f64 = re.findall(r"(\w+) = [-+0-9.e]+ : f64", config.group(1))
    assert sorted(f64) == sorted(contract.HYPERPARAMETERS)


# --------------------------------------------------------------------------
# The custom call.


def test_handler_validates_its_operands():
    """A malformed direct call is refused by the C++ handler with a clear message."""
    library.load()
    call = jax.ffi.ffi_call(
        library.TARGET,
        [jax.ShapeDtypeStruct((3,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((), jnp.float32)],
    )
    w = jnp.ones((3,), jnp.float32)
    spec = spec_of(LarsConfig(), [w], [w])
    attrs = ffi.attributes(spec, ffi.WRITE_UPDATES, 0)
    with pytest.raises(Exception, match="lars native step: leaf 0: params, grads, momentum"):
        jax.block_until_ready(call(jnp.float32(0.1), w, jnp.ones((4,), jnp.float32), w, **attrs))
    with pytest.raises(Exception, match="lars native step: leaf 0: unsupported"):
        jax.block_until_ready(call(jnp.float32(0.1), w, w.astype(jnp.int32), w, **attrs))
    with pytest.raises(Exception, match="lars native step: expected 3 operands"):
        jax.block_until_ready(call(jnp.float32(0.1), w, w, **attrs))
    with pytest.raises(Exception, match="lars native step: unknown output mode 7"):
        jax.block_until_ready(call(jnp.float32(0.1), w, w, w, **{**attrs, "mode": np.int32(7)}))
    # The ratios are one float32 vector with one entry per leaf.
    for ratio_type in (
        jax.ShapeDtypeStruct((2,), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    ):
        wrong = jax.ffi.ffi_call(
            library.TARGET, [jax.ShapeDtypeStruct((3,), jnp.float32)] * 2 + [ratio_type]
        )
        with pytest.raises(Exception, match="trust-ratio result must be a float32 vector"):
            jax.block_until_ready(wrong(jnp.float32(0.1), w, w, w, **attrs))


def test_modes_are_checked():
    p, g, v = small()
    spec = spec_of(LarsConfig(), p, g)
    with pytest.raises(ValueError, match="unknown mode"):
        ffi.custom_call(spec, 5, 0, jnp.float32(0.1), p, g, v)
    nesterov = spec.replace(config=LarsConfig(nesterov=True))
    with pytest.raises(ValueError, match="nesterov"):
        ffi.custom_call(nesterov, ffi.MOMENTUM_ONLY, 0, jnp.float32(0.1), p, g, v)


@pytest.mark.parametrize(
    "fields, mode",
    [
        ({}, ffi.MOMENTUM_ONLY),
        ({"config": LarsConfig(nesterov=True)}, ffi.WRITE_UPDATES),
        ({"write_params": True}, ffi.WRITE_PARAMS),
        ({"write_params": True, "config": LarsConfig(nesterov=True)}, ffi.WRITE_PARAMS),
        ({"given_ratios": True}, ffi.MOMENTUM_ONLY),
    ],
)
def test_mode_follows_the_spec(fields: dict, mode: int):
    p, g, _ = small()
    assert ffi.mode_of(spec_of(LarsConfig(), p, g).replace(**fields)) == mode


def test_in_place_apply_allocates_no_temporaries():
    """With params and momentum donated, new params/momentum reuse their buffers."""
    params, grads, momentum = big_problem()
    spec = spec_of(config_of("everything"), params, grads, write_params=True)

    def step(params, momentum, grads, lr):
        r = native.run(spec, StepInputs(params, grads, momentum, lr))
        return r.updates, r.momentum

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, momentum, grads, 0.1).compile()
    stats = compiled.memory_analysis()
    assert stats.temp_size_in_bytes < 0.01 * param_bytes(params), stats
    assert stats.alias_size_in_bytes >= 2 * param_bytes(params), stats


# --------------------------------------------------------------------------
# Leaves that are not the spec's.


def test_rejects_mismatched_shapes():
    p, g, v = small()
    spec = spec_of(LarsConfig(), p, g)
    g[1] = jnp.ones((4,), jnp.float32)
    with pytest.raises(ValueError, match="leaf 1"):
        native.run(spec, StepInputs(p, g, v, jnp.float32(0.1)))
    with pytest.raises(ValueError, match="leaves"):
        native.run(spec, StepInputs(p, g[:1], v, jnp.float32(0.1)))


def test_rejects_unsupported_dtypes():
    p, g, v = small()
    bf16 = [x.astype(jnp.bfloat16) for x in p]
    with pytest.raises(TypeError, match="bfloat16 params with float32 gradients"):
        native.run(spec_of(LarsConfig(), bf16, g), StepInputs(bf16, g, v, jnp.float32(0.1)))
    with pytest.raises(TypeError, match="momentum"):
        native.run(
            spec_of(LarsConfig(), p, g), StepInputs(p, g, [x.astype(jnp.float16) for x in v], 0.1)
        )
    ints = [x.astype(jnp.int32) for x in p]
    with pytest.raises(TypeError, match="int32"):
        native.run(spec_of(LarsConfig(), ints, g), StepInputs(ints, g, v, jnp.float32(0.1)))
    with pytest.raises(TypeError, match="the spec has"):
        native.run(
            spec_of(LarsConfig(), p, g), StepInputs(p, [x.astype(jnp.bfloat16) for x in g], v, 0.1)
        )


def test_rejects_bad_masks_lr_flag_and_ratios():
    p, g, v = small()
    # The masks are the spec's, one bool per leaf: a short one is refused there.
    with pytest.raises(ValueError, match="shorter"):
        spec_of(LarsConfig(), p, g, decay_mask=[True])
    spec = spec_of(LarsConfig(), p, g)
    with pytest.raises(ValueError, match="scalar"):
        native.run(spec, StepInputs(p, g, v, jnp.ones(2, jnp.float32)))
    with pytest.raises(ValueError, match="skip_nonfinite"):
        native.run(spec, StepInputs(p, g, v, 0.1, finite=jnp.bool_(True)))
    with pytest.raises(ValueError, match="bool scalar"):
        native.run(
            spec.replace(skip_nonfinite=True), StepInputs(p, g, v, 0.1, finite=jnp.ones(2, bool))
        )
    with pytest.raises(ValueError, match="given_ratios"):
        native.run(spec.replace(given_ratios=True), StepInputs(p, g, v, 0.1))


def test_given_ratios_must_match_the_leaves():
    p = [jnp.ones(4, jnp.float32), jnp.ones(2, jnp.float32)]
    spec = spec_of(LarsConfig(), p, p, given_ratios=True)
    with pytest.raises(ValueError, match="one given ratio per leaf"):
        jax.block_until_ready(
            native.run(
                spec,
                StepInputs(
                    p, p, p, jnp.float32(0.1), ratios=jnp.ones(3), global_norm=jnp.float32(0)
                ),
            ).momentum
        )


# --------------------------------------------------------------------------
# Availability and declarations.


def test_missing_library_is_reported_and_other_backends_still_work(monkeypatch, tmp_path):
    monkeypatch.setattr(library, "_state", {})
    monkeypatch.setattr(library, "LIB_DIR", tmp_path)
    reason = native.BACKEND.unavailable("cpu")
    assert reason is not None and "not built" in reason
    assert native.BACKEND.features("cpu") == frozenset()
    assert "native" not in lars.available_backends()
    assert "reference" in lars.available_backends()
    with pytest.raises(RuntimeError, match="not built"):
        lars.lars(0.1, backend="native")
    with pytest.raises(RuntimeError, match="not built"):
        native.cpu_isa()
    p, g, v = small()
    with pytest.raises(RuntimeError, match="not built"):
        native.run(spec_of(LarsConfig(), p, g), StepInputs(p, g, v, 0.1))
    opt = lars.lars(0.1, backend="auto")
    params = {"w": jnp.ones(3)}
    updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_declarations():
    """Name, dtypes, features per platform and the steps a GPU cannot take."""
    backend = native.BACKEND
    assert backend.name == "native"
    assert lars._dispatch.get("native") is backend
    f32, bf16, f16, f64 = (np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, "f8"))
    assert backend.dtypes == {
        (f32, f32), (f32, bf16), (f32, f16), (bf16, bf16), (f16, f16),
        (f64, f64), (f64, bf16), (f64, f16),
    }  # fmt: skip
    assert backend.features("cpu") == {
        Feature.IN_PLACE,
        Feature.SKIP_NONFINITE,
        Feature.GIVEN_RATIOS,
        Feature.SHARD_MAP,
    }
    cuda = library.load()["cuda"] is not None
    for platform in ("gpu", "cuda"):
        assert backend.features(platform) == (frozenset({Feature.IN_PLACE}) if cuda else set())
        assert (backend.unavailable(platform) is None) == cuda
    assert backend.features("tpu") == frozenset()
    assert "no handler" in backend.unavailable("tpu")

    p, g, _ = small()
    spec = spec_of(LarsConfig(weight_decay=1e-3), p, g)
    for platform in ("cpu", "gpu"):
        assert backend.unsupported(spec, platform) is None
        assert backend.unsupported(spec.replace(write_params=True), platform) is None
    assert backend.unsupported(spec.replace(given_ratios=True), "cpu") is None
    assert backend.unsupported(spec.replace(skip_nonfinite=True), "cpu") is None
    assert "ratios" in backend.unsupported(spec.replace(given_ratios=True), "gpu")
    assert "finite flag" in backend.unsupported(spec.replace(skip_nonfinite=True), "gpu")


def test_traced_hyperparameters_are_unsupported_and_refused():
    p, g, v = small()
    seen = []

    def step(weight_decay):
        spec = spec_of(LarsConfig(weight_decay=weight_decay), p, g)
        seen.append(native.BACKEND.unsupported(spec, "cpu"))
        with pytest.raises(ValueError, match="weight_decay is a traced value"):
            native.run(spec, StepInputs(p, g, v, 0.1))
        return weight_decay

    jax.jit(step)(1e-3)
    assert seen and "weight_decay is a traced value" in seen[0]


# --------------------------------------------------------------------------
# Settings and backend_options.


def test_set_num_threads_validates():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            native.set_num_threads(bad)
    before = native.get_num_threads()
    native.set_num_threads(1)
    assert native.get_num_threads() == 1
    native.set_num_threads(before)


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="not available"):
        native.set_cpu_isa("avx9000")


def test_options_are_checked_and_normalised():
    options = native.BACKEND.options
    assert options({}) == {}
    assert options({"num_threads": 2}) == {"num_threads": 2}
    assert options({"num_threads": np.int64(3)}) == {"num_threads": 3}
    assert type(options({"num_threads": np.int64(3)})["num_threads"]) is int
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="num_threads"):
            options({"num_threads": bad})
    with pytest.raises(ValueError, match="threads"):
        options({"threads": 2})


def test_fused_options_are_checked_and_normalised():
    options = native.BACKEND.options
    assert options({"fused": True}) == {"fused": True}
    assert options({"fused": np.bool_(False)}) == {"fused": False}
    assert type(options({"fused": np.bool_(True)})["fused"]) is bool
    given = {"fused": True, "lookahead": np.int64(32), "chunk": 8192, "blocks_per_sm": 2}
    assert options(given) == {"fused": True, "lookahead": 32, "chunk": 8192, "blocks_per_sm": 2}
    assert type(options(given)["lookahead"]) is int
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match="fused must be a bool"):
            options({"fused": bad})
    bad_values = {
        "lookahead": (0, -1, 2**30 + 1, 1.5, True, "8"),
        "chunk": (0, 1000, 1536, 2**20 + 1024, 4096.0, True),
        "blocks_per_sm": (-1, 1.0, True, 2**10 + 1),
    }
    for name, values in bad_values.items():
        for bad in values:
            with pytest.raises(ValueError, match=f"{name} must be an int"):
                options({"fused": True, name: bad})
        for without in ({name: 8192}, {"fused": False, name: 8192}):
            with pytest.raises(ValueError, match="fused=True"):
                options(without)


def _lowered_text(spec, params, grads, momentum) -> str:
    """The jitted step's lowered module, as text."""
    return (
        jax.jit(lambda p, g, v: native.run(spec, StepInputs(p, g, v, 0.1)))
        .lower(params, grads, momentum)
        .as_text()
    )


def _fused_attribute(spec, params, grads, momentum) -> list[int]:
    text = _lowered_text(spec, params, grads, momentum)
    found = re.search(r"\bfused = dense<\[?([-\d, ]*)\]?> : tensor<3xi64>", text)
    assert found, text[-2000:]
    values = [int(x) for x in found.group(1).split(",")]
    return values * 3 if len(values) == 1 else values  # dense<0>: a splat


def test_fused_options_become_the_fused_attribute():
    """(0, 0, 0), two launches, by default; (lookahead, chunk, blocks per SM) with fused."""
    p, g, v = small()
    spec = spec_of(config_of("weight_decay"), p, g)
    assert _fused_attribute(spec, p, g, v) == [0, 0, 0]
    fused = spec.replace(options=(("fused", True),))
    defaults = [ffi.FUSED_LOOKAHEAD, ffi.FUSED_CHUNK, ffi.FUSED_BLOCKS_PER_SM]
    assert _fused_attribute(fused, p, g, v) == defaults == [512, 4096, 0]
    given = (("blocks_per_sm", 1), ("chunk", 2048), ("fused", True), ("lookahead", 7))
    assert _fused_attribute(spec.replace(options=given), p, g, v) == [7, 2048, 1]
    off = spec.replace(options=(("fused", False),))
    assert _fused_attribute(off, p, g, v) == [0, 0, 0]


def test_fused_changes_nothing_on_the_cpu():
    """The CPU handler ignores the CUDA handler's launch choice: the same bits."""
    params, grads, momentum = big_problem()
    spec = spec_of(config_of("weight_decay"), params, grads)
    plain = native.run(spec, StepInputs(params, grads, momentum, 0.1))
    fused = native.run(
        spec.replace(options=(("chunk", 2048), ("fused", True), ("lookahead", 3))),
        StepInputs(params, grads, momentum, 0.1),
    )
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fused), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _num_threads_attribute(spec, params, grads, momentum) -> int:
    text = _lowered_text(spec, params, grads, momentum)
    return int(re.search(r"num_threads = (\d+) : i64", text).group(1))


def test_thread_count_is_the_option_else_the_setting():
    """num_threads from spec.options; without it, set_num_threads' value when traced."""
    params, grads, momentum = big_problem()
    spec = spec_of(config_of("weight_decay"), params, grads)
    before = native.get_num_threads()
    try:
        native.set_num_threads(1)
        assert _num_threads_attribute(spec, params, grads, momentum) == 1
        jax.block_until_ready(native.run(spec, StepInputs(params, grads, momentum, 0.1)))
        assert native.last_step_threads()[0] == 1
        two = spec.replace(options=(("num_threads", 2),))
        assert _num_threads_attribute(two, params, grads, momentum) == 2
        jax.block_until_ready(native.run(two, StepInputs(params, grads, momentum, 0.1)))
        assert native.last_step_threads()[0] == 2
    finally:
        native.set_num_threads(before)


def _steps_with_options(make_opt, params, grads) -> int:
    opt = make_opt()
    state = opt.init(params)
    jax.block_until_ready(jax.jit(opt.apply_gradients)(params, state, grads))
    return native.last_step_threads()[0]


def test_backend_options_reach_the_call():
    """lars.lars(backend_options=...) carries the normalised options to run."""
    params, grads, _ = big_problem()

    def make(threads):
        return lars.lars(0.1, backend="native", backend_options={"num_threads": threads})

    assert _steps_with_options(lambda: make(1), params, grads) == 1
    assert _steps_with_options(lambda: make(np.int64(2)), params, grads) == 2
    with pytest.raises(ValueError, match="num_threads"):
        make(-1)
    with pytest.raises(ValueError, match="explicit backend"):
        lars.lars(0.1, backend_options={"num_threads": 1})
    p, g, _ = small()
    opt = lars.lars(0.1, backend="native", backend_options={"num_threads": 3})
    text = jax.jit(opt.apply_gradients).lower(p, opt.init(p), g).as_text()
    assert "num_threads = 3 : i64" in text


def test_bytes_per_step():
    """The benchmark's byte count (bench/native_resnet50.py)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.native_resnet50 import bytes_per_step

    p = [jnp.zeros((10,), jnp.float32), jnp.zeros((4,), jnp.bfloat16)]
    g = [jnp.zeros((10,), jnp.bfloat16), jnp.zeros((4,), jnp.bfloat16)]
    # float32 params, bf16 grads: 4+4 + 2 + 4+4 = 18 B; bf16 params: 2+2+2+4+4 = 14 B.
    assert bytes_per_step(p, g) == 10 * 18 + 4 * 14
    assert math.isclose(bytes_per_step(p[:1], p[:1]) / 10, 20)
