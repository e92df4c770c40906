"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st

optional = lambda s: st.one_of(st.none(), s)

# Keyword arguments of lars.lars besides the learning rate and the masks.
hyperparameters = st.fixed_dictionaries(
    {
        "momentum": st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
        # Not below 1e-6: float32 flushes a subnormal decay term (3e-42 * w) to
        # zero, so a zero gradient stays zero (r = 1, no step), while float64
        # keeps it and scales it up by the trust ratio to eta * ||w||.
        "weight_decay": st.one_of(st.just(0.0), st.floats(1e-6, 0.1)),
        "trust_coefficient": st.floats(1e-4, 1.0),
        "eps": st.sampled_from([0.0, 1e-8, 1e-3, 0.5]),
        "nesterov": st.booleans(),
        "trust_clip": optional(st.floats(0.01, 10.0)),
        "grad_clip_norm": optional(st.floats(0.01, 10.0)),
        "grad_clip_value": optional(st.floats(0.01, 10.0)),
        "lr_inside_momentum": st.booleans(),
    }
)
