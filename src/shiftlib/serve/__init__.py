"""``shiftlib serve``: an OpenAI-compatible HTTP server over the multi-rank engine (run it under torchrun).

Every rank runs the engine in lockstep (:mod:`~shiftlib.serve.loop`); rank 0 starts the HTTP process
(:mod:`~shiftlib.serve.frontend`, :mod:`~shiftlib.serve.app`) and broadcasts each step's new and cancelled
requests to the other ranks (:mod:`~shiftlib.serve.sync`). Needs the ``serve`` extra:
``pip install "shiftlib[serve]"``.
"""
