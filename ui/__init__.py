"""Gradio pages. Each page module has ``build(ctx)`` that lays out its tab and wires its events;
``ui.app.build_app`` puts the pages together. Pages talk to ``engines.manager.EngineManager`` only."""
