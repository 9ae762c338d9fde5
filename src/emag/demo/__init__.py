"""``emag demo``: a local web page comparing guidance methods side by side on the same noise.

:mod:`.configs` parses the method configurations, :mod:`.session` runs a comparison (no web code),
:mod:`.app` is the Gradio page on top (needs the ``demo`` extra).
"""
