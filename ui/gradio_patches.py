"""Gradio shims, each measured, guarded and explained (like engines/lmdeploy.py's LMDeploy shims).

``lazy_session_config``: every new Gradio session builds the config of every component of the app
(``SessionState.__init__`` -> ``config_for_block`` for all blocks), on the event loop that also
streams every user's tokens. TurboStudio has ~190 components, so that is ~9 ms a session on the
2-core CI machine, and a REST client (``/gradio_api/call/chat``, the OpenAI-style way to script the
app) is a new session on *every* request: 64 users arriving together held every first token back
by ~0.6 s here (bench/bench_web.py). Those configs are only read back when a deep link is saved;
this shim builds each one when it is first read or set, which gives the same values (the session's
blocks are untouched until then, and setting a block sets its config).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class _LazyConfigValues(dict):
    """``SessionState.config_values``, filled on first read: ``pending`` holds block ids whose
    config has not been built yet."""

    def __init__(self, session, pending):
        super().__init__()
        self._session = session
        self._pending = dict.fromkeys(pending)      # ordered, like the eager dict was

    def _build(self, key):
        bc = self._session.blocks_config
        if key in bc.blocks:
            dict.__setitem__(self, key, bc.config_for_block(key, [], bc.blocks[key]))

    def _fill(self):
        while self._pending:
            key = next(iter(self._pending))
            self._pending.pop(key)
            if not dict.__contains__(self, key):
                self._build(key)

    def __setitem__(self, key, value):
        self._pending.pop(key, None)
        dict.__setitem__(self, key, value)

    def __getitem__(self, key):
        if key in self._pending:
            self._pending.pop(key)
            self._build(key)
        return dict.__getitem__(self, key)

    def __contains__(self, key):
        return key in self._pending or dict.__contains__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):
        self._fill()
        return dict.__iter__(self)

    def __len__(self):
        self._fill()
        return dict.__len__(self)

    def items(self):
        self._fill()
        return dict.items(self)

    def keys(self):
        self._fill()
        return dict.keys(self)

    def values(self):
        self._fill()
        return dict.values(self)


def lazy_session_config() -> bool:
    """Install the shim; False (and Gradio untouched) when Gradio's SessionState is not the shape
    this was written against (Gradio 6.31: ``copy(blocks.default_config)``, then ``config_values``
    built with ``blocks_config.config_for_block``).

    How: during ``SessionState.__init__`` only, the session's own copy of the blocks config gets an
    instance-level ``config_for_block`` that builds nothing (the copy is made through
    ``state_holder.copy``, hooked for this thread while the constructor runs); afterwards the
    method is restored and ``config_values`` becomes a mapping that builds each entry on first use.
    Nothing shared is changed, so concurrent sessions and handlers see Gradio as it is."""
    import threading

    try:
        from gradio import state_holder
    except ImportError:
        return False
    cls = state_holder.SessionState
    if getattr(cls, "_turbostudio_lazy", False):
        return True
    real_copy = getattr(state_holder, "copy", None)
    if real_copy is None:
        return False
    local = threading.local()

    def copy_hook(obj):
        made = real_copy(obj)
        if getattr(local, "active", False) and hasattr(made, "config_for_block") and local.made is None:
            made.config_for_block = lambda *a, **k: None
            local.made = made
        return made

    original = cls.__init__

    def __init__(self, blocks):
        local.active, local.made = True, None
        try:
            original(self, blocks)
        finally:
            local.active = False
        made = local.made
        local.made = None
        if made is None:
            return
        del made.config_for_block               # the class's method again
        values = getattr(self, "config_values", None)
        if made is self.blocks_config and isinstance(values, dict):
            self.config_values = _LazyConfigValues(self, list(values))   # all None: built nothing
        else:                                   # not the expected shape: build them as Gradio does
            self.config_values = {k: made.config_for_block(k, [], made.blocks[k]) for k in values or {}}

    state_holder.copy = copy_hook
    cls.__init__ = __init__
    cls._turbostudio_lazy = True
    log.info("Gradio sessions build component configs on first use (ui/gradio_patches.py)")
    return True
