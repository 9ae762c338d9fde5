"""Model plumbing: how a guidance term's edits reach one slice of a batched forward pass.

``hooks`` (forward hooks owned by one call and one thread), ``intercept`` (the fused attention call of
chosen attention modules routed to a handler), ``edits`` (per-branch attention and block edits applied
to their own rows of a pass), ``runner`` (activations between blocks), ``conditions`` (a branch's
conditioning), ``text_weakening`` (temperature-scaled text encoders), ``exclusive`` (one call per transformer at a
time). Model families and how their
passes run are in :mod:`emag.families`.
"""
