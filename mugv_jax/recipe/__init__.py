"""The training recipe beyond one stage: width expansion, post-hoc EMA, preference optimisation."""
