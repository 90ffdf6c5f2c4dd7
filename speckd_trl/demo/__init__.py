"""The offline demo, an application built on the library: real SmolLM2 weights without the Hub (`hub`), a task
with exact-match scoring (`tasks`) and the pipeline that tunes a teacher and distills a student (`app`, run by
``speckd-trl demo``). Nothing in the library (`speckd_trl.*` outside this folder) imports it.
"""

from .app import DemoConfig, evaluate, layer_subset, prepare, run_demo


__all__ = ["DemoConfig", "evaluate", "layer_subset", "prepare", "run_demo"]
