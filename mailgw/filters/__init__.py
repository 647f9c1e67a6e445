"""Filter pipelines admins edit in ``filters/*.yaml`` (see docs/filters.md).

model.py (format, JSON Schema) -> loader.py (validate, compile via compile.py) ->
engine.py (run one message: Decision + Trace) -> apply.py (into the worker's transaction);
reload.py keeps the running pipeline current; registry.py loads plugins by entry point.
"""
